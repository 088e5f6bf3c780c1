"""I-SHEEP on real engines: the two grading paths agree on a model whose next-token distribution
we set by hand, and the iterated recipe runs, stops, resumes and skips through the CLI."""

import json
import math
import os
from pathlib import Path

import pytest
from tiny_run import STOP, dromedary, tiny_synthesis, train

from dromedary_ray.config import PROJECT_ROOT, AssessConfig, EngineConfig, SamplingConfig
from dromedary_ray.data.schemas import AnswerRow, AssessRow
from dromedary_ray.principles import load_rubrics

pytestmark = pytest.mark.slow

# The grade distribution after "Score: ", and p("0" | "Score: 1"): the chance a "1" is a 10.
DESIGN = {1: 0.10, 2: 0.02, 3: 0.03, 4: 0.05, 5: 0.10, 6: 0.10, 7: 0.15, 8: 0.20, 9: 0.25}
P_TEN = 0.4


def design_moments() -> tuple[float, float]:
    grades = {g: p for g, p in DESIGN.items() if g != 1}
    grades[1], grades[10] = DESIGN[1] * (1 - P_TEN), DESIGN[1] * P_TEN
    mean = sum(g * p for g, p in grades.items())
    return mean, sum(p * (g - mean) ** 2 for g, p in grades.items())


@pytest.fixture(scope="module")
def grader_model(tmp_path_factory, tiny_model) -> str:
    """A LLaMA whose next token depends only on the last token, with logits we choose.

    Attention and MLP outputs are zeroed, so the final hidden state is the last token's
    embedding; each token we care about gets its own embedding axis, and the LM head's column
    on that axis holds the log-probs we want after it: a digit after "Score: ", "0" or a line
    end after "1", a line end after any other digit.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dromedary_ray.models import TINY_LLAMA

    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **{**TINY_LLAMA, "tie_word_embeddings": False})
    model = LlamaForCausalLM(config)
    ids = {t: tok(t, add_special_tokens=False).input_ids for t in [" ", "\n", *"0123456789"]}
    assert all(len(v) == 1 for v in ids.values()), ids
    ids = {t: v[0] for t, v in ids.items()}
    hidden = config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        head.fill_(-30.0)
        axis = {" ": 0, "1": 1, **{d: 2 for d in "023456789"}}
        for t, a in axis.items():
            emb[ids[t], a] = 100.0  # RMSNorm turns this into sqrt(hidden) on axis a
        scale = 1 / math.sqrt(hidden)
        for g, p in DESIGN.items():
            head[ids[str(g)], 0] = math.log(p) * scale
        head[ids["0"], 1] = math.log(P_TEN) * scale
        head[ids["\n"], 1] = math.log(1 - P_TEN) * scale
        head[ids["\n"], 2] = 0.0
    out = tmp_path_factory.mktemp("grader")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_expected_score_agrees_with_sampled_grades(grader_model, backend):
    from dromedary_ray.engines import make_engine
    from dromedary_ray.stages.assess import AssessTask

    n = 400
    rows = [AnswerRow(f"r{i:04d}", f"Question {i}?", f"Answer {i}.", 10, 3, -1.0, "stop")
            for i in range(n)]
    engine = make_engine(grader_model, EngineConfig(backend=backend, max_model_len=1024,
                                                    kv_cache_gib=1, cpus_per_engine=1))
    try:
        rubrics = load_rubrics("principles/isheep_rubrics.yaml")
        sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=4, stop=("\n",))
        generate = AssessTask(engine.tokenizer, AssessConfig(
            rubrics=("quality",), method="generate", sampling=sampling), rubrics)
        expected = AssessTask(engine.tokenizer, AssessConfig(
            rubrics=("quality",), method="expected"), rubrics)
        sampled = AssessRow.from_table(generate.process(engine, AnswerRow.to_table(rows)).kept)
        exact = AssessRow.from_table(expected.process(engine, AnswerRow.to_table(rows[:8])).kept)
    finally:
        engine.close()
    mean, var = design_moments()
    assert len(sampled) == n  # every sampled grade parsed: the model only writes grades
    assert {r.grades[0] for r in sampled} <= {str(g) for g in range(1, 11)}
    assert any(r.scores[0] == 10.0 for r in sampled)  # the two-token grade is reached
    got = sum(r.scores[0] for r in sampled) / n
    assert abs(got - mean) < 4 * math.sqrt(var / n), (got, mean)
    assert [r.scores[0] for r in exact] == pytest.approx([mean] * 8, abs=1e-3)
    assert all(r.grades == [""] for r in exact)


TINY = [
    "recipe=isheep", "isheep.iterations=2", *tiny_synthesis(2048),
    "isheep.answer.min_answer_words=1", "isheep.answer.sampling.max_new_tokens=16",
    f"isheep.answer.sampling.stop={STOP}",
    # A random model's grades say nothing; keep every pair so that each iteration trains.
    "isheep.assess.method=expected", "isheep.assess.threshold=0.0",
    *[f"isheep.train.{t}" for t in train(2)],
]
STAGES = ("synthesize", "answer", "assess", "sft")


def test_two_iterations_stop_resume_and_skip(tmp_path: Path):
    run = tmp_path / "run"
    cmd = ["run", str(PROJECT_ROOT / "configs/local.yaml"), "--run-dir", str(run), *TINY]
    marker = tmp_path / "killed"
    # Iteration 1 passes the between-stages fault point 4 times; the 6th hit is in iteration 2,
    # after its answer stage: the driver dies there.
    first = dromedary(*cmd, env={**os.environ, "DROMEDARY_FAULT": f"driver_stage:6:{marker}"})
    assert first.returncode == -9 and marker.exists(), first.stderr[-3000:]
    it1, it2 = run / "isheep" / "iter_1", run / "isheep" / "iter_2"
    assert json.loads((it1 / "manifest.json").read_text())["status"] == "done"
    assert json.loads((it2 / "manifest.json").read_text())["status"] == "running"
    model_1 = it1 / "sft" / "model" / "model.safetensors"
    stamp = model_1.stat().st_mtime_ns

    second = dromedary(*cmd)
    assert second.returncode == 0, second.stderr[-3000:]
    log = [line for line in second.stderr.splitlines() if "INFO" in line or "WARN" in line]
    assert model_1.stat().st_mtime_ns == stamp, log[:30]  # the finished iteration is not redone
    lines = {line.split()[0]: line.split()[1] for line in second.stdout.splitlines()
             if line.startswith("iter")}
    assert {s: lines[f"iter1/{s}"] for s in STAGES} == dict.fromkeys(STAGES, "skipped")
    assert lines["iter2/synthesize"] == lines["iter2/answer"] == "skipped"  # done before the kill
    assert lines["iter2/assess"] == lines["iter2/sft"] == "ran"

    manifests = [json.loads((d / "manifest.json").read_text()) for d in (it1, it2)]
    assert [m["status"] for m in manifests] == ["done", "done"]
    assert manifests[1]["model_in"] == str(it1 / "sft" / "model")
    for d in (it1, it2):
        assert (d / "sft" / "model" / "config.json").exists()
        assess = json.loads((d / "assess" / "manifest.json").read_text())
        assert assess["metrics"]["kept"] == assess["metrics"]["graded"] > 0
        sft = json.loads((d / "sft" / "manifest.json").read_text())
        assert sft["metrics"]["steps"] == 2
    # Iteration 2 generated with iteration 1's model and trained from the base.
    answer_2 = json.loads((it2 / "answer" / "manifest.json").read_text())
    assert answer_2["config"]["model"] == str(it1 / "sft" / "model")
    assert json.loads((it2 / "sft" / "manifest.json").read_text())["config"]["init"] == \
        "builtin:tiny-llama"
    records = [json.loads(x) for x in (run / "isheep" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(r["prompts"] > 0 and 0 < r["kept_fraction"] <= 1 and r["final_loss"] > 0
               for r in records)
    assert sum(records[0]["quality_hist"].values()) == records[0]["graded"]
    png = (run / "isheep" / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    third = dromedary(*cmd)  # everything done: both iterations skipped whole
    assert third.returncode == 0, third.stderr[-2000:]
    assert "iteration 1: done with the same fingerprint, skipped" in third.stderr
    assert "iteration 2: done with the same fingerprint, skipped" in third.stderr
