"""Reward-model data, config, tables and the stage's pure helpers (milliseconds; no Ray).

Two tests load the tiny random LLaMA with a score head (about a second each): the LoRA set-up
that must train the head, and the scorer's batching.
"""

import json

import pytest
import torch

from dromedary_ray.algos.rl import bradley_terry_loss, pairwise_accuracy
from dromedary_ray.algos.rm_data import (
    RMPair,
    collate_pairs,
    encode_pairs,
    example_principles,
    example_texts,
    is_heldout,
    pairwise_sums,
    split_heldout,
    split_scores,
)
from dromedary_ray.algos.salmon_prefs import RMExample, RMReject, aggregate_rm_examples
from dromedary_ray.algos.sft import data_parallel_loss, plan_steps
from dromedary_ray.config import RewardModelConfig, TrainConfig, load_config
from dromedary_ray.data.salmon_schemas import PreferenceRow, RMExampleRow, RMSummaryRow
from dromedary_ray.errors import ConfigError, StageError
from dromedary_ray.salmon_principles import load_salmon_principles
from dromedary_ray.stages.reward_model import (
    RewardModelStage,
    dedupe_step_log,
    init_model,
    judged_pair,
    reject_rows,
    sample,
)

PSET = load_salmon_principles("principles/salmon.yaml")


def example(pair_id="p1", draw=0, negated=(False,), names=("Concise",)) -> RMExample:
    return RMExample(pair_id, draw, pair_id, "What is 2+2?", "4.", "It is four, as you know.",
                     names, negated, names[0], 1.0, False)


# --- held-out split ----------------------------------------------------------------------------


def test_heldout_split_is_by_pair_deterministic_and_near_the_fraction():
    ids = [f"pair-{i}" for i in range(2000)]
    held = [i for i in ids if is_heldout(i, 0.1, seed=0)]
    assert 150 < len(held) < 250  # ~10% of 2000
    assert held == [i for i in ids if is_heldout(i, 0.1, seed=0)]  # no hidden state
    assert held != [i for i in ids if is_heldout(i, 0.1, seed=1)]  # the seed matters
    assert not any(is_heldout(i, 0.0) for i in ids)
    with pytest.raises(ValueError):
        is_heldout("x", 1.0)
    # Every draw of a pair lands on the pair's side.
    exs = [example(pid, d) for pid in ids[:300] for d in range(4)]
    train, heldout = split_heldout(exs, 0.25)
    assert {e.pair_id for e in train}.isdisjoint({e.pair_id for e in heldout})
    assert len(train) + len(heldout) == len(exs) and len(heldout) % 4 == 0 and heldout


# --- text and tokens ---------------------------------------------------------------------------


def test_example_texts_differ_only_in_the_response_and_show_negations():
    ex = example(names=("Concise", "Helpful"), negated=(True, False))
    chosen, rejected = example_texts(PSET, ex)
    concise, helpful = PSET.get("Concise"), PSET.get("Helpful")
    assert example_principles(PSET, ex) == [(concise, True), (helpful, False)]
    for text in (chosen, rejected):
        assert f"1. Concise: {concise.negation}" in text and concise.definition not in text
        assert f"2. Helpful: {helpful.definition}" in text
    assert "\n4.\n" in chosen and "It is four" in rejected
    assert chosen.replace("4.", "It is four, as you know.", 1) == rejected


class WordTokenizer:
    """One id per whitespace word, BOS added: enough to check lengths and the pad guard."""

    def __call__(self, text):
        class Out:
            input_ids = [1] + [len(w) + 10 for w in text.split()]
        return Out()


def test_encode_pairs_drops_pairs_with_either_side_too_long_and_keeps_positions():
    texts = [("a b", "c d e"), ("a " * 20, "b"), ("x", "y " * 20), ("one two", "three")]
    data = encode_pairs(WordTokenizer(), texts, max_seq_len=8, pad_id=0)
    assert data.kept == [0, 3]
    assert data.too_long == [(1, 21), (2, 21)]
    assert data.pairs[0] == RMPair([1, 11, 11], [1, 11, 11, 11])
    with pytest.raises(ValueError, match="pad token"):  # the head would read the wrong token
        encode_pairs(WordTokenizer(), [("abc", "d")], max_seq_len=8, pad_id=13)


def test_collate_pairs_puts_chosen_first_and_split_scores_undoes_it():
    pairs = [RMPair([5, 6], [7]), RMPair([8], [9, 10, 11])]
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 0], [8, 0, 0], [7, 0, 0], [9, 10, 11]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 1, 1, 3]
    chosen, rejected = split_scores(torch.tensor([[1.0], [2.0], [3.0], [4.0]]), 2)
    assert chosen.tolist() == [1.0, 2.0] and rejected.tolist() == [3.0, 4.0]
    with pytest.raises(ValueError):
        split_scores(torch.zeros(3), 2)


def test_pairwise_sums_match_the_reference_mean_loss_and_accuracy():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(9, generator=g), torch.randn(9, generator=g)
    loss, right = pairwise_sums(chosen, rejected)
    torch.testing.assert_close(loss / 9, bradley_terry_loss(chosen, rejected))
    assert right.item() / 9 == pytest.approx(pairwise_accuracy(chosen, rejected).item())


@pytest.mark.parametrize("world,mbs,accum", [(1, 4, 1), (2, 2, 2), (3, 1, 2)])
def test_sharded_pairwise_gradients_equal_the_full_batch_mean(world, mbs, accum):
    """What the trainer back-propagates per (rank, micro-batch), averaged over ranks as
    data-parallel engines do, gives the gradient of the step's mean Bradley-Terry loss."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(11, 2, 5, generator=g)  # pair, side (chosen/rejected), feature
    plan = plan_steps(11, world_size=world, micro_batch_size=mbs, grad_accum=accum, epochs=1,
                      seed=0)
    for step in plan:
        w_ref = torch.randn(5, generator=g).requires_grad_()
        idx = [i for rnd in step for shard in rnd for i in shard]
        s = feats[idx] @ w_ref
        bradley_terry_loss(s[:, 0], s[:, 1]).backward()
        w = w_ref.detach().clone().requires_grad_()
        grads = torch.zeros(5)
        for rank in range(world):
            for rnd in step:
                if not rnd[rank]:
                    continue
                s = feats[rnd[rank]] @ w
                loss, _ = pairwise_sums(s[:, 0], s[:, 1])
                (gw,) = torch.autograd.grad(data_parallel_loss(loss, len(idx), world), w)
                grads += gw / world
        torch.testing.assert_close(grads, w_ref.grad)


# --- config ------------------------------------------------------------------------------------


def test_reward_model_config_defaults_mirror_salmon_and_validation_raises():
    cfg = load_config(None, ["reward_model.train.learning_rate=1e-3",
                             "reward_model.max_principles=3"]).reward_model
    assert cfg.train.learning_rate == 1e-3 and cfg.max_principles == 3
    d = RewardModelConfig()
    assert (d.min_principles, d.max_principles, d.geometric_p, d.negate_prob, d.flip_prob,
            d.draws_per_pair) == (1, 8, 0.2, 0.5, 0.1, 4)
    for bad in ({"min_principles": 3, "max_principles": 2}, {"negate_prob": 1.5},
                {"flip_prob": -0.1}, {"draws_per_pair": 0}, {"heldout_fraction": 1.0},
                {"train_eval_examples": 0}, {"init_from": " "},
                {"train": TrainConfig(method="lora", merge_lora=False)}):
        with pytest.raises(ConfigError):
            RewardModelConfig(**bad)
    with pytest.raises(ConfigError, match="reward_model.heldout_fraction"):
        load_config(None, ["reward_model.heldout_fraction=2"])


# --- the stage's pure parts --------------------------------------------------------------------


def test_init_model_and_inputs_follow_init_from():
    stage = RewardModelStage()
    cfg = load_config(None, ["recipe=salmon", "model=builtin:tiny-llama"])
    assert init_model(cfg) == "builtin:tiny-llama" and stage.input_stages(cfg) == ("preferences",)
    policy = load_config(None, ["recipe=salmon", "reward_model.init_from=policy"])
    assert init_model(policy) == "run:verbose_clone"
    assert stage.input_stages(policy) == ("preferences", "verbose_clone")
    assert init_model(load_config(None, ["reward_model.init_from=/models/rm"])) == "/models/rm"
    with pytest.raises(StageError, match="no supervised stage"):
        stage.check(load_config(None, ["recipe=self_align", "reward_model.init_from=policy"]))
    # The config section, the principles file and the init model each change the fingerprint.
    p1 = stage.fingerprint_payload(cfg)
    assert p1 != stage.fingerprint_payload(
        load_config(None, ["recipe=salmon", "model=builtin:tiny-llama", "reward_model.seed=1"]))
    assert p1 != stage.fingerprint_payload(load_config(None, ["recipe=salmon"]))
    assert len(p1["principles"]) == 16


def test_preference_rows_aggregate_and_rejects_carry_reasons():
    rows = [PreferenceRow(f"p{i}/{name}", f"p{i}", "general", "Q?", "short.", "long long.",
                          name, f, b, (f + b) / 2, f * b > 0)
            for i, (name, f, b) in enumerate([("Concise", 2.0, 1.0), ("Concise", 1.0, -1.0)])]
    pairs = [judged_pair(r) for r in rows]
    assert pairs[0].prompt_id == "p0" and pairs[0].score.score == 1.5
    agg = aggregate_rm_examples(pairs, PSET, seed=0, draws_per_pair=2, flip_prob=0.0)
    assert [e.pair_id for e in agg.examples] == ["p0", "p0"]
    assert agg.rejects == (RMReject("p1", "p1", "no_consistent_judgement"),)
    rejects = reject_rows("reward_model", agg, [(1, 999)], max_seq_len=512)
    assert [(r.id, r.reason) for r in rejects] == [("p1", "no_consistent_judgement"),
                                                   ("p0/1", "rm_input_too_long")]
    assert "999 tokens" in rejects[1].detail


def test_step_log_dedupe_keeps_the_last_line_of_each_step(tmp_path):
    log = tmp_path / "rm_log.jsonl"
    lines = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.8}, {"step": 2, "loss": 0.7},
             {"step": 3, "loss": 0.6}]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    dedupe_step_log(log)
    assert [json.loads(x) for x in log.read_text().splitlines()] == [
        {"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.7}, {"step": 3, "loss": 0.6}]
    assert sample(list(range(10)), None) == list(range(10))
    assert sample(list(range(10)), 4) == [0, 2, 5, 7]


def test_rm_tables_round_trip():
    ex = RMExampleRow("p/0", "p", 0, "train", "Q", "a", "b", ["Concise", "Helpful"],
                      [True, False], "Concise", 1.5, False, 12, 14)
    assert RMExampleRow.from_table(RMExampleRow.to_table([ex])) == [ex]
    summary = RMSummaryRow("reward_model", "builtin:tiny-llama", "/m", "lora", 10, 1, 2, 30, 0,
                           5, 0.7, 0.3, 0.9, None, 100.0, 12.0, 0, 10, 100)
    assert RMSummaryRow.from_table(RMSummaryRow.to_table([summary])) == [summary]


# --- the score head (loads the tiny model, ~1 s each) ------------------------------------------


def test_lora_score_head_trains_adapters_and_the_head(tiny_model):
    from dromedary_ray.models import TINY_LLAMA
    from dromedary_ray.runtime.train_common import load_model

    cfg = TrainConfig(method="lora", lora_rank=4, lora_alpha=8)
    model, counts = load_model(tiny_model, cfg, head="score")
    assert model.config.pad_token_id == 2 and model.config.num_labels == 1
    hidden, layers = TINY_LLAMA["hidden_size"], TINY_LLAMA["num_hidden_layers"]
    # rank-4 A and B on q, k, v, o of each layer, plus the whole score head (hidden x 1).
    assert counts["trainable_params"] == layers * 4 * 2 * 4 * hidden + hidden
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable)
    full, _ = load_model(tiny_model, TrainConfig(), head="score")
    assert type(full).__name__ == "LlamaForSequenceClassification"


def test_scorer_batches_give_the_unbatched_scores(tiny_model, tmp_path):
    from dromedary_ray.config import EngineConfig
    from dromedary_ray.engines.reward import make_reward_scorer
    from dromedary_ray.runtime.train_common import load_model, load_tokenizer

    torch.manual_seed(0)
    model, _ = load_model(tiny_model, TrainConfig(), head="score")
    model.save_pretrained(tmp_path / "rm")
    load_tokenizer(tiny_model).save_pretrained(tmp_path / "rm")
    texts = [t for e in (example(), example(negated=(True,))) for t in example_texts(PSET, e)]
    texts.append("A very short one:")
    batched = make_reward_scorer(str(tmp_path / "rm"), "transformers", EngineConfig(),
                                 batch_size=8).score(texts)
    single = make_reward_scorer(str(tmp_path / "rm"), "transformers", EngineConfig(),
                                batch_size=1).score(texts)
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) == len(texts)  # really different inputs
