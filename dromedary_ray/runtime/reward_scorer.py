"""Score responses with a trained principle-following reward model (a plain transformers forward).

The `reward_model` stage writes `<run>/reward_model/model/`: a Hugging Face folder of an
`AutoModelForSequenceClassification` with one label (for LLaMA, `LlamaForSequenceClassification`)
whose linear `score` head reads the hidden state of the last non-pad token; `config.json` names
the pad token. Its input text is `salmon_principles.render_rm_input(pset, prompt, response,
[(principle, negated), ...])`, tokenised with the tokenizer's default special tokens
(`algos.rm_data.encode_rm_text`); the output is one unnormalised score, higher is better.

No Ray here: the PPO reward actor and the stage's held-out evaluation wrap this class. The same
folder also loads on vLLM's pooling runner (`LLM(model_dir, runner="pooling")`, `.reward` or
`.classify`), which pools the last token of the unpadded prompt: the same position.

    from dromedary_ray.runtime.reward_scorer import RewardScorer
    from dromedary_ray.salmon_principles import load_salmon_principles

    pset = load_salmon_principles("principles/salmon.yaml")
    rm = RewardScorer("runs/local/reward_model/model")
    concise = pset.get("Concise")
    rm.score(pset, "What is 2+2?", "4.", [(concise, False)])   # -> float
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dromedary_ray.algos.rm_data import encode_rm_text, pad_right
from dromedary_ray.salmon_principles import SalmonPrinciple, SalmonPrincipleSet, render_rm_input


class RewardScorer:
    """A reward-model folder loaded for inference; scores RM input texts in length-sorted
    batches (right padding, so each score equals the unbatched one)."""

    def __init__(self, model_dir: str, *, device: str | None = None, batch_size: int = 8,
                 dtype: str = "float32"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=getattr(torch, dtype)).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model_dir} has {self.model.config.num_labels} labels; a reward "
                             "model has one")
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            raise ValueError(f"{model_dir}: config.json names no pad_token_id, so the score head "
                             "cannot find the last token of a padded batch")

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """One score per RM input text."""
        import torch

        ids = [encode_rm_text(self.tokenizer, t) for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores: list[float] = [0.0] * len(ids)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                batch = {k: v.to(self.device)
                         for k, v in pad_right([ids[i] for i in chunk], self.pad_id).items()}
                out = self.model(**batch).logits[:, 0].float().cpu().tolist()
                for i, s in zip(chunk, out, strict=True):
                    scores[i] = s
        return scores

    def score(self, pset: SalmonPrincipleSet, prompt: str, response: str,
              principles: Sequence[tuple[SalmonPrinciple, bool]]) -> float:
        """The score of one response under (principle, negated) pairs."""
        return self.score_texts([render_rm_input(pset, prompt, response, principles)])[0]

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, float]]:
        """(score of chosen text, score of rejected text) per pair."""
        flat = self.score_texts([t for pair in pairs for t in pair])
        return list(zip(flat[0::2], flat[1::2], strict=True))


def pairwise_accuracy_of(scorer: RewardScorer, pairs: Sequence[tuple[str, str]]
                         ) -> dict[str, Any]:
    """Share of (chosen, rejected) text pairs ranked right (strictly higher), and the mean
    score margin; None for no pairs."""
    if not pairs:
        return {"accuracy": None, "pairs": 0, "mean_margin": None}
    scores = scorer.score_pairs(pairs)
    right = sum(1 for c, r in scores if c > r)
    return {"accuracy": right / len(pairs), "pairs": len(pairs),
            "mean_margin": sum(c - r for c, r in scores) / len(pairs)}


def evaluate_pair_sets(model_dir: str, sets: dict[str, Sequence[tuple[str, str]]], *,
                       batch_size: int = 8, threads: int | None = None
                       ) -> dict[str, dict[str, Any]]:
    """`pairwise_accuracy_of` for each named set of pairs, loading the model once.

    A plain function so that a Ray task can run it where the training ran (GPU or CPUs).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    scorer = RewardScorer(model_dir, batch_size=batch_size)
    return {name: pairwise_accuracy_of(scorer, pairs) for name, pairs in sets.items()}
