"""reward_model: SALMON's principle-following reward model (Sun et al. 2023, §3.2).

Reads the preferences stage's single-principle judgements, aggregates them into
principle-conditioned preference examples (`algos.salmon_prefs.aggregate_rm_examples`: a few
principles per example, some negated, the strongest one deciding the label), holds out a
fraction of the response pairs, and trains a scalar-head model on the rest with the pairwise
Bradley-Terry loss (`runtime/train_rm.py`). Writes:

    <run>/reward_model/model/            AutoModelForSequenceClassification, one label (plain
                                         weights; engines/reward.py scores with it)
    <run>/reward_model/data/             one RMSummaryRow
    <run>/reward_model/rejects/          pairs with no consistent judgement, over-long inputs
    <run>/reward_model/examples.parquet  every kept example (RMExampleRow), train and held out
    <run>/reward_model/rm_log.jsonl      one line per step: loss, accuracy, pairs, lr, ...

and the held-out and train pairwise accuracies of the saved folder to the manifest's metrics.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dromedary_ray.algos.rm_data import (
    REJECT_RM_INPUT_TOO_LONG,
    encode_pairs,
    example_texts,
    is_heldout,
)
from dromedary_ray.algos.salmon_prefs import (
    Aggregated,
    JudgedPair,
    JudgeScore,
    RMExample,
    aggregate_rm_examples,
)
from dromedary_ray.config import EngineConfig, RewardModelConfig, RunConfig, resolve_path
from dromedary_ray.data.salmon_schemas import PreferenceRow, RMExampleRow, RMSummaryRow
from dromedary_ray.data.schemas import RejectRow
from dromedary_ray.data.store import file_digest
from dromedary_ray.errors import StageError
from dromedary_ray.salmon_principles import SalmonPrincipleSet, load_salmon_principles
from dromedary_ray.stages.base import StageContext, sft_stage
from dromedary_ray.stages.sft import check_local_run_dir

if TYPE_CHECKING:
    from dromedary_ray.engines.reward import RewardScorer

INPUT = "preferences"
EXAMPLES_FILE = "examples.parquet"
LOG_FILE = "rm_log.jsonl"


class RewardModelStage:
    name = "reward_model"
    data_schema = RMSummaryRow.SCHEMA
    uses_ray = True
    trains = True

    def input_stages(self, config: RunConfig) -> tuple[str, ...]:
        # Starting from the SFT model makes that stage an input too: a new policy, a new RM.
        if config.reward_model.init_from == "policy":
            return (INPUT, sft_stage(config))
        return (INPUT,)

    def fingerprint_payload(self, config: RunConfig) -> dict[str, Any]:
        rm = config.reward_model
        return {"reward_model": config.section("reward_model"),
                "principles": file_digest(resolve_path(rm.principles_file)),
                "init": init_model(config)}

    def check(self, config: RunConfig) -> None:
        check_local_run_dir(config, self.name)
        load_salmon_principles(config.reward_model.principles_file)
        if config.reward_model.init_from == "policy":
            try:
                sft_stage(config)
            except ValueError as err:
                raise StageError(f"reward_model.init_from is policy, but {err}") from None

    def run(self, ctx: StageContext) -> None:
        if not ctx.store.is_local:
            raise StageError(f"{self.name} needs a local run directory, got {ctx.store.run_dir!r}")
        cfg, rm = ctx.config, ctx.config.reward_model
        pset = load_salmon_principles(rm.principles_file)
        prefs = PreferenceRow.from_table(ctx.inputs[INPUT].read("data", PreferenceRow.SCHEMA))
        if not prefs:
            raise StageError(f"{self.name}: the preferences stage wrote no judgements "
                             f"(see {ctx.inputs[INPUT].root}/rejects)")
        aggregated = aggregate(prefs, pset, rm)
        base_spec = init_model(cfg)
        train_and_report(ctx, self.name, pset, aggregated, base_spec,
                         judged_pairs=len({p.pair_id for p in prefs}))


def init_model(config: RunConfig) -> str:
    """The model spec the RM starts from: the base (SALMON's choice), the policy, or a spec."""
    init = config.reward_model.init_from
    if init == "base":
        return config.model
    if init == "policy":
        return f"run:{sft_stage(config)}"
    return init


def judged_pair(row: PreferenceRow) -> JudgedPair:
    """A preferences-table row as the aggregation's input (one pair per prompt)."""
    return JudgedPair(pair_id=row.pair_id, prompt_id=row.pair_id, prompt=row.prompt,
                      response_a=row.response_a, response_b=row.response_b,
                      principle=row.principle,
                      score=JudgeScore(row.forward, row.backward, row.consistent, row.score))


def aggregate(prefs: list[PreferenceRow], pset: SalmonPrincipleSet,
              rm: RewardModelConfig) -> Aggregated:
    try:
        return aggregate_rm_examples(
            [judged_pair(r) for r in prefs], pset, seed=rm.seed,
            principles_per_example=(rm.min_principles, rm.max_principles),
            negate_prob=rm.negate_prob, flip_prob=rm.flip_prob,
            draws_per_pair=rm.draws_per_pair, geometric_p=rm.geometric_p,
            normalize=rm.normalize_scores)
    except ValueError as err:  # a principle the file does not know, mixed-up pair rows
        raise StageError(f"reward_model: cannot aggregate the preferences: {err} "
                         f"(principles file {rm.principles_file})") from None


def train_and_report(ctx: StageContext, stage: str, pset: SalmonPrincipleSet,
                     aggregated: Aggregated, base_spec: str, judged_pairs: int) -> None:
    """Split, filter, train, evaluate; write the model, tables, examples and metrics."""
    from dromedary_ray.models import resolve_model
    from dromedary_ray.runtime.train_common import load_tokenizer
    from dromedary_ray.runtime.train_rm import train_reward_model

    rm = ctx.config.reward_model
    stage_dir = Path(ctx.store.root)
    base_path = resolve_model(base_spec, ctx.config.run_dir)
    tokenizer = load_tokenizer(base_path)
    texts = [example_texts(pset, e) for e in aggregated.examples]
    data = encode_pairs(tokenizer, texts, rm.train.max_seq_len, tokenizer.pad_token_id)
    kept = [aggregated.examples[i] for i in data.kept]
    split = ["heldout" if is_heldout(e.pair_id, rm.heldout_fraction, rm.seed) else "train"
             for e in kept]
    write_examples(stage_dir / EXAMPLES_FILE, kept, split, data.pairs)
    rejects = reject_rows(stage, aggregated, data.too_long, rm.train.max_seq_len)
    train_texts = [texts[i] for i, s in zip(data.kept, split, strict=True) if s == "train"]
    held_texts = [texts[i] for i, s in zip(data.kept, split, strict=True) if s == "heldout"]
    if not train_texts:
        raise StageError(
            f"{stage}: no example left to train on ({len(aggregated.examples)} aggregated, "
            f"{len(data.too_long)} too long, {len(held_texts)} held out, "
            f"{len(aggregated.rejects)} pairs with no consistent judgement); see {stage}/rejects")
    result = train_reward_model(train_texts, base_model_path=base_path,
                                out_dir=ctx.store.model_dir, cfg=rm.train,
                                metrics_path=str(stage_dir / LOG_FILE), run_name=stage)
    dedupe_step_log(stage_dir / LOG_FILE)
    train_eval, held_eval = evaluate(result.model_dir, sample(train_texts, rm.train_eval_examples),
                                     held_texts, rm)
    summary = RMSummaryRow(
        id=stage, base_model=base_spec, model_dir=result.model_dir, method=rm.train.method,
        judged_pairs=judged_pairs, rejected_pairs=len(aggregated.rejects),
        too_long=len(data.too_long), examples=len(train_texts),
        heldout_examples=len(held_texts), steps=result.steps, first_loss=result.first_loss,
        final_loss=result.final_loss, train_accuracy=train_eval["accuracy"],
        heldout_accuracy=held_eval["accuracy"], tokens_per_second=result.tokens_per_second,
        seconds=result.seconds, resumed_from_step=result.resumed_from_step,
        trainable_params=result.trainable_params, total_params=result.total_params)
    ctx.store.write_table(RMSummaryRow.to_table([summary]), RejectRow.to_table(rejects))
    ctx.metrics.update({
        "heldout_accuracy": _round(held_eval["accuracy"]),
        "train_accuracy": _round(train_eval["accuracy"]),
        "heldout_mean_margin": _round(held_eval.get("mean_margin")),
        "examples": len(train_texts), "heldout_examples": len(held_texts),
        "steps": result.steps, "first_loss": round(result.first_loss, 4),
        "final_loss": round(result.final_loss, 4),
        "final_step_accuracy": round(result.curve[-1][2], 4),
        "train_tokens_per_second": round(result.tokens_per_second, 1),
        "resumed_from_step": result.resumed_from_step,
        "trainable_params": result.trainable_params,
    })


def reject_rows(stage: str, aggregated: Aggregated, too_long: list[tuple[int, int]],
                max_seq_len: int) -> list[RejectRow]:
    rows = [RejectRow(r.pair_id, stage, r.reason,
                      "no principle's judgement agreed in both presentation orders")
            for r in aggregated.rejects]
    for pos, n in too_long:
        e = aggregated.examples[pos]
        rows.append(RejectRow(f"{e.pair_id}/{e.draw}", stage, REJECT_RM_INPUT_TOO_LONG,
                              f"{n} tokens in the longer input > max_seq_len {max_seq_len}"))
    return rows


def write_examples(path: Path, examples: list[RMExample], split: list[str],
                   pairs: list[Any]) -> None:
    """The kept examples as one Parquet file, written atomically (tmp file, rename)."""
    import pyarrow.parquet as pq

    rows = [RMExampleRow(
        id=f"{e.pair_id}/{e.draw}", pair_id=e.pair_id, draw=e.draw, split=s, prompt=e.prompt,
        chosen=e.chosen, rejected=e.rejected, principles=list(e.principles),
        negated=list(e.negated), decisive_principle=e.decisive_principle, margin=e.margin,
        flipped=e.flipped, chosen_tokens=len(p.chosen_ids), rejected_tokens=len(p.rejected_ids))
        for e, s, p in zip(examples, split, pairs, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pq.write_table(RMExampleRow.to_table(rows), tmp)
    tmp.replace(path)


def dedupe_step_log(path: Path) -> None:
    """Keep the last line of each step: a resumed run re-logs the steps after its checkpoint."""
    if not path.exists():
        return
    by_step: dict[int, str] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            by_step[int(json.loads(line)["step"])] = line
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text("".join(f"{by_step[s]}\n" for s in sorted(by_step)))
    tmp.replace(path)


def sample(items: list[Any], limit: int | None) -> list[Any]:
    """At most `limit` items spread evenly over the list (all of them for None)."""
    if limit is None or len(items) <= limit:
        return list(items)
    stride = len(items) / limit
    return [items[int(i * stride)] for i in range(limit)]


def evaluate(model_dir: str, train_texts: list[tuple[str, str]],
             held_texts: list[tuple[str, str]], rm: RewardModelConfig
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pairwise accuracy of the saved folder (the transformers reward scorer).

    A model trained on GPUs is scored by one Ray task holding a GPU, not on the driver (which
    may sit on a CPU-only head node); one trained on CPUs is small, and scoring it here saves
    a worker start.
    """
    sets = {"train": train_texts, "heldout": held_texts}
    # Every kept input fits train.max_seq_len (encode_pairs dropped the longer ones).
    engine = EngineConfig(max_model_len=max(64, rm.train.max_seq_len))
    if rm.train.use_gpu:
        import ray

        task = ray.remote(num_cpus=rm.train.cpus_per_worker, num_gpus=1)(evaluate_pair_sets)
        out = ray.get(task.remote(model_dir, sets, engine, batch_size=rm.eval_batch_size))
    else:
        out = evaluate_pair_sets(model_dir, sets, engine, batch_size=rm.eval_batch_size)
    return out["train"], out["heldout"]


def evaluate_pair_sets(model_dir: str, sets: dict[str, Sequence[tuple[str, str]]],
                       engine: EngineConfig, *, batch_size: int | None = None
                       ) -> dict[str, dict[str, Any]]:
    """`pairwise_accuracy_of` for each named set of pairs, loading the model once (on cuda
    when this process sees a GPU). A plain function so that a Ray task can run it where the
    training ran."""
    from dromedary_ray.engines.reward import make_reward_scorer

    scorer = make_reward_scorer(model_dir, "transformers", engine, batch_size=batch_size)
    try:
        return {name: pairwise_accuracy_of(scorer, pairs) for name, pairs in sets.items()}
    finally:
        scorer.close()


def pairwise_accuracy_of(scorer: RewardScorer, pairs: Sequence[tuple[str, str]]
                         ) -> dict[str, Any]:
    """Share of (chosen, rejected) text pairs ranked right (strictly higher), and the mean
    score margin; None for no pairs."""
    if not pairs:
        return {"accuracy": None, "pairs": 0, "mean_margin": None}
    flat = scorer.score([t for pair in pairs for t in pair])
    margins = [c - r for c, r in zip(flat[0::2], flat[1::2], strict=True)]
    return {"accuracy": sum(1 for m in margins if m > 0) / len(pairs), "pairs": len(pairs),
            "mean_margin": sum(margins) / len(pairs)}


def _round(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 4)
