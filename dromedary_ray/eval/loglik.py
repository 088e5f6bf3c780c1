"""Log-likelihood of a continuation given a context, batched, on vLLM or transformers.

The multiple-choice suites (HHH, TruthfulQA) rank answers by `log p(continuation | context)`,
the sum of the continuation tokens' log-probs; the pairwise judge reads the next-token log-probs
of "A" and "B". Both backends see the same token ids (`encode_pair`), so they agree to float
precision (tests/test_eval_models.py checks 1e-3 on the tiny model).

vLLM: one request per pair over context+continuation ids with `SamplingParams(max_tokens=1,
prompt_logprobs=0)`; vLLM then reports, at every prompt position, the log-prob of the token that
is actually there. transformers: a right-padded forward pass, gathered at the same positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from dromedary_ray.errors import DromedaryError

Pair = tuple[str, str]  # (context, continuation)
IdPair = tuple[list[int], list[int]]

# Padded tokens per transformers forward pass: the logits alone are tokens x vocab x 4 bytes
# (~400 MB for SmolLM2's 49k vocabulary at 2048 tokens), so the batch is sized in tokens.
HF_TOKENS_PER_BATCH = 2048
VLLM_REQUESTS_PER_CALL = 256


class Scorer(Protocol):
    def loglik(self, pairs: Sequence[Pair]) -> list[float]:
        """Sum of log p(continuation tokens | context) for each (context, continuation)."""
        ...


def split_whitespace(context: str, continuation: str) -> Pair:
    """Move the spaces ending `context` to the front of `continuation`.

    BPE vocabularies (LLaMA, GPT-2, SmolLM2) glue a space to the word after it (" Paris"), so a
    context ending in "A: " would leave a lone space token the model rarely sees there, and the
    answer would be scored without the space it is normally written with.
    """
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped):] + continuation


def encode_pair(tokenizer: Any, context: str, continuation: str) -> IdPair:
    """Token ids of context and continuation, tokenised apart so the boundary is exact.

    The context gets the tokenizer's special tokens (BOS) unless it already starts with the BOS
    text, as a chat-rendered prompt does; the continuation never does.
    """
    context, continuation = split_whitespace(context, continuation)
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and context.startswith(bos))
    ctx = list(tokenizer(context, add_special_tokens=add_special).input_ids)
    cont = list(tokenizer(continuation, add_special_tokens=False).input_ids)
    if not ctx:
        raise DromedaryError(f"empty context for continuation {continuation[:40]!r}: the first "
                             "token would have nothing to be conditioned on")
    if not cont:
        raise DromedaryError(f"empty continuation after context {context[-40:]!r}")
    return ctx, cont


def check_length(pairs: Sequence[IdPair], max_model_len: int) -> None:
    """Refuse up front, naming the longest item, rather than let an engine truncate silently."""
    for ctx, cont in pairs:
        if len(ctx) + len(cont) + 1 > max_model_len:
            raise DromedaryError(
                f"an item needs {len(ctx)} context + {len(cont)} continuation tokens, over "
                f"max_model_len {max_model_len} (raise --max-model-len)")


class VLLMScorer:
    """`run(prompts, params)` returns vLLM `RequestOutput`s in order: the engine's
    `run_requests`, so scoring shares the engine with everything else in flight."""

    def __init__(self, run: Any, tokenizer: Any, max_model_len: int):
        self.run, self.tokenizer, self.max_model_len = run, tokenizer, max_model_len

    def loglik(self, pairs: Sequence[Pair]) -> list[float]:
        return self.loglik_ids([encode_pair(self.tokenizer, c, x) for c, x in pairs])

    def loglik_ids(self, pairs: Sequence[IdPair]) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_length(pairs, self.max_model_len)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        totals: list[float] = []
        for start in range(0, len(pairs), VLLM_REQUESTS_PER_CALL):
            chunk = pairs[start:start + VLLM_REQUESTS_PER_CALL]
            prompts = [TokensPrompt(prompt_token_ids=ctx + cont) for ctx, cont in chunk]
            outs = self.run(prompts, params)
            for (ctx, cont), out in zip(chunk, outs, strict=True):
                steps = out.prompt_logprobs  # steps[i]: {token id: Logprob} for prompt token i
                totals.append(sum(float(steps[len(ctx) + j][tok].logprob)
                                  for j, tok in enumerate(cont)))
        return totals


class HFScorer:
    def __init__(self, model: Any, tokenizer: Any, max_model_len: int):
        self.model, self.tokenizer, self.max_model_len = model, tokenizer, max_model_len

    def loglik(self, pairs: Sequence[Pair]) -> list[float]:
        return self.loglik_ids([encode_pair(self.tokenizer, c, x) for c, x in pairs])

    def loglik_ids(self, pairs: Sequence[IdPair]) -> list[float]:
        import torch

        check_length(pairs, self.max_model_len)
        totals = [0.0] * len(pairs)
        for batch in _token_batches([len(c) + len(x) for c, x in pairs]):
            logps = self._forward([pairs[i][0] + pairs[i][1] for i in batch])
            for row, i in enumerate(batch):
                ctx, cont = pairs[i]
                # Position p predicts token p+1: the continuation's tokens are predicted by
                # positions len(ctx)-1 .. len(ctx)+len(cont)-2.
                steps = logps[row, len(ctx) - 1:len(ctx) + len(cont) - 1]
                totals[i] = steps.gather(-1, torch.tensor(cont).unsqueeze(-1)).sum().item()
        return totals

    def next_token(self, prompts: Sequence[list[int]]) -> list[Any]:
        """Full next-token log-prob vectors after each prompt (one forward pass per batch)."""
        check_length([(p, [0]) for p in prompts], self.max_model_len)
        result: list[Any] = [None] * len(prompts)
        for batch in _token_batches([len(p) for p in prompts]):
            logps = self._forward([prompts[i] for i in batch])
            for row, i in enumerate(batch):
                result[i] = logps[row, len(prompts[i]) - 1]
        return result

    def _forward(self, rows: list[list[int]]) -> Any:
        """Log-softmax over the vocabulary for right-padded rows (padding never precedes a real
        token, so causal attention makes it invisible to the positions we read)."""
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        return logits.float().log_softmax(-1)


def _token_batches(lengths: list[int]) -> list[list[int]]:
    """Indices grouped longest first so rows of a batch pad little, within the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= HF_TOKENS_PER_BATCH:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def make_scorer(engine: Any) -> VLLMScorer | HFScorer:
    """The scorer for an engine built by `dromedary_ray.engines.make_engine`."""
    from dromedary_ray.engines.hf_engine import HFEngine
    from dromedary_ray.engines.vllm_engine import VLLMEngine

    if isinstance(engine, VLLMEngine):
        return VLLMScorer(engine.run_requests, engine.tokenizer, engine.max_model_len)
    if isinstance(engine, HFEngine):
        return HFScorer(engine.model, engine.tokenizer, engine.max_model_len)
    raise TypeError(f"no log-likelihood scorer for {type(engine).__name__}")


def single_token_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise DromedaryError(f"choice {text!r} is {len(ids)} tokens for this tokenizer; "
                             "next-token scoring needs single-token choices")
    return int(ids[0])


def next_token_logprobs(engine: Any, prompts: Sequence[str],
                        choices: Sequence[str]) -> list[dict[str, float]]:
    """log p(choice | prompt) of single-token choices at the position right after each prompt.

    `prompts` are rendered text (a chat template's generation prompt, say). vLLM: one step with
    `SamplingParams(max_tokens=1, logprobs=20)`; a choice missing from the top 20 (a judge that
    wants to say neither letter) is scored exactly by prompt log-probs instead, so no choice is
    ever read as impossible. transformers: the full distribution from one forward pass.
    """
    scorer = make_scorer(engine)
    tok = engine.tokenizer
    choice_ids = {c: single_token_id(tok, c) for c in choices}
    bos = getattr(tok, "bos_token", None)
    ids = [list(tok(p, add_special_tokens=not (bos and p.startswith(bos))).input_ids)
           for p in prompts]
    if isinstance(scorer, HFScorer):
        vectors = scorer.next_token(ids)
        return [{c: float(v[t]) for c, t in choice_ids.items()} for v in vectors]
    return _vllm_next_token(scorer, ids, choice_ids)


def _vllm_next_token(scorer: VLLMScorer, ids: list[list[int]],
                     choice_ids: dict[str, int]) -> list[dict[str, float]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    check_length([(p, [0]) for p in ids], scorer.max_model_len)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20, detokenize=False)
    outs = scorer.run([TokensPrompt(prompt_token_ids=p) for p in ids], params)
    result: list[dict[str, float]] = []
    missing: list[tuple[int, str]] = []
    for i, out in enumerate(outs):
        top = out.outputs[0].logprobs[0]
        row = {c: float(top[t].logprob) if t in top else math.nan for c, t in choice_ids.items()}
        missing += [(i, c) for c, v in row.items() if math.isnan(v)]
        result.append(row)
    if missing:
        exact = scorer.loglik_ids([(ids[i], [choice_ids[c]]) for i, c in missing])
        for (i, c), value in zip(missing, exact, strict=True):
            result[i][c] = value
    return result


def next_two_logprobs(engine: Any, prompts: Sequence[str], first: Sequence[str], forced: str,
                      second: Sequence[str]) -> list[tuple[dict[str, float], dict[str, float]]]:
    """For each prompt: log p(c | prompt) for the single-token choices `first`, and
    log p(c | prompt + forced) for the choices `second`, in one request per prompt.

    vLLM: two decoding steps with the first token forced by `allowed_token_ids`; the log-probs
    vLLM reports are taken from the raw logits (its default `logprobs_mode`), before that mask,
    so step one reads the model's own first-token distribution and step two the distribution
    after `forced`. A choice outside the top 20 is scored exactly by prompt log-probs instead.
    transformers: one forward pass over prompt + forced, read at the last two positions.
    """
    scorer = make_scorer(engine)
    tok = engine.tokenizer
    first_ids = {c: single_token_id(tok, c) for c in first}
    second_ids = {c: single_token_id(tok, c) for c in second}
    forced_id = single_token_id(tok, forced)
    bos = getattr(tok, "bos_token", None)
    ids = [list(tok(p, add_special_tokens=not (bos and p.startswith(bos))).input_ids)
           for p in prompts]
    check_length([(p, [0, 0]) for p in ids], scorer.max_model_len)
    if isinstance(scorer, HFScorer):
        out = []
        for batch in _token_batches([len(p) + 1 for p in ids]):
            logps = scorer._forward([ids[i] + [forced_id] for i in batch])
            for row, i in enumerate(batch):
                a, b = logps[row, len(ids[i]) - 1], logps[row, len(ids[i])]
                out.append((i, ({c: float(a[t]) for c, t in first_ids.items()},
                                {c: float(b[t]) for c, t in second_ids.items()})))
        return [pair for _, pair in sorted(out, key=lambda x: x[0])]
    return _vllm_two_steps(scorer, ids, first_ids, forced_id, second_ids)


def _vllm_two_steps(scorer: VLLMScorer, ids: list[list[int]], first_ids: dict[str, int],
                    forced_id: int, second_ids: dict[str, int]
                    ) -> list[tuple[dict[str, float], dict[str, float]]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=2, temperature=0.0, logprobs=20, detokenize=False,
                            allowed_token_ids=[forced_id], ignore_eos=True)
    outs = scorer.run([TokensPrompt(prompt_token_ids=p) for p in ids], params)
    result, missing = [], []
    for i, out in enumerate(outs):
        steps = out.outputs[0].logprobs
        rows = []
        for step, choices in enumerate((first_ids, second_ids)):
            top = steps[step]
            row = {c: float(top[t].logprob) if t in top else math.nan for c, t in choices.items()}
            missing += [(i, step, c) for c, v in row.items() if math.isnan(v)]
            rows.append(row)
        result.append((rows[0], rows[1]))
    if missing:
        exact = scorer.loglik_ids([
            (ids[i] + ([forced_id] if step else []), [(second_ids if step else first_ids)[c]])
            for i, step, c in missing])
        for (i, step, c), value in zip(missing, exact, strict=True):
            result[i][step][c] = value
    return result
