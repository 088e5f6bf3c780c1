"""Supervised fine-tuning on Ray Train with DeepSpeed (ZeRO-3 by default), full weights or LoRA.

The driver tokenises the (query, answer) records once (`algos.sft`), then `TorchTrainer` starts
`cfg.num_workers` workers that each build the same model, wrap it with `deepspeed.initialize`
and walk the same deterministic step plan, each taking its own share of every micro-batch round.
Every `cfg.checkpoint_every_steps` all ranks save their DeepSpeed state into one Ray Train
checkpoint; a restarted worker group (Ray Train's `FailureConfig`) loads the latest one and goes
on from the step after it, so a killed worker costs at most that many steps.

Launch (a local Ray cluster is started if none is running)::

    from dromedary_ray.config import TrainConfig
    from dromedary_ray.models import resolve_model
    from dromedary_ray.runtime.train import train_sft

    result = train_sft(
        [{"query": "Name a prime.", "answer": "Seven is a prime number."}] * 64,
        base_model_path=resolve_model("builtin:tiny-llama"),
        out_dir="/tmp/sft/model",
        cfg=TrainConfig(num_workers=2, max_steps=20, learning_rate=1e-3),
        metrics_path="/tmp/sft/metrics.jsonl",
    )
    print(result.first_loss, result.final_loss)

Inside a recipe the `engrave` stage calls it (`dromedary run <config>`); on a cluster, submit
that with `ray job submit --working-dir . -- dromedary run <config>`. Compiled DeepSpeed ops are
cached in `$TORCH_EXTENSIONS_DIR` (the first start on a machine compiles for ~1-4 minutes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dromedary_ray.algos.sft import (
    SFTExample,
    collate,
    data_parallel_loss,
    encode_records,
    masked_copy,
    plan_steps,
    step_targets,
    token_nll_sum,
)
from dromedary_ray.config import TrainConfig
from dromedary_ray.runtime.faults import fault_env, maybe_die

ENGINE_TAG = "engine"  # DeepSpeed's sub-folder inside each Ray Train checkpoint
STATE_FILE = "train_state.json"  # step, data position and loss curve, beside the engine state
PASSED_ENV = ("TORCH_EXTENSIONS_DIR", "DROMEDARY_HOME")  # compiled-op cache, model cache


@dataclass(frozen=True)
class TrainResult:
    first_loss: float  # mean token loss of the first optimizer step
    final_loss: float  # ... of the last one
    steps: int
    tokens_per_second: float  # all workers' non-pad tokens / seconds spent in training steps
    seconds: float  # wall time of the last attempt's loop (restore, steps, checkpoints, save)
    resumed_from_step: int  # 0 when the last attempt started fresh
    loss_curve: list[tuple[int, float]]  # (step, loss), one entry per step, across restarts
    examples: int = 0
    dropped_prompt_too_long: list[tuple[int, int]] = field(default_factory=list)  # (pos, len)
    truncated: int = 0
    trainable_params: int = 0
    total_params: int = 0
    worker_peak_rss_mib: float = 0.0  # rank 0's peak resident memory
    model_dir: str = ""


def train_sft(records: list[dict[str, str]], *, base_model_path: str, out_dir: str,
              cfg: TrainConfig, metrics_path: str | None = None, run_name: str = "sft",
              probe_path: str | None = None) -> TrainResult:
    """Fine-tune `base_model_path` on (query, answer) records; write a HF folder to `out_dir`.

    Checkpoints go to `<out_dir>/../ray_train/<run_name>` and TensorBoard logs to
    `<out_dir>/../tensorboard`. A second call with the same folders resumes from the latest
    checkpoint (Ray Train restores a run by name), refused if the data or config differ.
    `probe_path`: rank 0 saves the trained model's logits on the first example there, to check
    that the saved folder reproduces them.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoTokenizer

    if "://" in out_dir:
        raise ValueError(f"training writes to a local folder; got {out_dir!r}")
    out = Path(out_dir).expanduser().resolve()
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    data = encode_records(tokenizer, records, cfg.max_seq_len)
    if not data.examples:
        raise ValueError(f"no example fits max_seq_len={cfg.max_seq_len} "
                         f"({len(records)} records, all prompts too long)")
    examples = [(e.input_ids, e.labels) for e in data.examples]
    fingerprint = _run_fingerprint(examples, cfg, base_model_path)
    _refuse_foreign_checkpoints(out.parent / "ray_train" / run_name, fingerprint)
    loop_config = {
        "examples": examples,
        "base_model_path": base_model_path,
        "out_dir": str(out),
        "train": cfg,
        "metrics_path": metrics_path,
        "tensorboard_dir": str(out.parent / "tensorboard"),
        "probe_path": probe_path,
        "fingerprint": fingerprint,
        "env": {**fault_env(), **{k: os.environ[k] for k in PASSED_ENV if k in os.environ}},
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
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
    stats = result.return_value
    return TrainResult(
        **{k: stats[k] for k in ("first_loss", "final_loss", "steps", "tokens_per_second",
                                  "seconds", "resumed_from_step", "trainable_params",
                                  "total_params", "worker_peak_rss_mib")},
        loss_curve=[(int(s), float(v)) for s, v in stats["loss_curve"]],
        examples=len(examples), dropped_prompt_too_long=data.dropped, truncated=data.truncated,
        model_dir=str(out),
    )


# Settings that change how a run is watched or retried, not what it computes.
NOT_FINGERPRINTED = ("max_failures", "log_every_steps", "checkpoint_every_steps")


def _run_fingerprint(examples: list[Any], cfg: TrainConfig, base: str) -> str:
    """What a checkpoint must match to be resumed: the data, the config and the base model."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    blob = json.dumps([examples, settings, base], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _refuse_foreign_checkpoints(run_path: Path, fingerprint: str) -> None:
    """Fail before any worker starts if the run folder holds another run's checkpoints.

    Ray Train resumes a run by name; the workers check too, but there every restart would
    fail the same way until `max_failures` is spent.
    """
    for state_file in sorted(run_path.glob(f"*/{STATE_FILE}")):
        if json.loads(state_file.read_text()).get("fingerprint") != fingerprint:
            raise ValueError(f"{state_file.parent} is a checkpoint of a run with other data or "
                             f"config; remove {run_path} or train into another out_dir")


# --- the worker loop ---------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: build the engine, resume, run the planned steps, save the model."""
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
    examples = [SFTExample(list(ids), list(labels)) for ids, labels in config["examples"]]
    plan = plan_steps(len(examples), world_size=world, micro_batch_size=cfg.micro_batch_size,
                      grad_accum=cfg.gradient_accumulation_steps, epochs=cfg.epochs,
                      seed=cfg.seed, max_steps=cfg.max_steps)
    started = time.perf_counter()
    engine, counts, tokenizer = _build_engine(config["base_model_path"], cfg, len(plan))
    state = _restore(engine, config["fingerprint"])
    log = (StepLog(config["metrics_path"], config["tensorboard_dir"], cfg.log_every_steps)
           if rank == 0 else None)
    train_seconds, tokens = 0.0, 0
    for step in range(state["step"], len(plan)):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]
        loss = _train_step(engine, plan[step], examples, tokenizer.pad_token_id, rank, world)
        step_tokens = sum(len(examples[i].input_ids)
                          for rnd in plan[step] for shard in rnd for i in shard)
        seconds = time.perf_counter() - t0
        train_seconds, tokens = train_seconds + seconds, tokens + step_tokens
        state["step"] = step + 1
        state["curve"].append([step + 1, loss])
        if log is not None:
            log.write(step + 1, loss, lr, step_tokens, seconds)
            maybe_die("train_step")  # fault-injection point of the reliability tests
        if (step + 1) % cfg.checkpoint_every_steps == 0 and step + 1 < len(plan):
            _save_checkpoint(engine, state, rank)
    if config["probe_path"]:
        _save_probe(engine, examples[0], config["probe_path"], rank)
    _save_model(engine, cfg, config["base_model_path"], tokenizer, config["out_dir"], rank)
    if log is not None:
        log.close()
    if rank != 0:
        return None
    return _final_stats(state, counts, tokens, train_seconds, time.perf_counter() - started)


def _final_stats(state: dict[str, Any], counts: dict[str, int], tokens: int,
                 train_seconds: float, seconds: float) -> dict[str, Any]:
    import resource

    curve = state["curve"]
    return {
        "first_loss": curve[0][1], "final_loss": curve[-1][1], "steps": state["step"],
        "tokens_per_second": tokens / train_seconds if train_seconds else 0.0,
        "seconds": seconds, "resumed_from_step": state["resumed_from_step"],
        "loss_curve": curve, **counts,
        # ru_maxrss is in KiB on Linux.
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _load_model(base_model_path: str, cfg: TrainConfig) -> tuple[Any, dict[str, int]]:
    """The transformers model, LoRA-wrapped when asked; and its parameter counts."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype)
    model.config.use_cache = False  # no KV cache in training; it also conflicts with checkpointing
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))  # freezes every non-adapter weight
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings would cut the graph
    counts = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total_params": sum(p.numel() for p in model.parameters())}
    return model, counts


def lora_config(cfg: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")


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


def _build_engine(base_model_path: str, cfg: TrainConfig,
                  total_steps: int) -> tuple[Any, dict[str, int], Any]:
    import deepspeed
    from transformers import AutoTokenizer

    model, counts = _load_model(base_model_path, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The process group already exists (Ray Train made it); DeepSpeed joins it.
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable,
                                      config=deepspeed_config(cfg, total_steps,
                                                              model.config.hidden_size))
    engine.train()
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    if tokenizer.pad_token_id is None:  # padding is masked out, any id will do
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return engine, counts, tokenizer


def _train_step(engine: Any, step: list[list[list[int]]], examples: list[SFTExample],
                pad_id: int, rank: int, world: int) -> float:
    """One optimizer step over this rank's micro-batches; returns the step's global mean loss.

    Each micro-batch is back-propagated as soon as it is computed (memory stays one micro-batch
    deep); the accumulation boundary is set by hand because an epoch's last step may hold
    fewer rounds than `gradient_accumulation_steps`.
    """
    import torch
    import torch.distributed as dist

    targets = step_targets(step, examples)
    nll_total = torch.zeros((), dtype=torch.float64)
    for j, rnd in enumerate(step):
        shard = [examples[i] for i in rnd[rank]] or [masked_copy(examples[0])]
        batch = {k: v.to(engine.device) for k, v in collate(shard, pad_id).items()}
        engine.set_gradient_accumulation_boundary(j == len(step) - 1)
        logits = engine(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits
        nll, _ = token_nll_sum(logits, batch["labels"])
        engine.backward(data_parallel_loss(nll, targets, world), scale_wrt_gas=False)
        nll_total += nll.detach().double().cpu()
    engine.step()
    nll_total = nll_total.to(engine.device)
    dist.all_reduce(nll_total)  # one scalar per step: the exact global mean for the log
    return float(nll_total) / max(targets, 1)


def _restore(engine: Any, fingerprint: str) -> dict[str, Any]:
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


def _save_checkpoint(engine: Any, state: dict[str, Any], rank: int) -> None:
    """Every rank saves its ZeRO partition into its own folder; Ray Train merges the folders
    into one checkpoint.

    `report` returns once the files are uploaded, but the controller registers the checkpoint
    only when it next polls the workers: a worker killed in between would restart from the
    checkpoint before. Rank 0 therefore waits until the controller has committed it.
    """
    import ray.train

    with tempfile.TemporaryDirectory(prefix="sft-ckpt-") as folder:
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


def _save_probe(engine: Any, example: SFTExample, path: str, rank: int) -> None:
    """Logits of the trained (still distributed) model on one fixed input; every rank joins
    because ZeRO-3 gathers each layer's weights collectively during the forward."""
    import torch

    ids = torch.tensor([example.input_ids], device=engine.device)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=ids).logits.float().cpu()
    engine.train()
    if rank == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"input_ids": ids.cpu(), "logits": logits}, path)


def _save_model(engine: Any, cfg: TrainConfig, base_model_path: str, tokenizer: Any,
                out_dir: str, rank: int) -> None:
    """Gather the weights (a collective under ZeRO-3) and write a Hugging Face folder.

    Rank 0 writes into a temporary sibling and renames it, so a crash mid-save never leaves a
    folder that looks like a finished model (`resolve_model("run:...")` trusts config.json).
    """
    import torch.distributed as dist

    if cfg.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        engine.module.config.use_cache = True  # turned off for training; generation wants it
        tmp = f"{out_dir}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.method == "lora":
            _write_lora(state_dict, cfg, base_model_path, tmp)
        else:
            engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    dist.barrier()  # no rank leaves (and lets Ray end the run) before the folder is in place


def _write_lora(state_dict: dict[str, Any], cfg: TrainConfig, base_model_path: str,
                out_dir: str) -> None:
    """Rebuild the peft model on rank 0 from the gathered weights; merge or keep the adapter.

    Under ZeRO-3 each rank holds a slice of every tensor, so merging needs whole tensors: a
    fresh model with the gathered state dict is the simplest holder of them.
    """
    model, _ = _load_model(base_model_path, dataclasses.replace(cfg, gradient_checkpointing=False))
    model.load_state_dict(state_dict, strict=True)
    model.config.use_cache = True
    if cfg.merge_lora:
        # Plain weights: transformers and vLLM load the folder with no peft installed.
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)  # adapter_config.json + weights


class StepLog:
    """Rank 0's per-step log: JSON lines (step, loss, lr, tokens, seconds) and TensorBoard.

    A resumed run appends, so steps after the last checkpoint appear twice; the later line
    is the one that counts (`TrainResult.loss_curve` holds each step once).
    """

    def __init__(self, metrics_path: str | None, tensorboard_dir: str, echo_every: int):
        from tensorboardX import SummaryWriter  # torch's own writer needs the tensorboard package

        self.echo_every, self.file = echo_every, None
        if metrics_path:
            Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(metrics_path, "a")  # noqa: SIM115 - lives as long as the loop
        self.writer = SummaryWriter(logdir=tensorboard_dir)

    def write(self, step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        line = {"step": step, "loss": loss, "lr": lr, "tokens": tokens, "seconds": seconds}
        if self.file is not None:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()  # a killed worker still leaves every finished step on disk
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/tokens_per_second", tokens / max(seconds, 1e-9), step)
        if step % self.echo_every == 0:  # Ray forwards worker stdout to the driver's console
            print(f"[sft] step {step} loss {loss:.4f} lr {lr:.2e} "
                  f"{tokens / max(seconds, 1e-9):.0f} tok/s", flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.writer.close()
