"""Peak memory and time of one PPO update of the one-process trainer, by `ppo.micro_batch_size`.

    python benchmarks/ppo_memory.py [--model builtin:smollm2-135m] [--micro 1 0]

The trainer (policy, critic from the policy, frozen reference, AdamW: all fp32) reads 16
rollouts shaped like a SALMON step on SmolLM2 (prompts of 34-52 tokens, responses of 11-256,
random token ids, seeded) and runs `configs/local.yaml`'s update (2 epochs of 8-row minibatches).
Each setting runs in a fresh process, so each peak RSS is that setting's own; `--micro 0` means
whole minibatches. The losses are printed too: micro-batches change the memory, not the update.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import dataclasses, json, random, resource, sys, time
from dromedary_ray.config import load_config, PROJECT_ROOT
from dromedary_ray.data.salmon_schemas import RolloutRow
from dromedary_ray.models import resolve_model
from dromedary_ray.runtime.ppo import loop as L
from dromedary_ray.runtime.ppo.trainer import PPOTrainer

model, micro = resolve_model(sys.argv[1]), int(sys.argv[2]) or None
config = load_config(PROJECT_ROOT / "configs" / "local.yaml")
cfg = dataclasses.replace(config.ppo, micro_batch_size=micro, value_init="policy")
rng = random.Random(0)
rows = []
for i in range(cfg.prompts_per_step):
    prompt = [rng.randrange(2, 49152) for _ in range(rng.randint(34, 52))]
    response = [rng.randrange(2, 49152) for _ in range(rng.choice([11, 21, 53, 66, 84, 160,
                                                                    218, 256]))]
    rows.append(RolloutRow(id=str(i), step=1, prompt_id=f"p{i}", sample=0,
                           prompt_type="general", prompt="q", response="r",
                           prompt_token_ids=prompt, response_token_ids=response,
                           logprobs=[0.0] * len(response), policy_logprobs=[],
                           ref_logprobs=[], values=[], advantages=[], returns=[],
                           principles=[], score=rng.uniform(-1, 1), reward=0.0, finished=True))
rollouts = RolloutRow.to_table(rows)
trainer = PPOTrainer(model, cfg, None, engine=config.engine)
t0 = time.perf_counter()
for name in ("policy_logprobs", "ref_logprobs", "values"):
    rollouts = L.with_column(rollouts, name, getattr(trainer, name)(rollouts))
rollouts = L.with_column(rollouts, "logprobs", rollouts["policy_logprobs"].to_pylist())
rollouts, _ = L.advantages(cfg, rollouts)
t1 = time.perf_counter()
out = trainer.update(rollouts, 1)
t2 = time.perf_counter()
print("RESULT " + json.dumps({
    "micro_batch_size": micro or cfg.mini_batch_size, "forward_s": round(t1 - t0, 1),
    "update_s": round(t2 - t1, 1),
    "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    "policy_loss": out["policy_loss"], "value_loss": out["value_loss"]}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 0],
                    help="micro-batch sizes to compare (0: whole minibatches)")
    args = ap.parse_args()
    results = []
    for micro in args.micro:
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(micro)],
                             capture_output=True, text=True)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(lines[0].removeprefix("RESULT ")))
    print(f"{'micro':>5} {'peak RSS GiB':>12} {'update s':>9} {'forwards s':>10}  policy loss"
          f"      value loss")
    for r in results:
        print(f"{r['micro_batch_size']:>5} {r['peak_rss_gib']:>12} {r['update_s']:>9} "
              f"{r['forward_s']:>10}  {r['policy_loss']:.9f}  {r['value_loss']:.7f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
