"""ppo: SALMON's RL stage (§3.3): PPO on the SFT policy against the principle-following RM.

Reads the recipe's prompts, the SFT model (`<run>/<sft stage>/model/`) and the reward model
(`<run>/reward_model/model/`). Writes each step's rollouts as one shard of the data table
(`RolloutRow`), prompts too long for the policy's context to the rejects table, one JSON line
per step to `<run>/ppo/ppo_steps.jsonl` (TensorBoard under `<run>/ppo/tensorboard/`),
checkpoints under `<run>/ppo/checkpoints/`, and the final policy to `<run>/ppo/model/`. A killed
stage resumes from its newest checkpoint. The loop itself: `runtime/ppo/loop.py`.
"""

from __future__ import annotations

from typing import Any

from dromedary_ray.algos.parsing import REJECT_PROMPT_TOO_LONG
from dromedary_ray.config import PPO_NOT_FINGERPRINTED, RunConfig, resolve_path
from dromedary_ray.data.salmon_schemas import RolloutRow
from dromedary_ray.data.schemas import PromptRow, RejectRow
from dromedary_ray.data.store import file_digest
from dromedary_ray.errors import ConfigError, StageError
from dromedary_ray.stages.base import StageContext, prompt_source, sft_stage
from dromedary_ray.stages.sft import check_local_run_dir

REWARD_STAGE = "reward_model"


class PPOStage:
    name = "ppo"
    data_schema = RolloutRow.SCHEMA
    uses_ray = True
    trains = True

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        return (prompt_source(config), sft_stage(config), REWARD_STAGE)

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        ppo = config.section("ppo")
        for name in PPO_NOT_FINGERPRINTED:  # when state is saved, how long to wait
            ppo.pop(name)
        engine = config.engine
        return {"ppo": ppo, "principles": file_digest(resolve_path(config.ppo.principles_file)),
                "engine": {"backend": engine.backend, "dtype": engine.dtype,
                           "max_model_len": engine.max_model_len}}

    def check(self, config: RunConfig) -> None:
        from dromedary_ray.salmon_principles import load_salmon_principles

        check_local_run_dir(config, self.name)
        if config.engine.backend != "vllm":
            raise ConfigError("engine.backend: ppo rollouts need vllm")
        pset = load_salmon_principles(config.ppo.principles_file)
        k = config.ppo.principles_per_prompt
        for kind in pset.prompt_types:
            drawable = sum(1 for w in pset.weights(kind) if w > 0)
            if drawable < k:
                raise ConfigError(f"ppo.principles_per_prompt: {k}, but prompt type {kind!r} of "
                                  f"{config.ppo.principles_file} has {drawable} principles with "
                                  "positive weight")

    def run(self, ctx: StageContext) -> None:
        from dromedary_ray.models import resolve_model
        from dromedary_ray.runtime.ppo.loop import run_ppo

        config = ctx.config
        rows = ctx.inputs[prompt_source(config)].read("data", PromptRow.SCHEMA)
        prompts = sorted(PromptRow.from_table(rows), key=lambda p: p.id)
        policy = resolve_model(f"run:{sft_stage(config)}", config.run_dir)
        reward_model = resolve_model(f"run:{REWARD_STAGE}", config.run_dir)
        fit, rejects = fitting_prompts(prompts, policy, config)
        if rejects:
            ctx.store.write_shard(RolloutRow.empty(), RejectRow.to_table(rejects),
                                  "prompt-rejects")
        if not fit:
            raise StageError(f"ppo: none of the {len(prompts)} prompts fits "
                             f"engine.max_model_len {config.engine.max_model_len} with "
                             f"ppo.sampling.max_new_tokens {config.ppo.sampling.max_new_tokens}")
        result = run_ppo(fit, policy_path=policy, reward=reward_model, cfg=config.ppo,
                         engine=config.engine, store=ctx.store,
                         value_init_path=reward_model if config.ppo.value_init == "reward_model"
                         else None)
        ctx.metrics.update(summary_metrics(result))


def fitting_prompts(prompts: list[PromptRow], policy: str,
                    config: RunConfig) -> tuple[list[PromptRow], list[RejectRow]]:
    """Prompts whose chat rendering leaves room for `max_new_tokens`; the others as rejects."""
    from transformers import AutoTokenizer

    from dromedary_ray.engines.base import encode_prompts, too_long
    from dromedary_ray.prompts import render_chat

    tokenizer = AutoTokenizer.from_pretrained(policy)
    rendered = [render_chat(tokenizer, [{"role": "user", "content": p.query}]) for p in prompts]
    fit, rejects = [], []
    for p, ids in zip(prompts, encode_prompts(tokenizer, rendered), strict=True):
        reason = too_long(len(ids), config.ppo.sampling, config.engine.max_model_len)
        if reason:
            rejects.append(RejectRow(p.id, "ppo", REJECT_PROMPT_TOO_LONG, reason))
        else:
            fit.append(p)
    return fit, rejects


def summary_metrics(result: Any) -> dict[str, Any]:
    """The manifest's numbers: steps, reward and KL at both ends, seconds per step and phase."""
    rows = result.step_metrics
    out: dict[str, Any] = {"steps": result.steps, "steps_run": result.steps_run,
                           "resumed_from_step": result.resumed_from_step}
    if rows:
        out.update({"first_reward_mean": round(rows[0]["reward_mean"], 4),
                    "final_reward_mean": round(rows[-1]["reward_mean"], 4),
                    "final_kl": round(rows[-1]["kl"], 4)})
        for key in sorted({k for r in rows for k in r if k.startswith("seconds_")}):
            values = [r[key] for r in rows if key in r]
            out[f"mean_{key}"] = round(sum(values) / len(values), 3)
    return out
