"""RL throughput, side by side in one run: our PPO loop (vLLM rollout actor, reward actor,
PyTorch trainer actor on Ray) against TRL's `GRPOTrainer`; then the judging stage's two ways to
read a verdict (issue 4's benchmark).

    python benchmarks/rl.py [--model builtin:smollm2-135m] [--prompts-per-step 4] [--samples 4]
                            [--new-tokens 32] [--steps 4] [--judge-pairs 8]

Needs the `bench` extra (`pip install -e .[bench]`: TRL and `datasets`).

RL, same on both sides: model (fp32), prompts (steps x prompts-per-step seed instructions as
one chat turn, each drawn once per run; the order differs), the reward function
(`common_token_share` on the response token ids, EOS included), the batch shape (prompts per
step x samples per prompt: our `advantage: group` with `samples_per_prompt` = TRL's
`num_generations`; each batch cut into `--minibatches` optimizer steps, one pass over it, so
both compute old-policy log-probs), max new tokens, temperature 1.0, top-p 1.0, learning rate,
a frozen reference model run every step (our `kl_coef` = TRL's `beta`), 2 threads per phase.
Steady state: the steps after `--warmup` (model load, engine and Ray start-up excluded), from
the per-phase seconds our loop records and TRL's step-end times; end to end: from before Ray
starts / the model loads to the end of training (ours also writes a checkpoint and the model).

What differs, by design or left in: generation (vLLM in a Ray actor vs TRL's `generate` on the
training model: the point of the comparison); ours syncs weights to the engine every step and
writes each step's rollouts, TRL needs neither; the KL (ours: k1 summed into the sequence
reward; TRL: k3 per token in the loss); group std epsilon (1e-6 vs 1e-4); AdamW weight decay
(0.01 vs 0) and TRL's linear learning-rate decay; the sampling RNG, so responses differ (tokens/s
accounts for their lengths). Both run on the same two cores: other jobs on them move both
figures a lot, so read the printed load averages.

Judging, same engine (vLLM, fp32) and prompts: each pair under `principles_per_pair` single
principles, both orders. Log-probs: the preferences stage's own `JudgeTask` (one forward pass
per order; the next token's log p(A) and log p(B)). Text: `--judge-tokens` greedy tokens after the
same prompt, the letter parsed from them. The prefix cache is emptied before every timed call.

Target (2-core CPU): our loop's steady-state prompts/s >= 1.5x TRL's. No target for judging:
its ratio is printed for the record.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field

from dromedary_ray.models import resolve_model
from dromedary_ray.principles import load_seed_tasks

SEED_FILE = "principles/seed_tasks.jsonl"
# The first eighth of SmolLM2's 49,152-token vocabulary (the tiny model shares it): the most
# frequent BPE tokens. A dense, length-neutral reward, so neither side's learning changes how
# long its responses are (and with it the throughput) during a short run.
COMMON_IDS = 6144


def common_token_share(token_ids: list[list[int]]) -> list[float]:
    """The reward: the share of each response's tokens among the common ids."""
    return [sum(t < COMMON_IDS for t in ids) / max(len(ids), 1) for ids in token_ids]


def ours_reward(prompts, responses, token_ids):  # our RewardFn signature
    return common_token_share(token_ids)


def trl_reward_counting(calls: list[tuple[int, float]]):
    """TRL's reward signature around the same function; records each call's generated tokens
    and mean reward (one call per generation batch)."""

    def common_token_share_trl(prompts, completions, completion_ids, **kwargs):
        rewards = common_token_share(completion_ids)
        calls.append((sum(len(ids) for ids in completion_ids), statistics.mean(rewards)))
        return rewards

    return common_token_share_trl


@dataclass
class RLResult:
    name: str
    steady_seconds: float  # the steps after the warm-up
    steady_prompts: int
    steady_tokens: int
    end_to_end_seconds: float  # from before the model load / Ray start to the end of training
    total_prompts: int
    total_tokens: int
    phases: dict[str, float] = field(default_factory=dict)  # mean seconds per steady step
    rewards: list[float] = field(default_factory=list)  # mean reward per step
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at start and end

    @property
    def rates(self) -> tuple[float, float, float]:
        """Steady prompts/s, steady generated tokens/s, end-to-end prompts/s."""
        return (self.steady_prompts / self.steady_seconds,
                self.steady_tokens / self.steady_seconds,
                self.total_prompts / self.end_to_end_seconds)


# --- our loop ------------------------------------------------------------------------------


def run_ours(args, model: str, queries: list[str]) -> RLResult:
    from dromedary_ray.config import EngineConfig, PPOConfig, RayConfig, SamplingConfig
    from dromedary_ray.data.schemas import PromptRow
    from dromedary_ray.data.store import StageStore
    from dromedary_ray.runtime.cluster import connect, shutdown
    from dromedary_ray.runtime.ppo.loop import run_ppo

    batch = args.prompts_per_step * args.samples
    cfg = PPOConfig(
        steps=args.steps, prompts_per_step=args.prompts_per_step, samples_per_prompt=args.samples,
        advantage="group", ppo_epochs=1, mini_batch_size=batch // args.minibatches,
        learning_rate=args.lr, kl_coef=args.kl, value_init="policy", length_bonus_per_token=0.0,
        max_bonus=None, unfinished_penalty=0.0, checkpoint_every_steps=args.steps,
        sampling=SamplingConfig(temperature=args.temperature, top_p=1.0,
                                max_new_tokens=args.new_tokens))
    engine = EngineConfig(max_model_len=1024, kv_cache_gib=1, cpus_per_engine=args.threads)
    prompts = [PromptRow(f"q{i}", "seed", q) for i, q in enumerate(queries)]
    load, start = os.getloadavg()[0], time.perf_counter()
    # The rollout engine and the trainer each claim `threads` CPUs; they run one after the
    # other, so the logical count is twice the cores they share.
    connect(RayConfig(num_cpus=2 * args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        result = run_ppo(prompts, policy_path=model, reward=ours_reward, cfg=cfg, engine=engine,
                         store=StageStore(tmp, "rl-bench"))
    wall = time.perf_counter() - start
    shutdown()
    rows = result.step_metrics
    steady = rows[args.warmup:]
    tokens = [round(r["response_length"] * batch) for r in rows]
    # The loop's own phases; the last step's checkpoint is outside them (end to end only).
    phases = {k.removeprefix("seconds_"): statistics.mean(r[k] for r in steady)
              for k in steady[0] if k.startswith("seconds_")
              and k not in ("seconds_step", "seconds_checkpoint")}
    return RLResult("ours (vLLM + Ray actors)", sum(r["seconds_step"] for r in steady),
                    len(steady) * args.prompts_per_step, sum(tokens[args.warmup:]), wall,
                    len(rows) * args.prompts_per_step, sum(tokens), phases,
                    [r["score_mean"] for r in rows], (load, os.getloadavg()[0]))


# --- TRL -----------------------------------------------------------------------------------


def trl_clock():
    """A callback with the train-begin time and each optimizer step's end time."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.ends = 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return Clock()


def time_method(obj, name: str, seconds: dict[str, list[float]]) -> None:
    """Wrap `obj.name` so that each call's wall time is appended to `seconds[name]`."""
    inner = getattr(obj, name)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            seconds[name].append(time.perf_counter() - t0)

    setattr(obj, name, timed)


def run_trl(args, model: str, queries: list[str]) -> RLResult:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    batch = args.prompts_per_step * args.samples
    out_dir = tempfile.TemporaryDirectory(prefix="trl-bench-")  # nothing is saved there
    config = GRPOConfig(
        output_dir=out_dir.name, use_cpu=True, bf16=False,
        gradient_checkpointing=False,  # TRL's default is on: it would recompute every forward
        per_device_train_batch_size=batch // args.minibatches,
        steps_per_generation=args.minibatches, gradient_accumulation_steps=1, num_iterations=1,
        num_generations=args.samples, max_completion_length=args.new_tokens,
        temperature=args.temperature, top_p=1.0, learning_rate=args.lr, beta=args.kl,
        max_steps=args.steps * args.minibatches, logging_steps=args.steps * args.minibatches,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"})
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in queries])
    calls: list[tuple[int, float]] = []
    clock, seconds = trl_clock(), defaultdict(list)
    load, start = os.getloadavg()[0], time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward_counting(calls), args=config,
                          train_dataset=data, callbacks=[clock])
    for name in ("_generate_and_score_completions", "_generate", "_calculate_rewards"):
        time_method(trainer, name, seconds)
    trainer.train()
    wall = time.perf_counter() - start
    marks = [clock.begin, *clock.ends[args.minibatches - 1::args.minibatches]]
    cycles = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    w = args.warmup
    gen, rew, prep = (seconds[k][w:] for k in ("_generate", "_calculate_rewards",
                                               "_generate_and_score_completions"))
    phases = {"generate": statistics.mean(gen), "score": statistics.mean(rew),
              "reference": statistics.mean(p - g - r for p, g, r in zip(prep, gen, rew,
                                                                          strict=True)),
              "update": statistics.mean(c - p for c, p in zip(cycles[w:], prep, strict=True))}
    tokens = [n for n, _ in calls]
    del trainer
    gc.collect()
    out_dir.cleanup()
    return RLResult("TRL GRPOTrainer (HF generate)", sum(cycles[w:]),
                    len(cycles[w:]) * args.prompts_per_step, sum(tokens[w:]), wall,
                    len(cycles) * args.prompts_per_step, sum(tokens), phases,
                    [r for _, r in calls], (load, os.getloadavg()[0]))


def print_rl(args, results: list[RLResult]) -> None:
    batch = args.prompts_per_step * args.samples
    print(f"\nRL: {args.model}, {args.steps} steps of {args.prompts_per_step} prompts x "
          f"{args.samples} samples ({batch} responses, {args.minibatches} optimizer steps each), "
          f"<= {args.new_tokens} new tokens, T={args.temperature}; steady state = steps "
          f"{args.warmup + 1}-{args.steps}")
    print(f"{'loop':<32}{'prompts/s':>10}{'tok/s':>9}{'s/step':>8}{'e2e prompts/s':>15}"
          f"{'e2e s':>8}")
    for r in results:
        prompts, tokens, e2e = r.rates
        steps = r.steady_prompts // args.prompts_per_step
        print(f"{r.name:<32}{prompts:>10.3f}{tokens:>9.1f}{r.steady_seconds / steps:>8.1f}"
              f"{e2e:>15.3f}{r.end_to_end_seconds:>8.1f}")
    ratio = [a / b for a, b in zip(results[0].rates, results[1].rates, strict=True)]
    print(f"ours / TRL: {ratio[0]:.2f}x prompts/s (target >= 1.5x), {ratio[1]:.2f}x tok/s; "
          f"end to end {ratio[2]:.2f}x prompts/s")
    for r in results:
        split = ", ".join(f"{k} {v:.2f}" for k, v in r.phases.items())
        print(f"  seconds per step, {r.name}: {split}")
        print(f"  mean reward per step: {' '.join(f'{x:.3f}' for x in r.rewards)}; machine load "
              f"average {r.load[0]:.1f} at the start, {r.load[1]:.1f} at the end")
    print("  (TRL's split: its _generate, _calculate_rewards, the rest of "
          "_generate_and_score_completions (reference and old-policy log-probs), and the rest "
          "of the step)")


# --- judging -------------------------------------------------------------------------------


def judge_pairs(n: int, pset) -> list:
    """Seed instructions with their reference output as reply A and the next task's (an
    off-topic reply) as B: a pair where the better reply is known."""
    from dromedary_ray.data.salmon_schemas import ResponsePairRow
    from dromedary_ray.salmon_principles import classify_prompt

    tasks = [t for t in load_seed_tasks(SEED_FILE) if t.output.strip()][: n + 1]
    return [ResponsePairRow(t.id, classify_prompt(t.query, pset), t.query, t.output,
                            tasks[i + 1].output) for i, t in enumerate(tasks[:n])]


def logprob_verdicts(task, engine, pairs) -> dict[str, str | None]:
    """(pair/principle) -> "a", "b" or None (the orders disagree), by the stage's JudgeTask."""
    from dromedary_ray.data.salmon_schemas import PreferenceRow, ResponsePairRow

    result = task.process(engine, ResponsePairRow.to_table(pairs))
    if result.rejects.num_rows:
        raise SystemExit("a judging prompt does not fit max_model_len")
    return {r.id: ("a" if r.score > 0 else "b") if r.consistent else None
            for r in PreferenceRow.from_table(result.kept)}


def text_verdicts(task, engine, pairs, sampling) -> tuple[dict[str, str | None], int]:
    """The same prompts, judged by generating a few tokens and parsing the letter; also the
    count of replies with no letter to parse."""
    from dromedary_ray.salmon_principles import render_judge_prompt

    first, second = task.pset.choices
    letter = re.compile(rf"\s*\(?\s*({re.escape(first)}|{re.escape(second)})\b")
    jobs = [(pair, p) for pair in pairs for p in task.principles(pair)]
    prompts = [text for pair, p in jobs for text in (
        render_judge_prompt(task.pset, p, pair.prompt, pair.response_a, pair.response_b),
        render_judge_prompt(task.pset, p, pair.prompt, pair.response_b, pair.response_a))]
    gens = engine.generate(prompts, sampling)
    picks = []
    for g in gens:
        m = letter.match(g.completions[0].text) if g.completions else None
        picks.append(m.group(1) if m else None)
    out, unreadable = {}, sum(p is None for p in picks)
    for j, (pair, p) in enumerate(jobs):
        fwd, bwd = picks[2 * j], picks[2 * j + 1]  # A shown first, then B shown first
        fwd_pref = {first: "a", second: "b"}.get(fwd)
        bwd_pref = {first: "b", second: "a"}.get(bwd)
        out[f"{pair.id}/{p.name}"] = fwd_pref if fwd_pref and fwd_pref == bwd_pref else None
    return out, unreadable


def count_exact_passes() -> list[int]:
    """Count the choices scored by the exact prompt-log-prob pass: `next_token_logprobs` falls
    back to it for a letter missing from vLLM's top 20, at the cost of a second prefill."""
    from dromedary_ray.eval import loglik

    counts: list[int] = []
    inner = loglik.VLLMScorer.loglik_ids

    def counted(self, pairs):
        counts.append(len(pairs))
        return inner(self, pairs)

    loglik.VLLMScorer.loglik_ids = counted
    return counts


def run_judging(args, model: str) -> None:
    from dromedary_ray.config import EngineConfig, PreferencesConfig, SamplingConfig
    from dromedary_ray.engines import make_engine
    from dromedary_ray.salmon_principles import load_salmon_principles
    from dromedary_ray.stages.preferences import JudgeTask

    cfg = PreferencesConfig()
    pset = load_salmon_principles(cfg.principles_file)
    pairs = judge_pairs(args.judge_pairs, pset)
    engine = make_engine(model, EngineConfig(max_model_len=2048, kv_cache_gib=1,
                                             cpus_per_engine=args.threads))
    task = JudgeTask(engine.tokenizer, cfg, pset)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=args.judge_tokens)
    paths = {"log-probs": lambda chunk: (logprob_verdicts(task, engine, chunk), 0),
             "text": lambda chunk: text_verdicts(task, engine, chunk, sampling)}
    exact = count_exact_passes()
    for path in paths.values():
        path(pairs[:1])  # warm-up, not timed
    exact.clear()
    seconds, verdicts, unreadable = dict.fromkeys(paths, 0.0), defaultdict(dict), defaultdict(int)
    for c, start in enumerate(range(0, len(pairs), args.judge_chunk)):
        chunk = pairs[start:start + args.judge_chunk]
        order = list(paths) if c % 2 == 0 else list(paths)[::-1]  # shared-machine load: both
        for name in order:
            engine.llm.reset_prefix_cache()
            t0 = time.perf_counter()
            got, bad = paths[name](chunk)
            seconds[name] += time.perf_counter() - t0
            verdicts[name].update(got)
            unreadable[name] += bad
    engine.close()
    print(f"\nJudging: {len(pairs)} pairs x {cfg.principles_per_pair} principles x 2 orders, "
          f"{args.model}, one vLLM engine; text = {args.judge_tokens} greedy tokens")
    rate = {k: len(pairs) / s for k, s in seconds.items()}
    for name in paths:
        v = verdicts[name]
        consistent = [x for x in v.values() if x is not None]
        right = sum(x == "a" for x in consistent)
        print(f"  {name:<10}{rate[name]:7.2f} pairs/s  consistent {len(consistent)}/{len(v)}  "
              f"of those preferring the on-topic reply {right}  unreadable {unreadable[name]}")
    print(f"  log-probs: {sum(exact)} of {len(pairs) * cfg.principles_per_pair * 4} choice "
          "log-probs needed the exact second pass (letter outside the top 20)")
    both = [k for k, x in verdicts["text"].items()
            if x is not None and verdicts["log-probs"].get(k) is not None]
    agree = sum(verdicts["text"][k] == verdicts["log-probs"][k] for k in both)
    print(f"  log-probs / text: {rate['log-probs'] / rate['text']:.2f}x pairs/s; on the "
          f"{len(both)} judgments consistent in both, the verdicts agree on {agree}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4, help="per prompt (TRL's num_generations)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of steady state")
    ap.add_argument("--minibatches", type=int, default=2, help="optimizer steps per batch")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--kl", type=float, default=0.01, help="our kl_coef and TRL's beta")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per phase, both loops")
    ap.add_argument("--judge-pairs", type=int, default=8, help="0 skips the judging comparison")
    ap.add_argument("--judge-chunk", type=int, default=4, help="pairs per timed call")
    ap.add_argument("--judge-tokens", type=int, default=4, help="tokens the text judge generates")
    args = ap.parse_args()
    batch = args.prompts_per_step * args.samples
    if args.samples < 2 or batch % args.minibatches:
        raise SystemExit("--samples must be >= 2 and --minibatches must divide the batch")
    if not 0 <= args.warmup < args.steps:
        raise SystemExit("--warmup must leave at least one step")

    model = resolve_model(args.model)
    # One prompt per step and slot, none repeated: both loops see the same set.
    queries = [t.query for t in load_seed_tasks(SEED_FILE)][: args.steps * args.prompts_per_step]
    results = [run_ours(args, model, queries), run_trl(args, model, queries)]
    print_rl(args, results)
    if args.judge_pairs:
        run_judging(args, model)


if __name__ == "__main__":
    main()
