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
The Ray Train and DeepSpeed machinery (engine, plan, checkpoints, saving) is shared with the
reward-model trainer in `runtime/train_common.py`; this module holds the SFT data and step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dromedary_ray.algos.sft import (
    SFTExample,
    StepPlan,
    collate,
    data_parallel_loss,
    encode_records,
    masked_copy,
    step_targets,
    token_nll_sum,
)
from dromedary_ray.config import TrainConfig
from dromedary_ray.runtime.train_common import (
    StepLog,
    StepOutcome,
    Worker,
    final_stats,
    fit,
    local_out_dir,
    loop_config,
    refuse_foreign_checkpoints,
    run_fingerprint,
    run_steps,
    save_model,
    start_worker,
)


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
    from dromedary_ray.runtime.train_common import load_tokenizer

    out = local_out_dir(out_dir)
    data = encode_records(load_tokenizer(base_model_path), records, cfg.max_seq_len)
    if not data.examples:
        raise ValueError(f"no example fits max_seq_len={cfg.max_seq_len} "
                         f"({len(records)} records, all prompts too long)")
    examples = [(e.input_ids, e.labels) for e in data.examples]
    fingerprint = run_fingerprint(examples, cfg, base_model_path)
    refuse_foreign_checkpoints(out.parent / "ray_train" / run_name, fingerprint)
    config = loop_config(base_model_path=base_model_path, out=out, cfg=cfg,
                         fingerprint=fingerprint, metrics_path=metrics_path,
                         examples=examples, probe_path=probe_path)
    stats = fit(train_loop_per_worker, config, cfg, out, run_name)
    return TrainResult(
        **{k: stats[k] for k in ("first_loss", "final_loss", "steps", "tokens_per_second",
                                  "seconds", "resumed_from_step", "trainable_params",
                                  "total_params", "worker_peak_rss_mib")},
        loss_curve=[(int(s), float(v)) for s, v in stats["loss_curve"]],
        examples=len(examples), dropped_prompt_too_long=data.dropped, truncated=data.truncated,
        model_dir=str(out),
    )


# --- the worker loop ---------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: build the engine, resume, run the planned steps, save the model."""
    examples = [SFTExample(list(ids), list(labels)) for ids, labels in config["examples"]]
    w = start_worker(config, len(examples), head="causal_lm")
    cfg = w.cfg
    log = (StepLog(config["metrics_path"], config["tensorboard_dir"], cfg.log_every_steps)
           if w.rank == 0 else None)

    def step_fn(step: StepPlan) -> StepOutcome:
        loss = _train_step(w, step, examples)
        tokens = sum(len(examples[i].input_ids) for rnd in step for shard in rnd for i in shard)
        return StepOutcome((loss,), {"loss": loss}, tokens)

    tokens, train_seconds = run_steps(w, step_fn, log)
    if config["probe_path"]:
        _save_probe(w.engine, examples[0], config["probe_path"], w.rank)
    save_model(w, config["base_model_path"], config["out_dir"])
    if log is not None:
        log.close()
    return final_stats(w, tokens, train_seconds) if w.rank == 0 else None


def _train_step(w: Worker, step: StepPlan, examples: list[SFTExample]) -> float:
    """One optimizer step over this rank's micro-batches; returns the step's global mean loss.

    Each micro-batch is back-propagated as soon as it is computed (memory stays one micro-batch
    deep); the accumulation boundary is set by hand because an epoch's last step may hold
    fewer rounds than `gradient_accumulation_steps`.
    """
    import torch
    import torch.distributed as dist

    engine, pad_id = w.engine, w.tokenizer.pad_token_id
    targets = step_targets(step, examples)
    nll_total = torch.zeros((), dtype=torch.float64)
    for j, rnd in enumerate(step):
        shard = [examples[i] for i in rnd[w.rank]] or [masked_copy(examples[0])]
        batch = {k: v.to(engine.device) for k, v in collate(shard, pad_id).items()}
        engine.set_gradient_accumulation_boundary(j == len(step) - 1)
        logits = engine(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits
        nll, _ = token_nll_sum(logits, batch["labels"])
        engine.backward(data_parallel_loss(nll, targets, w.world), scale_wrt_gas=False)
        nll_total += nll.detach().double().cpu()
    engine.step()
    nll_total = nll_total.to(engine.device)
    dist.all_reduce(nll_total)  # one scalar per step: the exact global mean for the log
    return float(nll_total) / max(targets, 1)


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
