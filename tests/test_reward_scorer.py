"""engines/reward.py: vLLM's pooling runner and the transformers forward give the same scores
on a tiny LlamaForSequenceClassification, batched or not; over-long inputs are refused."""

import pytest

from dromedary_ray.config import EngineConfig
from dromedary_ray.errors import DromedaryError

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello there, how are you?",
    "A longer text about principles and responses, long enough to need padding in a batch "
    "next to the short ones around it.",
    "x",
    "Response: 4.\n\nPrinciples:\n1. Concise: Gets to the point.",
]


def _reference(folder: str, texts: list[str]) -> list[float]:
    """The model's own pooling, one unpadded text at a time."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return [float(model(**tok(t, return_tensors="pt")).logits[0, 0]) for t in texts]


def test_transformers_and_vllm_scores_match_the_models_own_pooling(tiny_reward_model):
    from dromedary_ray.engines.reward import make_reward_scorer

    expected = _reference(tiny_reward_model, TEXTS)
    assert max(expected) - min(expected) > 0.1  # a head that tells the texts apart
    cfg = EngineConfig(max_model_len=256, kv_cache_gib=1)
    hf = make_reward_scorer(tiny_reward_model, "transformers", cfg)
    assert hf.score(TEXTS) == pytest.approx(expected, abs=1e-4)
    assert hf.score(TEXTS[:1]) == pytest.approx(expected[:1], abs=1e-4)
    with pytest.raises(DromedaryError, match="over max_model_len 256"):
        hf.score(["word " * 400])
    vllm = make_reward_scorer(tiny_reward_model, "vllm", cfg)
    try:
        assert vllm.score(TEXTS) == pytest.approx(expected, abs=1e-4)
        assert vllm.score([]) == []
    finally:
        vllm.close()
