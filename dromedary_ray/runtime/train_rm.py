"""Reward-model training on Ray Train with DeepSpeed (ZeRO-3 by default), full weights or LoRA.

SALMON's instructable reward model (Sun et al. 2023, §3.2): a scalar head on the init model
(`AutoModelForSequenceClassification`, one label: for LLaMA a linear `score` head read at the
last non-pad token) trained with the pairwise Bradley-Terry loss on (chosen, rejected) inputs
rendered by `algos.rm_data.example_texts`. The driver tokenises once; each worker walks the same
deterministic step plan as the SFT trainer, checkpoints every `cfg.checkpoint_every_steps` and
resumes after a killed worker (`runtime/train_common.py` holds that shared machinery). LoRA
trains the adapters and the score head (peft `modules_to_save`) and is merged on save, so the
folder loads with `AutoModelForSequenceClassification.from_pretrained` and on vLLM's reward
runner.

Launch (a local Ray cluster is started if none is running)::

    from dromedary_ray.config import TrainConfig
    from dromedary_ray.models import resolve_model
    from dromedary_ray.runtime.train_rm import train_reward_model

    result = train_reward_model(
        [("...Assistant reply:\\nShort.\\n...", "...Assistant reply:\\nLong...\\n...")] * 32,
        base_model_path=resolve_model("builtin:tiny-llama"),
        out_dir="/tmp/rm/model",
        cfg=TrainConfig(num_workers=2, max_steps=20, learning_rate=1e-3),
        metrics_path="/tmp/rm/rm_log.jsonl",
    )
    print(result.first_loss, result.final_loss, result.curve[-1])

Inside a recipe the `reward_model` stage calls it (`dromedary run <config>`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dromedary_ray.algos.rm_data import (
    RMPair,
    collate_pairs,
    encode_pairs,
    pairwise_sums,
    split_scores,
)
from dromedary_ray.algos.sft import StepPlan, data_parallel_loss
from dromedary_ray.config import TrainConfig
from dromedary_ray.runtime.train_common import (
    StepLog,
    StepOutcome,
    Worker,
    final_stats,
    fit,
    load_tokenizer,
    local_out_dir,
    loop_config,
    refuse_foreign_checkpoints,
    run_fingerprint,
    run_steps,
    save_model,
    start_worker,
)

HEAD = "score"


@dataclass(frozen=True)
class RMTrainResult:
    first_loss: float  # mean pairwise loss of the first optimizer step
    final_loss: float  # ... of the last one
    steps: int
    tokens_per_second: float  # all workers' non-pad tokens / seconds spent in training steps
    seconds: float  # wall time of the last attempt's loop (restore, steps, checkpoints, save)
    resumed_from_step: int  # 0 when the last attempt started fresh
    curve: list[tuple[int, float, float]]  # (step, loss, pairwise accuracy), across restarts
    examples: int = 0
    too_long: list[tuple[int, int]] = field(default_factory=list)  # (position, tokens)
    trainable_params: int = 0
    total_params: int = 0
    worker_peak_rss_mib: float = 0.0
    model_dir: str = ""


def train_reward_model(texts: Sequence[tuple[str, str]], *, base_model_path: str,
                       out_dir: str, cfg: TrainConfig, metrics_path: str | None = None,
                       run_name: str = "reward_model") -> RMTrainResult:
    """Train a scalar-head RM on (chosen text, rejected text) pairs; write a HF folder.

    Pairs with a side over `cfg.max_seq_len` tokens are skipped and listed in `too_long`.
    Checkpoints go to `<out_dir>/../ray_train/<run_name>`; a second call with the same folders
    resumes from the latest one, refused if the data or config differ. `metrics_path` gets one
    JSON line per step: step, loss, accuracy (of that step's pairs, before the update), pairs,
    lr, tokens, seconds.
    """
    out = local_out_dir(out_dir)
    tokenizer = load_tokenizer(base_model_path)
    data = encode_pairs(tokenizer, texts, cfg.max_seq_len, tokenizer.pad_token_id)
    if not data.pairs:
        raise ValueError(f"no pair fits max_seq_len={cfg.max_seq_len} ({len(texts)} pairs)")
    pairs = [(p.chosen_ids, p.rejected_ids) for p in data.pairs]
    fingerprint = run_fingerprint(pairs, cfg, f"{base_model_path}#{HEAD}")
    refuse_foreign_checkpoints(out.parent / "ray_train" / run_name, fingerprint)
    config = loop_config(base_model_path=base_model_path, out=out, cfg=cfg,
                         fingerprint=fingerprint, metrics_path=metrics_path, pairs=pairs)
    stats = fit(rm_loop_per_worker, config, cfg, out, run_name)
    return RMTrainResult(
        **{k: stats[k] for k in ("first_loss", "final_loss", "steps", "tokens_per_second",
                                  "seconds", "resumed_from_step", "trainable_params",
                                  "total_params", "worker_peak_rss_mib")},
        curve=[(int(s), float(loss), float(acc)) for s, loss, acc in stats["loss_curve"]],
        examples=len(pairs), too_long=data.too_long, model_dir=str(out),
    )


def rm_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: build the scored engine, resume, run the steps, save the model."""
    pairs = [RMPair(list(c), list(r)) for c, r in config["pairs"]]
    w = start_worker(config, len(pairs), head=HEAD)
    log = (StepLog(config["metrics_path"], config["tensorboard_dir"], w.cfg.log_every_steps,
                   tag="rm") if w.rank == 0 else None)

    def step_fn(step: StepPlan) -> StepOutcome:
        loss, accuracy, n = _rm_step(w, step, pairs)
        tokens = sum(pairs[i].tokens for rnd in step for shard in rnd for i in shard)
        return StepOutcome((loss, accuracy), {"loss": loss, "accuracy": accuracy, "pairs": n},
                           tokens)

    tokens, train_seconds = run_steps(w, step_fn, log)
    save_model(w, config["base_model_path"], config["out_dir"], head=HEAD)
    if log is not None:
        log.close()
    return final_stats(w, tokens, train_seconds) if w.rank == 0 else None


def _rm_step(w: Worker, step: StepPlan, pairs: list[RMPair]) -> tuple[float, float, int]:
    """One optimizer step; the global mean loss, pairwise accuracy and pair count of the step.

    As in SFT, each micro-batch is back-propagated at once with the step's global normaliser
    (its pairs over all ranks). A rank with no pairs left in a round still runs a forward on
    pair 0 with weight 0: ZeRO-3 gathers parameters collectively inside every forward.
    """
    import torch
    import torch.distributed as dist

    engine, pad_id = w.engine, w.tokenizer.pad_token_id
    n_pairs = sum(len(shard) for rnd in step for shard in rnd)
    totals = torch.zeros(2, dtype=torch.float64)  # loss sum, pairs ranked right
    for j, rnd in enumerate(step):
        mine = rnd[w.rank]
        shard, weight = ([pairs[i] for i in mine], 1.0) if mine else ([pairs[0]], 0.0)
        batch = {k: v.to(engine.device) for k, v in collate_pairs(shard, pad_id).items()}
        engine.set_gradient_accumulation_boundary(j == len(step) - 1)
        scores = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        chosen, rejected = split_scores(scores, len(shard))
        loss_sum, correct = pairwise_sums(chosen, rejected)
        engine.backward(data_parallel_loss(loss_sum * weight, n_pairs, w.world),
                        scale_wrt_gas=False)
        totals += torch.stack([loss_sum.detach().double().cpu(),
                               correct.double().cpu()]) * weight
    engine.step()
    totals = totals.to(engine.device)
    dist.all_reduce(totals)  # two scalars per step: the exact global means for the log
    loss, correct = totals.tolist()
    return loss / max(n_pairs, 1), correct / max(n_pairs, 1), n_pairs
