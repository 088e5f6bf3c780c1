"""The engrave stage and its trainer on real Ray Train + DeepSpeed ZeRO-3 (+ peft) on CPU.

Two gloo workers fine-tune the tiny random LLaMA. Each test asserts that something changed
(loss fell, weights moved) and that what was saved is what was trained.
"""

import functools
import json
from pathlib import Path

import pytest
import torch

from dromedary_ray.config import PROJECT_ROOT, TrainConfig, load_config
from dromedary_ray.data.schemas import RejectRow, SelfAlignRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.data.train_schemas import TrainSummaryRow
from dromedary_ray.pipeline.driver import run_stage

pytestmark = pytest.mark.slow

STEPS = 36
ENGRAVE = [
    "model=builtin:tiny-llama",
    "engrave.train.num_workers=2",
    "engrave.train.zero_stage=3",
    "engrave.train.learning_rate=0.001",
    "engrave.train.warmup_ratio=0.0",
    "engrave.train.micro_batch_size=2",
    "engrave.train.epochs=20",
    f"engrave.train.max_steps={STEPS}",
    "engrave.train.checkpoint_every_steps=10",
    "engrave.train.max_seq_len=96",
    "engrave.train.log_every_steps=12",
]
COLOURS = ["red", "blue", "green", "white", "black", "yellow", "orange", "purple"]


def self_align_rows() -> list[SelfAlignRow]:
    """Sixteen short principled answers, and one query too long to train on."""
    rows = []
    for i in range(16):
        colour = COLOURS[i % len(COLOURS)]
        rows.append(SelfAlignRow(
            id=f"q{i:02d}", query=f"What colour is item number {i}?",
            thoughts="The user asks a simple question (2 helpful).",
            answer=f"Item number {i} is {colour}. I hope this helps!",
            prompt_tokens=0, completion_tokens=0, mean_logprob=0.0, finish_reason="stop"))
    rows.append(SelfAlignRow(
        id="zz-long", query="Please summarise: " + "blah " * 150, thoughts="t", answer="No.",
        prompt_tokens=0, completion_tokens=0, mean_logprob=0.0, finish_reason="stop"))
    return rows


def engrave(run_dir: Path, probe: Path | None = None):
    """Run the engrave stage through the driver on a hand-written self_align table."""
    StageStore(str(run_dir), "self_align").write_table(
        SelfAlignRow.to_table(self_align_rows()), RejectRow.empty())
    config = load_config(PROJECT_ROOT / "configs/local.yaml", [f"run_dir={run_dir}", *ENGRAVE])
    with pytest.MonkeyPatch.context() as mp:
        if probe is not None:  # ask the trainer to record the trained model's logits
            import dromedary_ray.runtime.train as train_mod

            mp.setattr(train_mod, "train_sft",
                       functools.partial(train_mod.train_sft, probe_path=str(probe)))
        return run_stage(config, "engrave", {"self_align": "hand-written"})


def logits(model_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids).logits


@pytest.fixture(scope="module")
def engraved(tmp_path_factory, ray_local, tiny_model):
    run_dir = tmp_path_factory.mktemp("engrave")
    probe = run_dir / "probe.pt"
    report = engrave(run_dir, probe)
    return run_dir, report, torch.load(probe)


def test_engrave_loss_falls_and_outputs_are_complete(engraved):
    run_dir, report, _ = engraved
    assert report.status == "ran"
    curve = [json.loads(line) for line in (run_dir / "engrave/loss_curve.jsonl").open()]
    assert [c["step"] for c in curve] == list(range(1, STEPS + 1))
    losses = [c["loss"] for c in curve]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 2.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    store = StageStore(str(run_dir), "engrave")
    (summary,) = TrainSummaryRow.from_table(store.read("data", TrainSummaryRow.SCHEMA))
    assert summary.steps == STEPS and summary.examples == 16 and summary.method == "full"
    assert summary.trainable_params == summary.total_params > 0
    assert summary.final_loss == pytest.approx(losses[-1])
    # The over-long query is rejected with a reason, never silently dropped.
    (reject,) = RejectRow.from_table(store.read("rejects", RejectRow.SCHEMA))
    assert reject.id == "zz-long" and reject.reason == "prompt_too_long"
    manifest = store.read_manifest()
    assert manifest["status"] == "done" and manifest["metrics"]["steps"] == STEPS
    assert manifest["metrics"]["resumed_from_step"] == 0
    log = [json.loads(line) for line in (run_dir / "engrave/train_log.jsonl").open()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert all(r["tokens"] > 0 and r["seconds"] > 0 for r in log)
    assert list((run_dir / "engrave/tensorboard").glob("events.out.tfevents.*"))


def test_saved_folder_reproduces_the_trained_model(engraved, tiny_model):
    run_dir, _, probe = engraved
    model_dir = str(run_dir / "engrave/model")
    # Training turns the KV cache off; the saved config must not keep generation slow.
    assert json.loads((run_dir / "engrave/model/config.json").read_text()).get("use_cache", True)
    reloaded = logits(model_dir, probe["input_ids"])
    torch.testing.assert_close(reloaded, probe["logits"], rtol=1e-4, atol=1e-4)
    # ... and the weights did move: the base model's logits are far from the trained ones.
    base = logits(tiny_model, probe["input_ids"])
    assert (base - probe["logits"]).abs().max() > 0.5


def test_vllm_loads_the_engraved_model(engraved):
    """vLLM reads the folder, and its log-probs agree with a transformers forward."""
    from dromedary_ray.config import EngineConfig, SamplingConfig
    from dromedary_ray.engines.vllm_engine import VLLMEngine
    from dromedary_ray.prompts import render_chat

    run_dir, _, _ = engraved
    model_dir = str(run_dir / "engrave/model")
    engine = VLLMEngine(model_dir, EngineConfig(max_model_len=256, kv_cache_gib=1,
                                                cpus_per_engine=1), seed=0)
    try:
        prompt = render_chat(engine.tokenizer, [{"role": "user",
                                                 "content": "What colour is item number 3?"}])
        gen = engine.generate([prompt], SamplingConfig(temperature=0.0, max_new_tokens=6))[0]
    finally:
        engine.close()
    comp = gen.completions[0]
    prompt_ids = engine.tokenizer(prompt, add_special_tokens=False).input_ids
    ref = logits(model_dir, torch.tensor([prompt_ids + comp.token_ids]))[0].log_softmax(-1)
    n = len(prompt_ids)
    expected = [ref[n - 1 + j, t].item() for j, t in enumerate(comp.token_ids)]
    assert comp.logprobs == pytest.approx(expected, abs=1e-3)
    # Trained on "Item number {i} is ...": the greedy answer starts the same way.
    assert comp.text.startswith("Item")


def test_lora_trains_only_adapters_and_merges_into_plain_weights(ray_local, tiny_model, tmp_path):
    from dromedary_ray.models import TINY_LLAMA
    from dromedary_ray.runtime.train import train_sft

    cfg = TrainConfig(method="lora", lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                      merge_lora=True, num_workers=2, zero_stage=3, learning_rate=5e-3,
                      warmup_ratio=0.0, micro_batch_size=2, epochs=5, max_steps=10,
                      checkpoint_every_steps=100, max_seq_len=96)
    records = [{"query": r.query, "answer": r.answer} for r in self_align_rows()[:16]]
    out = tmp_path / "lora/model"
    result = train_sft(records, base_model_path=tiny_model, out_dir=str(out), cfg=cfg,
                       probe_path=str(tmp_path / "probe.pt"))
    # Rank-8 A (8 x 128) and B (128 x 8) on q, k, v, o of each layer: nothing else trains.
    hidden, layers = TINY_LLAMA["hidden_size"], TINY_LLAMA["num_hidden_layers"]
    assert result.trainable_params == layers * 4 * 2 * 8 * hidden
    assert result.total_params > 100 * result.trainable_params
    assert result.steps == 10 and result.final_loss < result.first_loss
    # Merged: a plain transformers folder, no adapter files, no peft needed to load it.
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    probe = torch.load(tmp_path / "probe.pt")
    merged = logits(str(out), probe["input_ids"])
    torch.testing.assert_close(merged, probe["logits"], rtol=1e-4, atol=1e-4)
    base = logits(tiny_model, probe["input_ids"])
    assert (base - merged).abs().max() > 0.05
