"""Ray Train + DeepSpeed machinery shared by the trainers: SFT (`train.py`), the reward model
(`train_rm.py`).

Driver side: `run_fingerprint` and `refuse_foreign_checkpoints` guard resumption, `fit` starts
`TorchTrainer` with gloo (CPU) or nccl (GPU). Worker side: `start_worker` builds the model
(`head`: a causal LM or a one-output score head), wraps it with `deepspeed.initialize`, computes
the deterministic step plan and restores the latest Ray Train checkpoint; `run_steps` walks the
plan from there, logging each step and checkpointing every `cfg.checkpoint_every_steps`;
`save_model` gathers the weights and writes a Hugging Face folder (LoRA merged or kept).
A trainer supplies only its data and its `step_fn`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dromedary_ray.algos.sft import StepPlan, plan_steps
from dromedary_ray.config import TrainConfig
from dromedary_ray.runtime.faults import fault_env, maybe_die, maybe_hang

ENGINE_TAG = "engine"  # DeepSpeed's sub-folder inside each Ray Train checkpoint
STATE_FILE = "train_state.json"  # step, data position and loss curve, beside the engine state
PASSED_ENV = ("TORCH_EXTENSIONS_DIR", "DROMEDARY_HOME")  # compiled-op cache, model cache
HEADS = ("causal_lm", "score")  # next-token logits | one scalar read at the last non-pad token
# Settings that change how a run is watched or retried, not what it computes.
NOT_FINGERPRINTED = ("max_failures", "log_every_steps", "checkpoint_every_steps")


# --- driver side -------------------------------------------------------------------------------


def run_fingerprint(data: Any, cfg: TrainConfig, base: str) -> str:
    """What a checkpoint must match to be resumed: the data, the config and the base model."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    blob = json.dumps([data, settings, base], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def refuse_foreign_checkpoints(run_path: Path, fingerprint: str) -> None:
    """Fail before any worker starts if the run folder holds another run's checkpoints.

    Ray Train resumes a run by name; the workers check too, but there every restart would
    fail the same way until `max_failures` is spent.
    """
    for state_file in sorted(run_path.glob(f"*/{STATE_FILE}")):
        if json.loads(state_file.read_text()).get("fingerprint") != fingerprint:
            raise ValueError(f"{state_file.parent} is a checkpoint of a run with other data or "
                             f"config; remove {run_path} or train into another out_dir")


def local_out_dir(out_dir: str) -> Path:
    if "://" in out_dir:
        raise ValueError(f"training writes to a local folder; got {out_dir!r}")
    return Path(out_dir).expanduser().resolve()


def loop_config(*, base_model_path: str, out: Path, cfg: TrainConfig, fingerprint: str,
                metrics_path: str | None, **extra: Any) -> dict[str, Any]:
    """The keys every worker loop reads (see `start_worker`), plus the trainer's own."""
    return {
        "base_model_path": base_model_path,
        "out_dir": str(out),
        "train": cfg,
        "metrics_path": metrics_path,
        "tensorboard_dir": str(out.parent / "tensorboard"),
        "fingerprint": fingerprint,
        "env": {**fault_env(), **{k: os.environ[k] for k in PASSED_ENV if k in os.environ}},
        **extra,
    }


def fit(loop: Callable[[dict[str, Any]], Any], config: dict[str, Any], cfg: TrainConfig,
        out: Path, run_name: str) -> dict[str, Any]:
    """Run `loop` on `cfg.num_workers` Ray Train workers; rank 0's return value.

    Checkpoints go to `<out>/../ray_train/<run_name>`: a second call with the same folder
    resumes from the latest one (Ray Train restores a run by name).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dromedary_ray.runtime.cluster import pool_resources  # one unit per worker (= per GPU)

    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **pool_resources("training", 1)}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            storage_path=str(out.parent / "ray_train"), name=run_name,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result.return_value


# --- worker side: set-up -----------------------------------------------------------------------


@dataclass
class Worker:
    """One Ray Train worker's engine, plan and resumable state."""

    rank: int
    world: int
    cfg: TrainConfig
    plan: list[StepPlan]
    engine: Any
    tokenizer: Any
    counts: dict[str, int]  # trainable_params, total_params
    state: dict[str, Any]  # step, curve, resumed_from_step, fingerprint: what a checkpoint holds
    started: float


def start_worker(config: dict[str, Any], n_examples: int, head: str) -> Worker:
    """Pin threads, seed, plan the steps, build the engine and restore the latest checkpoint."""
    import ray.train
    import torch

    os.environ.update(config["env"])  # the fault spec and caches; read by this process only
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg: TrainConfig = config["train"]
    if not cfg.use_gpu:
        # Ray does not pin threads: without this each worker spawns one per core and they thrash.
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    plan = plan_steps(n_examples, world_size=world, micro_batch_size=cfg.micro_batch_size,
                      grad_accum=cfg.gradient_accumulation_steps, epochs=cfg.epochs,
                      seed=cfg.seed, max_steps=cfg.max_steps)
    started = time.perf_counter()
    engine, counts, tokenizer = build_engine(config["base_model_path"], cfg, len(plan), head)
    state = restore(engine, config["fingerprint"])
    return Worker(rank, world, cfg, plan, engine, tokenizer, counts, state, started)


def load_tokenizer(base_model_path: str) -> Any:
    """The base model's tokenizer, with EOS as pad token where it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    if tokenizer.pad_token_id is None:  # padding is masked out (or skipped by the head)
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def load_model(base_model_path: str, cfg: TrainConfig,
               head: str = "causal_lm") -> tuple[Any, dict[str, int]]:
    """The transformers model, LoRA-wrapped when asked; and its parameter counts.

    `head="score"`: `AutoModelForSequenceClassification` with one label (for LLaMA,
    LlamaForSequenceClassification), its new linear `score` head on top of the base weights.
    It reads the last token that is not the pad token, so the config must name one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if head == "score":
        pad_id = load_tokenizer(base_model_path).pad_token_id
        model = AutoModelForSequenceClassification.from_pretrained(
            base_model_path, num_labels=1, dtype=dtype, pad_token_id=pad_id)
        model.config.pad_token_id = pad_id
    else:
        model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype)
    model.config.use_cache = False  # no KV cache in training; it also conflicts with checkpointing
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg, head))  # freezes every non-adapter weight
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings would cut the graph
    counts = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total_params": sum(p.numel() for p in model.parameters())}
    return model, counts


def lora_config(cfg: TrainConfig, head: str = "causal_lm") -> Any:
    """peft's LoraConfig; a score head is new, so it trains in full beside the adapters."""
    from peft import LoraConfig

    score = head == "score"
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules),
                      task_type="SEQ_CLS" if score else "CAUSAL_LM",
                      modules_to_save=["score"] if score else None)


def deepspeed_config(cfg: TrainConfig, total_steps: int, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO stage, AdamW (torch's, so no op to compile), warmup-decay LR.

    DeepSpeed's WarmupDecayLR warms up over at least 2 steps from `warmup_min_lr` and steps
    after the optimizer, so the first two updates run at 0: a fixed cost of two steps.
    """
    warmup = max(1, round(cfg.warmup_ratio * total_steps))
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": cfg.learning_rate,
            "warmup_num_steps": warmup, "total_num_steps": max(total_steps, warmup + 1),
            "warmup_type": "linear"}},
        "zero_optimization": zero_config(cfg.zero_stage, hidden_size),
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 1 << 30,  # we log ourselves; DeepSpeed's own lines would flood
    }


def constant_lr_config(cfg: TrainConfig, hidden_size: int, *, learning_rate: float | None,
                       grad_accum: int, weight_decay: float = 0.0) -> dict[str, Any]:
    """A DeepSpeed config with no learning-rate schedule (PPO's trainer group), or with
    `learning_rate` None no optimizer at all: a frozen model that only runs forwards under the
    same ZeRO stage (PPO's reference). AdamW is torch's (`torch_adam`), so no op compiles and
    the update is the one the one-process PPO trainer makes.
    """
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero_config(cfg.zero_stage, hidden_size),
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 1 << 30,
    }
    if learning_rate is not None:
        out["gradient_clipping"] = cfg.max_grad_norm
        out["optimizer"] = {"type": "AdamW", "params": {
            "lr": learning_rate, "weight_decay": weight_decay, "torch_adam": True}}
    return out


def passed_env() -> dict[str, str]:
    """The environment a training process on another worker needs from the driver's: the
    fault spec of the reliability tests, the compiled-op cache and the model cache."""
    return {**fault_env(), **{k: os.environ[k] for k in PASSED_ENV if k in os.environ}}


def zero_config(stage: int, hidden_size: int) -> dict[str, Any]:
    """ZeRO settings with communication buckets sized to the model, not DeepSpeed's defaults.

    The defaults (5e8-element reduce bucket) are tuned for multi-billion-parameter models; on
    SmolLM2-135M they cost ~0.5 GB of peak memory per rank (6.7 -> 6.2 GB measured, one CPU
    process). hidden_size² per bucket is transformers' "auto" choice; the 4M-element floor
    keeps small models from paying for hundreds of tiny collectives per step.
    """
    if stage != 3:
        return {"stage": stage}
    bucket = max(hidden_size * hidden_size, 1 << 22)
    return {
        "stage": 3,
        "reduce_bucket_size": bucket,
        "stage3_prefetch_bucket_size": int(0.9 * bucket),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


def build_engine(base_model_path: str, cfg: TrainConfig, total_steps: int,
                 head: str = "causal_lm") -> tuple[Any, dict[str, int], Any]:
    import deepspeed

    model, counts = load_model(base_model_path, cfg, head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The process group already exists (Ray Train made it); DeepSpeed joins it.
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable,
                                      config=deepspeed_config(cfg, total_steps,
                                                              model.config.hidden_size))
    engine.train()
    return engine, counts, load_tokenizer(base_model_path)


# --- worker side: the step loop and checkpoints ------------------------------------------------


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step reports (global values, identical on every rank)."""

    curve: tuple[float, ...]  # loss first: the per-step values a checkpoint carries
    log: dict[str, float]  # the step's JSON log line, besides step, lr and seconds
    tokens: int  # non-pad tokens of the whole step, all ranks


def run_steps(w: Worker, step_fn: Callable[[StepPlan], StepOutcome],
              log: StepLog | None) -> tuple[int, float]:
    """Run the planned steps from the restored one; (tokens, seconds spent in steps).

    `state["curve"]` gains `[step, *outcome.curve]` per step; rank 0 (the one holding `log`)
    writes the step's line, then may be killed by the fault hook of the reliability tests.
    """
    tokens, train_seconds = 0, 0.0
    for step in range(w.state["step"], len(w.plan)):
        t0 = time.perf_counter()
        lr = w.engine.get_lr()[0]
        outcome = step_fn(w.plan[step])
        seconds = time.perf_counter() - t0
        train_seconds, tokens = train_seconds + seconds, tokens + outcome.tokens
        w.state["step"] = step + 1
        w.state["curve"].append([step + 1, *outcome.curve])
        if log is not None:
            log.write(step + 1, {**outcome.log, "lr": lr, "tokens": outcome.tokens}, seconds)
            maybe_die("train_step")  # fault-injection points of the reliability tests
            maybe_hang("train_step")
        if (step + 1) % w.cfg.checkpoint_every_steps == 0 and step + 1 < len(w.plan):
            save_checkpoint(w.engine, w.state, w.rank)
    return tokens, train_seconds


def final_stats(w: Worker, tokens: int, train_seconds: float) -> dict[str, Any]:
    curve = w.state["curve"]
    return {
        "first_loss": curve[0][1], "final_loss": curve[-1][1], "steps": w.state["step"],
        "tokens_per_second": tokens / train_seconds if train_seconds else 0.0,
        "seconds": time.perf_counter() - w.started,
        "resumed_from_step": w.state["resumed_from_step"],
        "loss_curve": curve, **w.counts,
        # ru_maxrss is in KiB on Linux.
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def restore(engine: Any, fingerprint: str) -> dict[str, Any]:
    """Load the latest Ray Train checkpoint into the engine; the state to continue from."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "curve": [], "resumed_from_step": 0, "fingerprint": fingerprint}
    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
        if state["fingerprint"] != fingerprint:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} belongs to a run with other data or config; "
                "remove its ray_train folder or train into another out_dir")
        load_path, _ = engine.load_checkpoint(folder, tag=ENGINE_TAG)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no engine state in {folder}/{ENGINE_TAG}")
    state["resumed_from_step"] = state["step"]
    return state


def save_checkpoint(engine: Any, state: dict[str, Any], rank: int) -> None:
    """Every rank saves its ZeRO partition into its own folder; Ray Train merges the folders
    into one checkpoint.

    `report` returns once the files are uploaded, but the controller registers the checkpoint
    only when it next polls the workers: a worker killed in between would restart from the
    checkpoint before. Rank 0 therefore waits until the controller has committed it.
    """
    import ray.train

    with tempfile.TemporaryDirectory(prefix="train-ckpt-") as folder:
        engine.save_checkpoint(folder, tag=ENGINE_TAG)
        if rank == 0:
            (Path(folder) / STATE_FILE).write_text(json.dumps(state))
        loss = state["curve"][-1][1]
        ray.train.report({"step": state["step"], "loss": loss},
                         checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"step-{state['step']:07d}")
    if rank == 0:
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


# --- worker side: the final model --------------------------------------------------------------


def save_model(w: Worker, base_model_path: str, out_dir: str, head: str = "causal_lm") -> None:
    """Gather the weights (a collective under ZeRO-3) and write a Hugging Face folder.

    Rank 0 writes into a temporary sibling and renames it, so a crash mid-save never leaves a
    folder that looks like a finished model (`resolve_model("run:...")` trusts config.json).
    """
    import torch.distributed as dist

    engine, cfg = w.engine, w.cfg
    if cfg.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if w.rank == 0 else None
    if w.rank == 0:
        engine.module.config.use_cache = True  # turned off for training; generation wants it
        tmp = f"{out_dir}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.method == "lora":
            write_lora(state_dict, cfg, base_model_path, tmp, head)
        else:
            engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        w.tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    dist.barrier()  # no rank leaves (and lets Ray end the run) before the folder is in place


def write_lora(state_dict: dict[str, Any], cfg: TrainConfig, base_model_path: str,
               out_dir: str, head: str = "causal_lm") -> None:
    """Rebuild the peft model on rank 0 from the gathered weights; merge or keep the adapter.

    Under ZeRO-3 each rank holds a slice of every tensor, so merging needs whole tensors: a
    fresh model with the gathered state dict is the simplest holder of them. Merging also
    puts a trained score head (peft's `modules_to_save` copy) in the plain model's place.
    """
    model, _ = load_model(base_model_path, dataclasses.replace(cfg, gradient_checkpointing=False),
                          head)
    model.load_state_dict(state_dict, strict=True)
    model.config.use_cache = True
    if cfg.merge_lora:
        # Plain weights: transformers and vLLM load the folder with no peft installed.
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)  # adapter_config.json + weights


class StepLog:
    """Rank 0's per-step log: JSON lines ({"step": ..., fields..., "seconds": ...}) and
    TensorBoard scalars `train/<field>`.

    A resumed run appends, so steps after the last checkpoint appear twice; the later line
    is the one that counts (the checkpointed curve holds each step once).
    """

    def __init__(self, metrics_path: str | None, tensorboard_dir: str, echo_every: int,
                 tag: str = "sft"):
        from tensorboardX import SummaryWriter  # torch's own writer needs the tensorboard package

        self.echo_every, self.tag, self.file = echo_every, tag, None
        if metrics_path:
            Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(metrics_path, "a")  # noqa: SIM115 - lives as long as the loop
        self.writer = SummaryWriter(logdir=tensorboard_dir)

    def write(self, step: int, fields: dict[str, float], seconds: float) -> None:
        line = {"step": step, **fields, "seconds": seconds}
        if self.file is not None:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()  # a killed worker still leaves every finished step on disk
        rate = fields.get("tokens", 0) / max(seconds, 1e-9)
        for key, value in fields.items():
            if key != "tokens":
                self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.add_scalar("train/tokens_per_second", rate, step)
        if step % self.echo_every == 0:  # Ray forwards worker stdout to the driver's console
            shown = " ".join(f"{k} {v:.4g}" for k, v in fields.items() if k != "tokens")
            print(f"[{self.tag}] step {step} {shown} {rate:.0f} tok/s", flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.writer.close()
