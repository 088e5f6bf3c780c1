"""The reward actor: scores responses under the principles drawn for their prompt (SALMON §3.3).

With a reward model folder, each (prompt, response, principles) becomes the RM's input text
(`render_rm_input`, none negated at RL time) and `engines.reward` scores it. A plain Python
function can stand in for the model (tests, benchmarks against other PPO implementations): it
gets the prompts, the responses and the response token ids, and returns one float each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from dromedary_ray.config import EngineConfig
from dromedary_ray.runtime.faults import maybe_die, maybe_hang

# (prompts, responses, response token ids) -> one reward per response
RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[Sequence[int]]], list[float]]


class RewardActor:
    """Scores rollouts with the principle-following RM, or with a programmatic reward."""

    def __init__(self, source: str | RewardFn, principles_file: str,
                 backend: str = "vllm", engine_cfg: EngineConfig | None = None):
        from dromedary_ray.salmon_principles import load_salmon_principles

        self.pset = load_salmon_principles(principles_file)
        self.fn: RewardFn | None = None
        self.scorer: Any = None
        if callable(source):
            self.fn, self.source = source, getattr(source, "__name__", "function")
        else:
            from dromedary_ray.engines.reward import make_reward_scorer

            self.scorer = make_reward_scorer(source, backend, engine_cfg or EngineConfig())
            self.source = source

    def rm_inputs(self, prompts: Sequence[str], responses: Sequence[str],
                  principles: Sequence[Sequence[str]]) -> list[str]:
        """The reward model's input text for each response."""
        from dromedary_ray.salmon_principles import render_rm_input

        return [render_rm_input(self.pset, prompt, response,
                                [(self.pset.get(name), False) for name in names])
                for prompt, response, names in zip(prompts, responses, principles, strict=True)]

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              principles: Sequence[Sequence[str]],
              response_token_ids: Sequence[Sequence[int]]) -> list[float]:
        """One reward per response; `principles[i]` names those shown for response i."""
        maybe_die("reward_score")  # fault tests: the reward actor dies mid-step
        maybe_hang("reward_score")  # or hangs there (ppo.call_timeout_s ends the wait)
        if self.fn is not None:
            scores = [float(s) for s in self.fn(prompts, responses, response_token_ids)]
            if len(scores) != len(responses):
                raise ValueError(f"the reward function returned {len(scores)} scores for "
                                 f"{len(responses)} responses")
            return scores
        return self.scorer.score(self.rm_inputs(prompts, responses, principles))

    def health(self) -> dict[str, Any]:
        return {"source": self.source, "pid": os.getpid()}
