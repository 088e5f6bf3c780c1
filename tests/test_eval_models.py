"""The eval suites on the tiny random LLaMA: both scoring backends agree, the command runs."""

import json
import math
import os
import subprocess
import sys

import pytest

from dromedary_ray.config import EngineConfig
from dromedary_ray.eval import EvalOptions, run_eval
from dromedary_ray.eval.loglik import make_scorer, next_token_logprobs
from dromedary_ray.eval.pairwise import judge_messages
from dromedary_ray.prompts import render_chat

pytestmark = pytest.mark.slow

CFG = EngineConfig(max_model_len=256, kv_cache_gib=1, cpus_per_engine=1)
PAIRS = [
    ("Q: What is the capital of France?\nA: ", "Paris"),
    ("The cat sat on the", " mat and purred."),
    ("Human: hi\n\nAssistant:", " Hello! How can I help you today?"),
    ("1, 2, 3,", " 4"),
]


@pytest.fixture(scope="module")
def engines(tiny_model):
    from dromedary_ray.engines.hf_engine import HFEngine
    from dromedary_ray.engines.vllm_engine import VLLMEngine

    vllm_engine = VLLMEngine(tiny_model, CFG, seed=0)
    yield vllm_engine, HFEngine(tiny_model, CFG)
    vllm_engine.close()


def test_loglik_agrees_between_vllm_and_transformers(engines):
    vllm_engine, hf_engine = engines
    v = make_scorer(vllm_engine).loglik(PAIRS)
    h = make_scorer(hf_engine).loglik(PAIRS)
    assert v == pytest.approx(h, abs=1e-3)
    assert all(math.isfinite(x) and x < 0 for x in v)
    # Batched with padding equals one at a time: padding is invisible to the positions read.
    alone = [make_scorer(hf_engine).loglik([p])[0] for p in PAIRS]
    assert alone == pytest.approx(h, abs=1e-4)
    # The sum is over the continuation only: a longer continuation of the same text costs more.
    longer = make_scorer(vllm_engine).loglik([(PAIRS[1][0], " mat and purred loudly.")])[0]
    assert longer < v[1]


def test_next_token_choice_logprobs_agree(engines):
    vllm_engine, hf_engine = engines
    tok = hf_engine.tokenizer
    prompts = [render_chat(tok, judge_messages("Say hi.", "Hi!", "Go away.")),
               render_chat(tok, judge_messages("2+2?", "4", "5"))]
    v = next_token_logprobs(vllm_engine, prompts, ("A", "B"))
    h = next_token_logprobs(hf_engine, prompts, ("A", "B"))
    for rv, rh in zip(v, h, strict=True):
        assert rv["A"] == pytest.approx(rh["A"], abs=1e-3)
        assert rv["B"] == pytest.approx(rh["B"], abs=1e-3)
    # Same number as scoring the letter as a one-token continuation.
    assert make_scorer(hf_engine).loglik([(prompts[0], "A")])[0] == pytest.approx(h[0]["A"],
                                                                                  abs=1e-4)
    # A random model's letters are far from vLLM's top 20 (the exact fallback scored them);
    # its favourite next token is in the top 20 and is read from there: it agrees too.
    ids = tok(prompts[0], add_special_tokens=False).input_ids
    best = int(make_scorer(hf_engine).next_token([ids])[0].argmax())
    favourite = tok.decode([best])
    if tok(favourite, add_special_tokens=False).input_ids != [best]:
        pytest.skip(f"favourite token {favourite!r} does not survive decode/encode")
    v_top = next_token_logprobs(vllm_engine, prompts[:1], (favourite,))[0][favourite]
    h_top = next_token_logprobs(hf_engine, prompts[:1], (favourite,))[0][favourite]
    assert v_top == pytest.approx(h_top, abs=1e-3) and h_top > max(h[0].values())


def test_eval_command_hhh_json_end_to_end(tiny_model, tmp_path):
    cmd = [sys.executable, "-m", "dromedary_ray.cli", "eval", "builtin:tiny-llama", "--suite",
           "hhh", "--data", "tests/fixtures/eval/hhh", "--json", "--run-dir", str(tmp_path),
           "--max-model-len", "512"]
    out = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # stdout holds the JSON alone; vLLM's logs went to stderr
    m = result["metrics"]
    assert list(m) == ["harmless", "helpful", "honest", "other", "overall"]
    assert [m[k]["n"] for k in m] == [2, 2, 2, 1, 7]
    right = sum(row["correct"] for row in result["items"])
    assert m["overall"]["accuracy"] == pytest.approx(right / 7)
    assert "overall" in out.stderr  # the table
    saved = tmp_path / "eval" / "builtin-tiny-llama" / "hhh.json"
    assert json.loads(saved.read_text()) == result


def test_pairwise_and_ifeval_on_transformers(tiny_model):
    base = dict(model="builtin:tiny-llama", backend="transformers", max_new_tokens=8, limit=2,
                max_model_len=1024)
    result = run_eval(EvalOptions(suite="pairwise", other="builtin:tiny-llama",
                                  judge="builtin:tiny-llama",
                                  data="tests/fixtures/eval/pairwise/prompts.jsonl", **base))
    # Same model, greedy: identical answers, so whatever the judge's position bias, both
    # orders see the same text and every pair is a tie.
    assert result["metrics"]["overall"]["n"] == 2 and result["metrics"]["overall"]["tie"] == 2
    assert all(r["model_answer"] == r["other_answer"] for r in result["items"])
    result = run_eval(EvalOptions(suite="ifeval", **base))
    assert result["metrics"]["prompt_level"]["n"] == 2
    assert all(isinstance(r["response"], str) for r in result["items"])
    json.dumps(result, allow_nan=False)
