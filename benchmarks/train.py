"""Training throughput, side by side in one run: the engrave loop (Ray Train + DeepSpeed ZeRO-3,
2 CPU workers) against a plain single-process PyTorch loop (AdamW).

    python benchmarks/train.py [--model builtin:smollm2-135m] [--steps 24] [--micro-batch 4]
                               [--max-seq-len 256] [--workers 2]

Same model, same (query, answer) data (the shipped seed tasks with their reference outputs, in
the model's chat format, loss on answer tokens), same micro-batch per process, same sequence
limit, same number of optimizer steps. The rate is non-pad tokens per second over the optimizer
steps only (model load, worker start and DeepSpeed set-up excluded from both; the Ray figure
counts both workers' tokens). Target on a 2-core CPU: Ray/plain >= 0.7x.
Peak memory: the driver's ru_maxrss after each part; rank 0's own ru_maxrss from inside the loop.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

from dromedary_ray.config import RayConfig, TrainConfig, resolve_path
from dromedary_ray.models import resolve_model


def seed_records(path: str = "principles/seed_tasks.jsonl") -> list[dict[str, str]]:
    records = []
    for line in resolve_path(path).read_text().splitlines():
        if not line.strip():
            continue
        task = json.loads(line)
        inst = task["instances"][0]
        query = task["instruction"] + (f"\n\n{inst['input']}" if inst["input"] else "")
        records.append({"query": query, "answer": inst["output"]})
    return records


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def plain_loop(model_path: str, records: list[dict[str, str]], cfg: TrainConfig,
               threads: int) -> tuple[int, float, float]:
    """The baseline: one process, torch AdamW, the same examples in the same kind of batches.
    Returns (tokens, seconds over the steps, last loss)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dromedary_ray.algos.sft import collate, encode_records, plan_steps, token_nll_sum

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples = encode_records(tokenizer, records, cfg.max_seq_len).examples
    plan = plan_steps(len(examples), world_size=1, micro_batch_size=cfg.micro_batch_size,
                      grad_accum=1, epochs=cfg.epochs, seed=cfg.seed, max_steps=cfg.max_steps)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay)
    tokens, loss = 0, float("nan")
    start = time.perf_counter()
    for step in plan:
        (shard,) = step[0]
        batch = collate([examples[i] for i in shard], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, count = token_nll_sum(logits, batch["labels"])
        (nll / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        loss = nll.item() / count
    return tokens, time.perf_counter() - start, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from dromedary_ray.runtime.cluster import connect
    from dromedary_ray.runtime.train import train_sft

    model_path = resolve_model(args.model)
    records = seed_records()
    cfg = TrainConfig(num_workers=args.workers, cpus_per_worker=1.0, zero_stage=3,
                      micro_batch_size=args.micro_batch, max_seq_len=args.max_seq_len,
                      max_steps=args.steps, epochs=10, learning_rate=2e-5,
                      checkpoint_every_steps=10**6, log_every_steps=max(1, args.steps // 4))
    connect(RayConfig())
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        t0 = time.perf_counter()
        ray_result = train_sft(records, base_model_path=model_path, out_dir=f"{tmp}/model",
                               cfg=cfg, metrics_path=f"{tmp}/metrics.jsonl")
        ray_wall = time.perf_counter() - t0
    driver_after_ray = peak_rss_mib()
    tokens, seconds, plain_loss = plain_loop(model_path, records, cfg,
                                             threads=int(args.workers * cfg.cpus_per_worker))
    plain_rate = tokens / seconds
    ratio = ray_result.tokens_per_second / plain_rate

    print(f"\nmodel {args.model}  steps {args.steps}  micro-batch {args.micro_batch}  "
          f"max_seq_len {args.max_seq_len}  examples {ray_result.examples}")
    print(f"ray train + deepspeed zero-3 ({args.workers} workers): "
          f"{ray_result.tokens_per_second:8.1f} tok/s  (final loss {ray_result.final_loss:.3f}; "
          f"end-to-end {ray_wall:.1f} s incl. worker start, set-up and save)")
    print(f"plain pytorch, 1 process, {int(args.workers * cfg.cpus_per_worker)} threads:    "
          f"{plain_rate:8.1f} tok/s  (final loss {plain_loss:.3f}; {seconds:.1f} s of steps)")
    print(f"ratio ray/plain: {ratio:.2f}x  (target >= 0.7x)")
    print(f"peak RSS: driver {driver_after_ray:.0f} MiB after the Ray run, "
          f"{peak_rss_mib():.0f} MiB after the plain loop; "
          f"Ray Train rank 0 worker {ray_result.worker_peak_rss_mib:.0f} MiB")


if __name__ == "__main__":
    main()
