"""I-SHEEP's pure parts: grade parsing, the expected score, the filter, rubrics, iterations."""

import json
import math
from pathlib import Path

import pytest

from dromedary_ray.algos.assess import (
    REJECT_GRADE_MISSING,
    REJECT_GRADE_OUT_OF_RANGE,
    REJECT_GRADE_UNPARSEABLE,
    expected_score,
    first_digits,
    histogram,
    keep_pair,
    parse_grade,
)
from dromedary_ray.config import load_config
from dromedary_ray.errors import ConfigError, InputFileError
from dromedary_ray.pipeline.driver import stage_fingerprints
from dromedary_ray.pipeline.isheep import grade_order, iteration_config, iteration_dir
from dromedary_ray.principles import load_rubrics


@pytest.mark.parametrize("text, score", [
    ("9", 9.0), (" 10", 10.0), ("7/10", 7.0), ("8 out of 10", 8.0), ("9.", 9.0),
    ("6. Mostly right, misses the second part.", 6.0), ("3, too vague", 3.0),
    ("10\nThe answer is complete.", 10.0), ("1", 1.0), ("5 - fine", 5.0), ("9.5", 9.5),
    ("8.25/10", 8.25),
])
def test_valid_grades_parse(text, score):
    assert parse_grade(text, 1, 10).score == score
    assert parse_grade(text, 1, 10).reject_reason is None


@pytest.mark.parametrize("text, reason", [
    ("", REJECT_GRADE_MISSING), ("   \n9", REJECT_GRADE_MISSING),
    ("Great answer", REJECT_GRADE_MISSING), ("about 9", REJECT_GRADE_MISSING),
    ("0", REJECT_GRADE_OUT_OF_RANGE), ("11", REJECT_GRADE_OUT_OF_RANGE),
    ("95", REJECT_GRADE_OUT_OF_RANGE), ("10.5", REJECT_GRADE_OUT_OF_RANGE),
    ("9.5.1", REJECT_GRADE_UNPARSEABLE),
    ("9 or 10", REJECT_GRADE_UNPARSEABLE), ("8-9", REJECT_GRADE_UNPARSEABLE),
    ("9x", REJECT_GRADE_UNPARSEABLE), ("9/5", REJECT_GRADE_UNPARSEABLE),
    ("7 because 2 parts", REJECT_GRADE_UNPARSEABLE),
])
def test_invalid_grades_are_rejected_with_a_reason(text, reason):
    grade = parse_grade(text, 1, 10)
    assert grade.score is None and grade.reject_reason == reason


def test_a_narrower_scale_moves_the_range():
    assert parse_grade("5", 1, 5).score == 5.0
    assert parse_grade("6", 1, 5).reject_reason == REJECT_GRADE_OUT_OF_RANGE
    assert parse_grade("0", 0, 5).score == 0.0


def test_expected_score_by_hand():
    # p(1)=0.2 of which half goes on to "0" (a 10), p(9)=0.5, p(5)=0.3, others ~0.
    logp = {d: -50.0 for d in first_digits(1, 10)}
    logp.update({"1": math.log(0.2), "9": math.log(0.5), "5": math.log(0.3)})
    got = expected_score(logp, math.log(0.5), 1, 10)
    assert got == pytest.approx(0.1 * 1 + 0.1 * 10 + 0.5 * 9 + 0.3 * 5, abs=1e-9)
    # Mass off the digits does not count: scaling every probability changes nothing.
    scaled = {d: v + math.log(0.01) for d, v in logp.items()}
    assert expected_score(scaled, math.log(0.5), 1, 10) == pytest.approx(got)
    # Certain "0" after "1": all of "1" is a 10; no second digit on a 1-5 scale.
    assert expected_score(logp, 0.0, 1, 10) == pytest.approx(0.2 * 10 + 0.5 * 9 + 0.3 * 5)
    five = {"1": math.log(0.5), "2": -60.0, "3": -60.0, "4": -60.0, "5": math.log(0.5)}
    assert expected_score(five, None, 1, 5) == pytest.approx(3.0)


def test_first_digits_cover_the_scale():
    assert first_digits(1, 10) == [str(d) for d in range(1, 10)]
    assert first_digits(0, 5) == ["0", "1", "2", "3", "4", "5"]


def test_filter_keeps_exactly_the_pairs_above_the_threshold():
    pairs = {"a": [9, 9], "b": [9, 8], "c": [10, 8.01], "d": [8, 10], "e": [2, 10], "f": [10, 10]}
    kept = sorted(k for k, scores in pairs.items() if keep_pair(scores, 8.0))
    assert kept == ["a", "c", "f"]  # "exceed 8": an 8 itself is not enough
    assert sorted(k for k, s in pairs.items() if keep_pair(s, 1.0)) == sorted(pairs)


def test_histogram_rounds_and_lists_every_grade():
    hist = histogram([1.0, 9.4, 9.6, 10.0, 8.5], 1, 10)
    assert list(hist) == [str(g) for g in range(1, 11)]
    assert hist["1"] == 1 and hist["9"] == 2 and hist["10"] == 2 and sum(hist.values()) == 5


def test_plotted_grades_keep_numeric_order_after_a_json_round_trip():
    hist = histogram([10, 9, 2], 1, 10)
    reread = json.loads(json.dumps(hist, sort_keys=True))  # as metrics.jsonl stores it
    assert list(reread)[:2] == ["1", "10"]
    assert grade_order(reread) == [str(g) for g in range(1, 11)]


def test_shipped_rubrics_load_and_render():
    rubrics = load_rubrics("principles/isheep_rubrics.yaml")
    assert (rubrics.min_score, rubrics.max_score) == (1, 10)
    quality, following = rubrics.pick(("quality", "following"))
    text = quality.render("Name a {curly} prime.", "Seven.")
    assert "Name a {curly} prime." in text and "Seven." in text and "{answer}" not in text
    assert following.name == "following"


@pytest.mark.parametrize("body, key", [
    ("min_score: 1\nmax_score: 12\nanswer_lead: 'S: '\nrubrics: []\n", "max_score"),
    ("min_score: 1\nmax_score: 10\nrubrics: []\n", "answer_lead"),
    ("min_score: 1\nmax_score: 10\nanswer_lead: 'S: '\nrubrics: []\n", "rubrics"),
    ("min_score: 1\nmax_score: 10\nanswer_lead: 'S: '\nrubrics:\n  - name: q\n"
     "    template: 'no slots {query}'\n", "rubrics[0].template"),
    ("min_score: 1\nmax_score: 10\nanswer_lead: 'S: '\nrubrics:\n  - template: '{query}'\n",
     "rubrics[0].name"),
    ("min_score: one\nmax_score: 10\n", "min_score"),
])
def test_malformed_rubric_files_name_the_key(tmp_path: Path, body, key):
    path = tmp_path / "rubrics.yaml"
    path.write_text(body)
    with pytest.raises(InputFileError) as err:
        load_rubrics(path)
    assert err.value.key == key and str(path) in str(err.value)


def test_unknown_rubric_name_is_an_error_naming_it():
    with pytest.raises(InputFileError, match="'style'"):
        load_rubrics("principles/isheep_rubrics.yaml").pick(("quality", "style"))


def test_isheep_config_validates():
    cfg = load_config("configs/local.yaml", ["recipe=isheep"])
    assert cfg.isheep.assess.threshold == 8.0 and cfg.isheep.init_from == "base"
    with pytest.raises(ConfigError, match="isheep.assess.method"):
        load_config("configs/local.yaml", ["isheep.assess.method=vote"])
    with pytest.raises(ConfigError, match="isheep.init_from"):
        load_config("configs/local.yaml", ["isheep.init_from=latest"])


def test_each_iteration_has_its_folder_model_and_seeds(tmp_path: Path):
    cfg = load_config("configs/local.yaml", ["recipe=isheep", f"run_dir={tmp_path}"])
    one, two = iteration_config(cfg, 1), iteration_config(cfg, 2)
    assert one.run_dir == str(iteration_dir(cfg, 1)) == str(tmp_path / "isheep" / "iter_1")
    assert one.model == cfg.model and one.isheep.base_model == cfg.model
    assert two.model == str(tmp_path / "isheep" / "iter_1" / "sft" / "model")
    assert two.isheep.base_model == cfg.model  # init_from base trains from the base
    assert two.isheep.answer.sampling.seed == one.isheep.answer.sampling.seed + 1
    assert two.synthesize.self_instruct.sampling.seed == \
        one.synthesize.self_instruct.sampling.seed + 1
    same = iteration_config(load_config("configs/local.yaml", [
        "recipe=isheep", f"run_dir={tmp_path}", "isheep.reseed=false"]), 2)
    assert same.isheep.answer.sampling.seed == one.isheep.answer.sampling.seed


def test_a_change_upstream_changes_every_later_fingerprint(tmp_path: Path):
    cfg = load_config("configs/local.yaml", ["recipe=isheep", f"run_dir={tmp_path}"])
    two = iteration_config(cfg, 2)
    a, b = stage_fingerprints(two, "iteration-1-A"), stage_fingerprints(two, "iteration-1-B")
    assert all(a[s] != b[s] for s in two.stages)
    assert stage_fingerprints(two, "iteration-1-A") == a
    # The threshold changes what assess keeps, so assess and sft rerun but not the earlier two.
    stricter = iteration_config(load_config("configs/local.yaml", [
        "recipe=isheep", f"run_dir={tmp_path}", "isheep.assess.threshold=9.0"]), 2)
    c = stage_fingerprints(stricter, "iteration-1-A")
    assert c["synthesize"] == a["synthesize"] and c["answer"] == a["answer"]
    assert c["assess"] != a["assess"] and c["sft"] != a["sft"]
