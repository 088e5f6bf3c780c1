"""Settings shared by the end-to-end tests that run whole recipes on `builtin:tiny-llama`.

The random model writes word salad that never ends a list item or an answer by itself, so every
phase stops it at a capital letter (a real stop-string setting) and the length filters are
relaxed: those tests assert the plumbing (tables, models, manifests, skips), not quality.
"""

import os
import string
import subprocess
import sys

STOP = "[" + ",".join(string.ascii_uppercase) + "]"


def train(steps: int) -> list[str]:
    """A few tiny optimizer steps on two Ray Train workers (prefix each with `<section>.train.`)."""
    return [f"max_steps={steps}", "num_workers=2", "micro_batch_size=2", "max_seq_len=64",
            f"checkpoint_every_steps={min(2, steps)}", "learning_rate=0.001", "warmup_ratio=0.0"]


def tiny_synthesis(max_model_len: int) -> list[str]:
    """The tiny model on one small engine, and a synthesize stage of a few short prompts."""
    return [
        "model=builtin:tiny-llama", "engine.batch_size=8", f"engine.max_model_len={max_model_len}",
        "engine.kv_cache_gib=1", "engine.cpus_per_engine=1",
        "synthesize.min_words=1",
        "synthesize.self_instruct.target_count=6",
        "synthesize.self_instruct.requests_per_round=4",
        "synthesize.self_instruct.instructions_per_request=2",
        "synthesize.self_instruct.max_rounds=2",
        "synthesize.self_instruct.sampling.max_new_tokens=8",
        f"synthesize.self_instruct.sampling.stop={STOP}",
        "synthesize.red_team.topics_per_type=1", "synthesize.red_team.topics_per_request=2",
        "synthesize.red_team.brainstorm_rounds=1", "synthesize.red_team.require_question=false",
        "synthesize.red_team.sampling.max_new_tokens=8",
        f"synthesize.red_team.sampling.stop={STOP}",
    ]


def dromedary(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `dromedary` command in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "dromedary_ray.cli", *args],
                          env=env or dict(os.environ), capture_output=True, text=True,
                          timeout=1500)


def tiny_dromedary(train_steps: int = 4) -> list[str]:
    """The whole `dromedary` recipe on the tiny model: a few prompts, short answers, a few
    optimizer steps per fine-tune (tests/test_recipe.py, tests/test_autoscale.py)."""
    steps = train(train_steps)
    return [
        "recipe=dromedary", *tiny_synthesis(3072),
        "self_align.min_answer_words=1", "self_align.max_thought_tokens=24",
        "self_align.sampling.max_new_tokens=24", f"self_align.sampling.stop={STOP}",
        "verbose_clone.min_answer_words=1", "verbose_clone.sampling.max_new_tokens=24",
        f"verbose_clone.sampling.stop={STOP}",
        *[f"engrave.train.{t}" for t in steps], *[f"verbose_clone.train.{t}" for t in steps],
    ]
