"""Seconds per PPO step with each trainer on the same run: the one-process PyTorch trainer
against the DeepSpeed ZeRO-3 group (`ppo.trainer: deepspeed`), full weights and LoRA.

    python benchmarks/ppo_trainers.py [--model builtin:tiny-llama] [--steps 4] [--workers 2]

Same prompts, programmatic reward (response length), batch shape and sampling for every
variant; each variant is one `run_ppo` in a fresh run folder, its steps after the first
(start-up and DeepSpeed's first compiled-op load excluded) averaged per phase. On a 2-core
CPU the group's ranks share the cores with the engine: the figures show the cost of the
ZeRO-3 machinery (parameter gathers, gloo collectives, the synced safetensors folder), not a
speed-up; that comes with models that do not fit one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
from pathlib import Path

from dromedary_ray.config import EngineConfig, PPOConfig, PPOLoRAConfig, RayConfig, SamplingConfig
from dromedary_ray.data.schemas import PromptRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.models import resolve_model
from dromedary_ray.runtime.cluster import connect, shutdown
from dromedary_ray.runtime.ppo.loop import run_ppo

PHASES = ("step", "generate", "reference", "update", "sync")


def length_reward(prompts, responses, token_ids):
    return [float(len(t)) for t in token_ids]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          str(Path.home() / ".cache" / "dromedary-ray" / "torch_extensions"))
    model = resolve_model(args.model)
    prompts = [PromptRow(f"p{i}", "seed", f"Tell me about the number {i}.") for i in range(32)]
    base = PPOConfig(steps=args.steps, prompts_per_step=args.prompts_per_step,
                     mini_batch_size=args.prompts_per_step // 2, ppo_epochs=1,
                     learning_rate=1e-5, value_init="policy", checkpoint_every_steps=1000,
                     sampling=SamplingConfig(temperature=1.0, top_p=1.0,
                                             max_new_tokens=args.new_tokens))
    group = dict(trainer="deepspeed", trainer_workers=args.workers)
    variants = {"torch": base, "deepspeed": dataclasses.replace(base, **group),
                "torch-lora": dataclasses.replace(base, lora=PPOLoRAConfig(rank=8)),
                "deepspeed-lora": dataclasses.replace(base, lora=PPOLoRAConfig(rank=8), **group)}
    connect(RayConfig(num_cpus=args.workers + 2))
    try:
        for name, cfg in variants.items():
            with tempfile.TemporaryDirectory(prefix="ppo-bench-") as run_dir:
                result = run_ppo(prompts, policy_path=model, reward=length_reward, cfg=cfg,
                                 engine=EngineConfig(max_model_len=256, kv_cache_gib=1),
                                 store=StageStore(run_dir, "ppo"))
            steady = result.step_metrics[1:] or result.step_metrics
            shown = "  ".join(f"{p} {statistics.mean(r[f'seconds_{p}'] for r in steady):.2f}s"
                              for p in PHASES)
            print(f"[bench] {name:15s} {shown}", flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
