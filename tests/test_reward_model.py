"""The principle-following reward model on real Ray Train + DeepSpeed ZeRO-3 (+ peft) on CPU.

A synthetic preference set where the right answer depends on the principle text: every prompt
has a short and a long answer; "Concise" prefers the short one and "Thorough" the long one, and
a negated principle prefers the other. The same pair of responses is therefore chosen under one
principle list and rejected under another, so a model that ignores the principles cannot rank
more than half of the held-out examples right. Two gloo workers train the tiny random LLaMA.
"""

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dromedary_ray.algos.rm_data import example_texts, split_heldout
from dromedary_ray.algos.salmon_prefs import JudgedPair, JudgeScore, aggregate_rm_examples
from dromedary_ray.config import PROJECT_ROOT, TrainConfig, load_config
from dromedary_ray.data.salmon_schemas import PreferenceRow, RMExampleRow, RMSummaryRow
from dromedary_ray.data.schemas import RejectRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.pipeline.driver import run_stage
from dromedary_ray.salmon_principles import load_salmon_principles

pytestmark = pytest.mark.slow

PSET = load_salmon_principles("principles/salmon.yaml")
SUBJECTS = [
    "the moon", "a violin", "Mount Fuji", "photosynthesis", "the Nile", "a glacier",
    "the printing press", "a honeybee", "the Roman Empire", "a lighthouse", "gravity", "the piano",
    "a volcano", "the internet", "a rainbow", "chess", "the heart", "a comet", "the Sahara",
    "coffee", "a bicycle", "the ocean", "democracy", "a compass", "the telescope", "a hurricane",
    "bread", "the alphabet", "a penguin", "electricity", "the Amazon forest", "a sundial", "jazz",
    "a cactus", "the Great Wall", "an octopus", "a thunderstorm", "the calendar", "a windmill",
    "the tide", "a library", "the compass rose", "a waterfall", "the atom", "a kite", "tea",
    "the harp", "a desert fox", "the equator", "a canal", "the brain", "a meteor", "wool",
    "the orchestra", "a seed", "the rainforest", "a clock", "the river Thames", "an eclipse",
    "a bridge", "the Arctic", "a submarine", "the tulip",
]
ASKS = ["What is {s}?", "Tell me about {s}.", "Can you describe {s}?", "Explain {s} to me.",
        "What should I know about {s}?"]
FACTS = ["a well known thing", "something people often ask about", "a common topic",
         "an interesting subject", "a familiar idea", "a part of daily life"]
FILLER = [
    "Many people find this topic fascinating for a number of reasons.",
    "There is a long and rich history behind it that goes back centuries.",
    "Experts have studied it carefully for many years and written about it.",
    "It appears in books, films and conversations all around the world.",
    "Some details are surprising even to those who know it well.",
    "Understanding it better can help in many everyday situations.",
    "It is often discussed in schools, museums and popular articles.",
    "Its story connects with science, culture and human curiosity.",
    "People from different countries see it in slightly different ways.",
    "Learning more about it is a rewarding experience for anyone.",
]
# principle -> +1 prefers the short answer, -1 the long one (when not negated)
PREFERS_SHORT = {"Concise": 1.0, "Thorough": -1.0}


def prompts(n: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """(pair_id, prompt, short answer, long answer) per prompt."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = SUBJECTS[i % len(SUBJECTS)]
        short = f"{s[0].upper()}{s[1:]} is {rng.choice(FACTS)}."
        long = short + " " + " ".join(rng.sample(FILLER, rng.randint(3, 5)))
        out.append((f"p{i:03d}", rng.choice(ASKS).format(s=s), short, long))
    return out


def judgements(pairs, seed: int = 0) -> list[PreferenceRow]:
    """What the preferences stage would write: each pair judged under Concise and Thorough,
    consistent in both orders, with the short answer shown first or second at random."""
    rng = random.Random(seed)
    rows = []
    for pid, prompt, short, long in pairs:
        short_first = rng.random() < 0.5
        a, b = (short, long) if short_first else (long, short)
        for name, sign in PREFERS_SHORT.items():
            gap = sign * (1.0 if short_first else -1.0) * rng.uniform(1.0, 3.0)
            rows.append(PreferenceRow(f"{pid}/{name}", pid, "general", prompt, a, b, name,
                                      gap, gap * rng.uniform(0.6, 1.0), gap * 0.8, True))
    return rows


def judged_pairs(rows: list[PreferenceRow]) -> list[JudgedPair]:
    return [JudgedPair(r.pair_id, r.pair_id, r.prompt, r.response_a, r.response_b, r.principle,
                       JudgeScore(r.forward, r.backward, r.consistent, r.score)) for r in rows]


# --- the RM follows its principles --------------------------------------------------------------

HELDOUT = 0.2
STEPS = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local, tiny_model):
    from dromedary_ray.runtime.train_rm import train_reward_model

    pairs = prompts(64)
    agg = aggregate_rm_examples(judged_pairs(judgements(pairs)), PSET, seed=0,
                                principles_per_example=(1, 1), negate_prob=0.5, flip_prob=0.0,
                                draws_per_pair=4)
    train, heldout = split_heldout(agg.examples, HELDOUT)
    held_ids = {e.pair_id for e in heldout}
    out = tmp_path_factory.mktemp("rm")
    cfg = TrainConfig(num_workers=2, zero_stage=3, learning_rate=1e-3, warmup_ratio=0.0,
                      micro_batch_size=4, epochs=5, max_steps=STEPS, max_seq_len=256,
                      checkpoint_every_steps=1000, log_every_steps=16)
    result = train_reward_model([example_texts(PSET, e) for e in train],
                                base_model_path=tiny_model, out_dir=str(out / "model"), cfg=cfg,
                                metrics_path=str(out / "rm_log.jsonl"))
    return out, result, heldout, [p for p in pairs if p[0] in held_ids]


def test_rm_training_logs_every_step_and_loss_falls(trained):
    out, result, _, _ = trained
    assert result.steps == STEPS and result.examples > 150
    log = [json.loads(line) for line in (out / "rm_log.jsonl").open()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert all(0 <= r["accuracy"] <= 1 and 0 < r["pairs"] <= 8 and r["tokens"] > 0 for r in log)
    first = sum(r["loss"] for r in log[:4]) / 4
    last = sum(r["loss"] for r in log[-4:]) / 4
    assert first > 0.5 and last < 0.25, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert [c[1:] for c in result.curve] == [(r["loss"], r["accuracy"]) for r in log]


def test_saved_folder_is_a_plain_one_label_classifier(trained):
    out, _, _, _ = trained
    config = json.loads((out / "model/config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert len(config["id2label"]) == 1 and config["pad_token_id"] == 2
    assert config.get("use_cache", True)
    assert not (out / "model/adapter_config.json").exists()


def test_heldout_accuracy_and_principles_reverse_the_preference(trained):
    from dromedary_ray.config import EngineConfig
    from dromedary_ray.engines.reward import make_reward_scorer
    from dromedary_ray.salmon_principles import render_rm_input
    from dromedary_ray.stages.reward_model import pairwise_accuracy_of

    out, _, heldout, held_prompts = trained
    scorer = make_reward_scorer(str(out / "model"), "transformers",
                                EngineConfig(max_model_len=512))
    held = pairwise_accuracy_of(scorer, [example_texts(PSET, e) for e in heldout])
    assert held["pairs"] >= 20
    assert held["accuracy"] >= 0.9, held
    # The same two answers to an unseen prompt, under each principle and its negation.
    for name, sign in PREFERS_SHORT.items():
        for negated in (False, True):
            wants_short = (sign > 0) != negated
            principles = [(PSET.get(name), negated)]
            right = 0
            for _, prompt, short, long in held_prompts:
                s_short, s_long = scorer.score([render_rm_input(PSET, prompt, r, principles)
                                                for r in (short, long)])
                right += (s_short > s_long) == wants_short
            assert right / len(held_prompts) >= 0.9, (name, negated, right, len(held_prompts))


def test_vllm_pooling_runner_gives_the_transformers_scores(trained):
    """The PPO reward actor may host the folder on vLLM: its raw classify output (no sigmoid)
    at the last prompt token must be the score transformers computes."""
    from vllm import PoolingParams

    from dromedary_ray.config import EngineConfig
    from dromedary_ray.engines.reward import make_reward_scorer
    from dromedary_ray.engines.vllm_engine import VLLMEngine

    out, _, heldout, _ = trained
    texts = [t for e in heldout[:4] for t in example_texts(PSET, e)]
    expected = make_reward_scorer(str(out / "model"), "transformers",
                                  EngineConfig(max_model_len=512)).score(texts)
    engine = VLLMEngine(str(out / "model"), EngineConfig(max_model_len=512, kv_cache_gib=1,
                                                         cpus_per_engine=1),
                        llm_kwargs={"runner": "pooling"})
    try:
        got = engine.llm.classify(texts, pooling_params=PoolingParams(use_activation=False))
    finally:
        engine.close()
    assert [o.outputs.probs[0] for o in got] == pytest.approx(expected, abs=1e-3)


# --- the stage, through the driver ---------------------------------------------------------------

STAGE_STEPS = 30
STAGE = [
    "model=builtin:tiny-llama",
    "recipe=salmon",
    "reward_model.heldout_fraction=0.2",
    "reward_model.max_principles=1",
    "reward_model.flip_prob=0.0",
    "reward_model.draws_per_pair=3",
    "reward_model.train.method=lora",
    "reward_model.train.lora_rank=8",
    "reward_model.train.lora_alpha=16",
    "reward_model.train.lora_dropout=0.0",
    "reward_model.train.lora_target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj]",
    "reward_model.train.num_workers=2",
    "reward_model.train.learning_rate=0.01",
    "reward_model.train.warmup_ratio=0.0",
    "reward_model.train.micro_batch_size=4",
    "reward_model.train.epochs=10",
    f"reward_model.train.max_steps={STAGE_STEPS}",
    "reward_model.train.checkpoint_every_steps=10",
    "reward_model.train.max_seq_len=256",
    "reward_model.train.log_every_steps=10",
]


def preference_table() -> list[PreferenceRow]:
    """48 judged pairs, one with no consistent judgement, one whose long answer is too long."""
    rows = judgements(prompts(48), seed=1)
    pid, prompt = "zz-inconsistent", "What is a sundial?"
    rows += [PreferenceRow(f"{pid}/Concise", pid, "general", prompt, "A clock.", "A clock. " * 5,
                           "Concise", 1.0, -1.0, 0.0, False)]
    pid, huge = "zz-huge", "It is big. " * 200
    rows += [PreferenceRow(f"{pid}/{name}", pid, "general", "How big is it?", "Big.", huge,
                           name, s, s, s, True)
             for name, s in (("Concise", 2.0), ("Thorough", -2.0))]
    return rows


def test_reward_model_stage_resumes_and_writes_model_metrics_logs_and_rejects(
        ray_local, tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    marker = tmp_path / "killed"
    monkeypatch.setenv("DROMEDARY_FAULT", f"train_step:15:{marker}")
    run_dir = tmp_path / "run"
    StageStore(str(run_dir), "preferences").write_table(
        PreferenceRow.to_table(preference_table()), RejectRow.empty())
    config = load_config(PROJECT_ROOT / "configs/local.yaml", [f"run_dir={run_dir}", *STAGE])
    report = run_stage(config, "reward_model", {"preferences": "hand-written"})
    assert marker.exists(), "the fault hook never fired: the test proved nothing"
    assert report.status == "ran"
    m = report.metrics
    assert m["resumed_from_step"] == 10 and m["steps"] == STAGE_STEPS
    assert m["examples"] + m["heldout_examples"] == 48 * 3  # 48 usable pairs, 3 draws each
    assert m["heldout_examples"] > 0 and m["heldout_examples"] % 3 == 0
    assert m["final_loss"] < m["first_loss"]
    assert m["train_accuracy"] >= 0.75 and m["heldout_accuracy"] >= 0.75, m
    store = StageStore(str(run_dir), "reward_model")
    manifest = store.read_manifest()
    assert manifest["status"] == "done" and manifest["metrics"]["heldout_accuracy"] == \
        m["heldout_accuracy"]
    (summary,) = RMSummaryRow.from_table(store.read("data", RMSummaryRow.SCHEMA))
    assert summary.judged_pairs == 50 and summary.rejected_pairs == 1 and summary.too_long == 3
    assert summary.method == "lora" and summary.trainable_params < summary.total_params / 10
    rejects = {r.id: r for r in RejectRow.from_table(store.read("rejects", RejectRow.SCHEMA))}
    assert rejects["zz-inconsistent"].reason == "no_consistent_judgement"
    assert {i for i, r in rejects.items() if r.reason == "rm_input_too_long"} == {
        "zz-huge/0", "zz-huge/1", "zz-huge/2"}
    # One log line per step although steps 11-15 ran twice, accuracy beside the loss.
    log = [json.loads(x) for x in (run_dir / "reward_model/rm_log.jsonl").open()]
    assert [r["step"] for r in log] == list(range(1, STAGE_STEPS + 1))
    assert all({"loss", "accuracy"} <= set(r) for r in log)
    examples = RMExampleRow.from_table(pq.read_table(run_dir / "reward_model/examples.parquet"))
    assert len(examples) == m["examples"] + m["heldout_examples"]
    assert {e.split for e in examples} == {"train", "heldout"}
    # LoRA merged: a plain folder transformers loads without peft, score head included.
    model_dir = Path(store.model_dir)
    assert not (model_dir / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert model.config.num_labels == 1 and torch.isfinite(model.score.weight).all()
