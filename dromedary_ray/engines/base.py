"""The engine protocol and the result types every backend returns."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from dromedary_ray.config import SamplingConfig


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each generated token under the sampling model
    finish_reason: str  # "stop" (EOS or a stop string) or "length"

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


@dataclass(frozen=True)
class Generation:
    """All samples for one prompt, or the reason the prompt was refused."""

    prompt_tokens: int
    completions: list[Completion]
    error: str | None = None  # e.g. "prompt_too_long: ..."; completions is then empty


class Engine(Protocol):
    tokenizer: Any
    max_model_len: int

    def submit(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Future[Generation]]:
        """Start sampling and return at once, one future per prompt. Requests from several
        callers (batches in flight, phases of one row) share the engine as they arrive."""
        ...

    def generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Generation]:
        """Sample completions and wait for them; `seeds[i]` makes prompt i reproducible
        whatever its batch."""
        ...

    def close(self) -> None:
        """Release the engine's processes and memory."""
        ...


def encode_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts.

    A chat template already writes the special tokens it wants (BOS included), so we add none;
    a plain-text prompt gets the tokenizer's usual ones.
    """
    add_special = not getattr(tokenizer, "chat_template", None)
    return [tokenizer(p, add_special_tokens=add_special).input_ids for p in prompts]


def too_long(prompt_len: int, sampling: SamplingConfig, max_model_len: int) -> str | None:
    """Why a prompt cannot be served, or None. We refuse up front instead of truncating."""
    if prompt_len + sampling.max_new_tokens > max_model_len:
        return (
            f"prompt_too_long: {prompt_len} prompt tokens + {sampling.max_new_tokens} new tokens "
            f"exceed max_model_len {max_model_len}"
        )
    return None


def request_seeds(sampling: SamplingConfig, count: int, seeds: list[int] | None) -> list[int]:
    if seeds is None:
        return [sampling.seed + i for i in range(count)]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} prompts")
    return seeds


def fitting_prompts(tokenizer: Any, prompts: list[str], max_model_len: int,
                    reserve: int) -> tuple[list[int], list[int]]:
    """(indices of the prompts that leave `reserve` tokens free in the context, every length).

    For next-token scoring, which refuses a whole batch when one prompt is too long: callers
    score the ones that fit and reject the others by name.
    """
    lengths = [len(ids) for ids in encode_prompts(tokenizer, prompts)]
    return [i for i, n in enumerate(lengths) if n + reserve <= max_model_len], lengths


T = TypeVar("T")


def done_future(value: T) -> Future[T]:
    future: Future[T] = Future()
    future.set_result(value)
    return future


def results(futures: Sequence[Future[T]]) -> list[T]:
    return [f.result() for f in futures]


def finished_groups(futures: Sequence[Future[T]]) -> Iterator[list[tuple[int, T]]]:
    """(index, result) of `futures`, a group at a time, as they finish: each group holds every
    future that finished since the last one. A multi-phase task starts a row's next phase from
    here, so it never waits for the slowest row of its batch; where everything finishes at once
    (the transformers engine) the next phase still goes to the engine as one batch."""
    pending = {f: i for i, f in enumerate(futures)}
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        yield sorted(((pending.pop(f), f.result()) for f in done), key=lambda x: x[0])
