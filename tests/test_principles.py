import json
from pathlib import Path

import pytest

from dromedary_ray.errors import InputFileError
from dromedary_ray.principles import load_principles, load_seed_tasks

RULE_NAMES = [
    "ethical", "informative", "helpful", "question_assessment", "reasoning", "multi_aspect",
    "candor", "knowledge_recitation", "static", "clarification", "numerical_sensitivity",
    "dated_knowledge", "step_by_step", "balanced_perspectives", "creative", "operational",
]


def test_shipped_principles_have_16_rules_and_5_exemplars():
    ps = load_principles("principles/self_align.yaml")
    assert [r.name for r in ps.rules] == RULE_NAMES
    assert len(ps.exemplars) == 5
    # Each exemplar's internal thoughts name at least one rule by number and name.
    for ex in ps.exemplars:
        assert any(f"rule {r.id} ({r.name})" in ex.thoughts for r in ps.rules), ex.thoughts


def test_shipped_seeds_load():
    tasks = load_seed_tasks("principles/seed_tasks.jsonl")
    assert len(tasks) >= 175
    assert len({t.id for t in tasks}) == len(tasks)
    with_input = next(t for t in tasks if t.input)
    assert with_input.query.endswith(with_input.input)
    assert with_input.instruction in with_input.query


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD_YAML = """name: t
assistant_name: A
preamble: p
rules:
  - {id: 1, name: ethical, text: be good}
exemplars:
  - {query: q, thoughts: t, answer: a}
"""


def test_minimal_principle_file_loads(tmp_path):
    ps = load_principles(_write(tmp_path, "p.yaml", GOOD_YAML))
    assert ps.rules[0].text == "be good" and ps.exemplars[0].answer == "a"


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: t\nrules: [unclosed\n", r"p\.yaml:\d+: invalid YAML"),
        (GOOD_YAML.replace("preamble: p\n", ""), r"p\.yaml \[preamble\]: missing required key"),
        (GOOD_YAML.replace("text: be good", "text: ''"),
         r"\[rules\[0\]\.text\]: must not be empty"),
        (GOOD_YAML.replace("id: 1", "id: 2"), r"\[rules\]: rule ids must be 1\.\.1"),
        (GOOD_YAML.replace("id: 1", "id: one"), r"\[rules\[0\]\.id\]: expected int"),
        (GOOD_YAML.replace("thoughts: t, ", ""), r"\[exemplars\[0\]\.thoughts\]: missing"),
        ("- just a list\n", r"expected a mapping"),
    ],
)
def test_malformed_principle_files_name_file_and_key(tmp_path, text, match):
    with pytest.raises(InputFileError, match=match):
        load_principles(_write(tmp_path, "p.yaml", text))


def test_missing_principle_file(tmp_path):
    with pytest.raises(InputFileError, match="file not found"):
        load_principles(tmp_path / "nope.yaml")


def _seed(i: int, **kw) -> str:
    row = {"id": f"s{i}", "instruction": f"Do task {i}.",
           "instances": [{"input": "", "output": "done"}], "is_classification": False}
    row.update(kw)
    return json.dumps(row)


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ('{"id": "s9", "instruction": ', r"seeds\.jsonl:2: not valid JSON"),
        ('["a list"]', r"seeds\.jsonl:2: each line must be a JSON object"),
        (_seed(9, instruction="  "), r"seeds\.jsonl:2 \[instruction\]: missing or empty"),
        (_seed(9, instances=[]), r"seeds\.jsonl:2 \[instances\]: must be a non-empty list"),
        (_seed(9, instances=[{"input": 3}]), r":2 \[instances\[0\]\.input\]: must be a string"),
        (_seed(9, is_classification="no"), r":2 \[is_classification\]: must be true or false"),
        (_seed(0), r"seeds\.jsonl:2 \[id\]: duplicate id 's0'"),
    ],
)
def test_broken_seed_row_names_file_line_and_field(tmp_path, bad_line, match):
    path = _write(tmp_path, "seeds.jsonl", _seed(0) + "\n" + bad_line + "\n" + _seed(2) + "\n")
    with pytest.raises(InputFileError, match=match):
        load_seed_tasks(path)


def test_user_seed_file_without_ids_or_instances(tmp_path):
    path = _write(tmp_path, "mine.jsonl", '{"instruction": "Say hi."}\n\n{"instruction": "Bye."}\n')
    tasks = load_seed_tasks(path)
    assert [t.id for t in tasks] == ["line_1", "line_3"]
    assert tasks[0].query == "Say hi."
