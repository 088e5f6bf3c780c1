"""Bad inputs, property-based (issue 8): whatever a user file, a model output or a request body
holds, our code answers with a result or with our own error naming the place at fault.

* Loaders of user files (config, principles, seeds, system prompt, rubrics, SALMON principles,
  red-team types, the hhh / truthfulqa / ifeval data): every input loads or raises
  `InputFileError` (`ConfigError` for the run config) that names the file, and the line or key
  where one is at fault; never a KeyError, TypeError, YAML or Unicode error from inside.
* Model-output parsers (`parse_grade`, `parse_numbered_list`, `judge_answer`, `LeakDetector`):
  never raise on any text, and return a result of the documented type and range.
* The chat API's `parse_chat_request`: a validated request, or an `ApiError` with a 4xx status
  naming the field; never anything else.

Inputs are generated from the shipped files and fixtures: arbitrary bytes and text, random
YAML/JSON values, the valid document with one field deleted, retyped, emptied or replaced by a
hostile snippet (`!!float abc`, 5,000-digit numbers, nesting deeper than the parser's
recursion), truncated files and invalid UTF-8. Fast tier: no Ray, no engines. Example counts
are the EXAMPLES_* constants below; no example database is kept (`database=None`), so a run
does not replay another's failures: the inputs that broke the code once are pinned at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dromedary_ray.algos.assess import parse_grade
from dromedary_ray.algos.parsing import SELF_ALIGN_REASONS, LeakDetector, judge_answer, words
from dromedary_ray.algos.synthesis import ListItem, parse_numbered_list
from dromedary_ray.config import RunConfig, load_config
from dromedary_ray.errors import ConfigError, InputFileError
from dromedary_ray.eval.hhh import SUBSETS, load_hhh
from dromedary_ray.eval.ifeval import load_ifeval
from dromedary_ray.eval.truthfulqa import load_truthfulqa
from dromedary_ray.principles import (
    load_principles,
    load_rubrics,
    load_seed_tasks,
    load_system_prompt,
)
from dromedary_ray.red_team import load_red_team_types
from dromedary_ray.salmon_principles import (
    JUDGE_PLACEHOLDERS,
    RM_PLACEHOLDERS,
    load_salmon_principles,
    render_judge_prompt,
    render_rm_input,
)
from dromedary_ray.serve.api import ApiError, ChatRequest, Limits, parse_chat_request

ROOT = Path(__file__).resolve().parent.parent

# Examples per property (a parametrized property runs this many per case): 3,455 in all, plus
# 20 pinned inputs. Sized so the whole file takes about 20 s of CPU (one core).
EXAMPLES_CONFIG = 150  # config file (mutated shipped configs, random YAML) + overrides
EXAMPLES_OVERRIDES = 150  # dotted overrides alone
EXAMPLES_ARBITRARY = 40  # per loader: random bytes, text, YAML/JSON values
EXAMPLES_NEAR_VALID = 60  # per loader: the shipped document with one field mutated
EXAMPLES_DAMAGED = 25  # per loader: truncated file or invalid UTF-8 inserted
EXAMPLES_ROUND_TRIP = 40  # per JSONL format: valid rows with arbitrary text load as written
EXAMPLES_TEMPLATE = 60  # SALMON judge / reward-model templates with odd placeholders
EXAMPLES_PARSER = 300  # per model-output parser
EXAMPLES_API = 200  # per request-body property


def fast(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- strategies --------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=12) | st.sampled_from(["", "  ", "0", "true", "{query}"]))
# YAML mappings may have non-string keys; JSON turns them into strings.
keys = st.text(max_size=10) | st.integers(-3, 3) | st.booleans() | st.none()
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=10)
EMPTIES = ["", "   ", [], {}, None, 0]

# Text that breaks parsers rather than schemas: PyYAML's explicit-tag constructors raise plain
# ValueError/KeyError/AttributeError/IndexError; 5,000-digit integers pass Python's int-string
# limit; nesting of 1,500 levels passes the recursion limit of both parsers.
_DEEP = "[" * 1500 + "]" * 1500
YAML_SNIPPETS = st.one_of(
    st.builds("!!{} {}".format,
              st.sampled_from(["int", "float", "bool", "timestamp", "binary", "null", "str",
                               "set", "omap", "pairs", "seq", "map", "python/name:os.system"]),
              st.text(alphabet="abcx0129-:.o '", max_size=8)),
    st.sampled_from(["!!float ''", "!!int ''", "!!timestamp 2020-13-45", "!!int 0o9", _DEEP,
                     "&a [*a]", "*nowhere", "{a: 1, a: 2}", "? [a]\n: 1", "<<: 3", "1" * 5000,
                     "|\n x", '"\\x"', "- - -", "\t", "%YAML 9.9", "\x00", "\ufeff"]),
)
JSON_SNIPPETS = st.one_of(
    st.sampled_from(["1" * 5000, _DEEP, "[" * 1500, "NaN", "-Infinity", "1e999",
                     '"\\ud800"', '{"a": 1, "a": 2}', "tru", "", "{", "\"\u2028\"", "[1,]"]),
    st.text(max_size=10),
)
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\xf0\x28\x8c\x28"]


def node_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path below the root of a YAML/JSON document: keys and list indices."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) \
        else ()
    out = []
    for k, v in items:
        out.append(prefix + (k,))
        out += node_paths(v, prefix + (k,))
    return out


HOLE = "__HOLE__"


@st.composite
def mutated(draw: Any, doc: Any, snippets: st.SearchStrategy) -> tuple[Any, str | None]:
    """(doc with one node deleted, retyped, emptied or holed, the snippet for the hole)."""
    path = draw(st.sampled_from(node_paths(doc)))
    op = draw(st.sampled_from(["delete", "retype", "empty", "hole"]))
    doc = copy.deepcopy(doc)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if op == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = {"retype": lambda: draw(values),
                            "empty": lambda: draw(st.sampled_from(EMPTIES)),
                            "hole": lambda: HOLE}[op]()
    return doc, draw(snippets) if op == "hole" else None


def dump(doc: Any, fmt: str, snippet: str | None = None) -> bytes:
    if fmt == "yaml":
        text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
        hole = HOLE
    elif fmt == "json":
        text = json.dumps(doc, indent=1, ensure_ascii=False)
        hole = f'"{HOLE}"'
    else:  # jsonl: a list of rows, one a line
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in doc)
        hole = f'"{HOLE}"'
    if snippet is not None:
        text = text.replace(hole, snippet, 1)
    return text.encode("utf-8", "surrogatepass")


def damaged(data: st.DataObject, raw: bytes) -> tuple[bytes, bool]:
    """(raw cut short or with an invalid UTF-8 sequence put in, whether it is invalid UTF-8)."""
    cut = data.draw(st.integers(0, len(raw)))
    if data.draw(st.booleans()):
        return raw[:cut], False
    return raw[:cut] + data.draw(st.sampled_from(BAD_UTF8)) + raw[cut:], True


# --- the loaders under test ---------------------------------------------------------------------


def _read(path: str, fmt: str, rows: int | None = None) -> Any:
    text = (ROOT / path).read_text(encoding="utf-8")
    if fmt == "yaml":
        return yaml.safe_load(text)
    if fmt == "json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()][:rows]


@dataclasses.dataclass(frozen=True)
class Loader:
    load: Callable[[str], Any]
    fmt: str  # yaml | json | jsonl
    base: str  # a valid shipped file or fixture, mutated by the near-valid property
    rows: int | None = None  # JSONL: keep the first rows only (speed)
    check: Callable[[Any], Any] | None = None  # what must also work on a loaded result

    @property
    def suffix(self) -> str:
        return "." + self.fmt

    def doc(self) -> Any:
        return _read(self.base, self.fmt, self.rows)


def _use_salmon(pset: Any) -> None:
    """A loaded SALMON set must render its prompts: a template that passes load but fails at
    .format() would crash the preferences or PPO stage hours later."""
    p = pset.principles[0]
    render_judge_prompt(pset, p, "q", "a", "b")
    render_rm_input(pset, "q", "a", [(p, False)])


LOADERS = {
    "principles": Loader(load_principles, "yaml", "principles/self_align.yaml"),
    "system_prompt": Loader(load_system_prompt, "yaml", "principles/verbose.yaml"),
    "rubrics": Loader(load_rubrics, "yaml", "principles/isheep_rubrics.yaml"),
    "salmon": Loader(load_salmon_principles, "yaml", "principles/salmon.yaml", check=_use_salmon),
    "red_team": Loader(load_red_team_types, "yaml", "principles/red_team_types.yaml"),
    "seed_tasks": Loader(load_seed_tasks, "jsonl", "principles/seed_tasks.jsonl", rows=6),
    "ifeval": Loader(load_ifeval, "jsonl", "principles/ifeval_prompts.jsonl", rows=6),
    "hhh": Loader(load_hhh, "json", "tests/fixtures/eval/hhh/helpful/task.json"),
    "truthfulqa_mc": Loader(load_truthfulqa, "json", "tests/fixtures/eval/truthfulqa/mc_task.json"),
    "truthfulqa_bigbench": Loader(load_truthfulqa, "json",
                                  "tests/fixtures/eval/truthfulqa/task.json"),
    "truthfulqa_export": Loader(load_truthfulqa, "jsonl",
                                "tests/fixtures/eval/truthfulqa/bigbench_export.jsonl"),
}
BASE_DOCS = {name: loader.doc() for name, loader in LOADERS.items()}

# Messages about the file as a whole, where no one line or key is at fault.
FILE_LEVEL = ("not UTF-8 text", "invalid YAML", "not valid JSON", "no seed tasks in file",
              "no items in file", "expected a BIG-bench task object", "expected a mapping, got")


def load_or_our_error(loader: Loader, path: Path, target: Path | None = None) -> Any:
    """The loaded value, or the InputFileError raised, checked to name the file and place.
    Any other exception propagates and fails the property."""
    target = target or path
    try:
        result = loader.load(str(target))
    except InputFileError as err:
        # A folder loader (hhh) names the file inside the folder.
        assert err.path == str(path) and str(err).startswith(str(path)), (str(err), path)
        what = str(err).split(": ", 1)[1] if ": " in str(err) else str(err)
        assert err.line is not None or err.key or what.startswith(FILE_LEVEL), str(err)
        return err
    if loader.check is not None:
        loader.check(result)
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_inputs")


def _write(work: Path, name: str, suffix: str, raw: bytes) -> Path:
    path = work / f"{name}{suffix}"
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("name", list(LOADERS))
@fast(EXAMPLES_ARBITRARY)
@given(data=st.data())
def test_loader_survives_arbitrary_input(work, name, data):
    loader = LOADERS[name]
    raw = data.draw(st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8")),
        values.map(lambda v: dump(v, "yaml" if loader.fmt == "yaml" else "json")),
        st.lists(values, max_size=4).map(lambda v: dump(v, "jsonl")),
    ))
    load_or_our_error(loader, _write(work, name, loader.suffix, raw))


@pytest.mark.parametrize("name", list(LOADERS))
@fast(EXAMPLES_NEAR_VALID)
@given(data=st.data())
def test_loader_survives_near_valid_input(work, name, data):
    loader = LOADERS[name]
    snippets = YAML_SNIPPETS if loader.fmt == "yaml" else JSON_SNIPPETS
    doc, snippet = data.draw(mutated(BASE_DOCS[name], snippets))
    raw = dump(doc, loader.fmt, snippet)
    if name != "hhh" or data.draw(st.booleans()):
        load_or_our_error(loader, _write(work, name, loader.suffix, raw))
        return
    # hhh also reads a folder of subsets: <subset>/task.json or <subset>.json.
    folder = work / "hhh_dir"
    shutil.rmtree(folder, ignore_errors=True)
    subset = data.draw(st.sampled_from(SUBSETS))
    file = folder / subset / "task.json" if data.draw(st.booleans()) else folder / f"{subset}.json"
    file.parent.mkdir(parents=True)
    file.write_bytes(raw)
    load_or_our_error(loader, file, target=folder)


@pytest.mark.parametrize("name", list(LOADERS))
@fast(EXAMPLES_DAMAGED)
@given(data=st.data())
def test_loader_survives_truncated_or_non_utf8_file(work, name, data):
    loader = LOADERS[name]
    raw, bad_utf8 = damaged(data, dump(BASE_DOCS[name], loader.fmt))
    got = load_or_our_error(loader, _write(work, name, loader.suffix, raw))
    if bad_utf8:
        assert isinstance(got, InputFileError) and "not UTF-8" in str(got)


def _jsonl_rows(name: str) -> st.SearchStrategy:
    """Valid rows of a JSONL format whose free-text fields hold arbitrary text."""
    text = st.text(min_size=1, max_size=40).filter(str.strip)
    if name == "seed_tasks":
        return st.builds(lambda t, i: {"instruction": t, "instances": [{"input": i, "output": ""}]},
                         text, st.text(max_size=20))
    if name == "ifeval":
        return st.builds(lambda t: {"prompt": t, "checks": [{"kind": "lowercase"}]}, text)
    return st.builds(lambda t, a, b: {"inputs": t, "multiple_choice_targets": [a, b],
                                      "multiple_choice_scores": [1, 0]},
                     text, text, text).filter(lambda r: r["multiple_choice_targets"][0]
                                              != r["multiple_choice_targets"][1])


def _texts(name: str, result: Any) -> list[str]:
    if name == "seed_tasks":
        return [t.instruction for t in result]
    if name == "ifeval":
        return [p.prompt for p in result]
    return [it.context for it in result[1]]


@pytest.mark.parametrize("name", ["seed_tasks", "ifeval", "truthfulqa_export"])
@fast(EXAMPLES_ROUND_TRIP)
@given(data=st.data())
def test_valid_jsonl_with_any_text_loads_as_written(work, name, data):
    """A valid file written with ensure_ascii=False (raw U+2028, U+0085, \\x1c inside strings,
    as JSON allows) loads, one item per line, with the text it holds."""
    rows = data.draw(st.lists(_jsonl_rows(name), min_size=1, max_size=4))
    result = LOADERS[name].load(str(_write(work, name, ".jsonl", dump(rows, "jsonl"))))
    if name == "truthfulqa_export":
        want = [r["inputs"].lstrip() if r["inputs"][-1].isspace() else r["inputs"].lstrip() + " "
                for r in rows]
    else:
        want = [(r.get("instruction") or r.get("prompt")).strip() for r in rows]
    assert _texts(name, result) == want


_template_parts = st.lists(st.sampled_from([
    "text ", "{prompt}", "{response}", "{principles}", "{prompt!x}", "{response:d}",
    "{principles:>{prompt}}", "{prompt!r}", "{response:10}", "{0}", "{}", "{", "}", "{{", "}}",
    "{prompt[0]}", "{response.x}", "{other}"]), max_size=8)


@fast(EXAMPLES_TEMPLATE)
@given(parts=_template_parts, judge=st.booleans())
def test_salmon_template_loads_only_if_it_renders(work, parts, judge):
    """A template with any placeholders loads and renders, or fails to load naming its key."""
    doc = copy.deepcopy(BASE_DOCS["salmon"])
    required = sorted(JUDGE_PLACEHOLDERS if judge else RM_PLACEHOLDERS)
    doc["judge" if judge else "rm_prompt"]["template"] = (
        "".join(parts) + " " + " ".join(f"{{{name}}}" for name in required))
    got = load_or_our_error(LOADERS["salmon"], _write(work, "salmon", ".yaml", dump(doc, "yaml")))
    if isinstance(got, InputFileError):
        assert got.key and got.key.endswith("template"), str(got)


# --- the run config ----------------------------------------------------------------------------


def _config_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            out += _config_keys(tp, f"{prefix}{f.name}.")
    return out


CONFIG_KEYS = _config_keys()
CONFIG_DOCS = {p.name: yaml.safe_load(p.read_text())
               for p in sorted((ROOT / "configs").glob("*.yaml"))}

override_values = st.one_of(
    values.map(json.dumps), st.text(max_size=20), YAML_SNIPPETS,
    st.sampled_from(["1e-3", "-1", "0", "null", "[]", "{}", "[a, b]", "gae", "lora", "~"]))
overrides = st.lists(st.one_of(
    st.builds("{}={}".format, st.sampled_from(CONFIG_KEYS) | st.text(max_size=12),
              override_values),
    st.text(max_size=20),  # no "=" at all, or an empty key
), max_size=3)


def _dotted(doc: Any, prefix: str = "") -> list[str]:
    if not isinstance(doc, dict):
        return []
    out = []
    for k, v in doc.items():
        out.append(f"{prefix}{k}")
        out += _dotted(v, f"{prefix}{k}.")
    return out


def _parsed(raw: bytes) -> Any:
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except Exception:  # noqa: BLE001 - unparseable: then no key of it can be named
        return None


def config_or_our_error(path: Path | None, doc: Any, items: list[str]) -> None:
    """load_config returns a RunConfig, or raises ConfigError naming the file (file-level
    errors), the override, or a dotted key of the schema or of the input `doc`."""
    try:
        cfg = load_config(path, items)
    except ConfigError as err:
        msg = str(err)
        named = {str(path), "config file not found", "override", "config", *CONFIG_KEYS,
                 *_dotted(doc)}
        for item in items:
            key, _, raw = item.partition("=")
            named.update(".".join(key.split(".")[:i]) for i in range(1, key.count(".") + 2))
            named.update(_dotted(_parsed(raw.encode()), f"{key}."))  # a mapping as the value
        assert any(msg.startswith(k + ":") or msg.startswith(k + " ") for k in named), msg
        return
    assert isinstance(cfg, RunConfig)


@fast(EXAMPLES_CONFIG)
@given(data=st.data())
def test_config_file_loads_or_names_the_key(work, data):
    kind = data.draw(st.sampled_from(["near_valid", "arbitrary", "damaged"]))
    if kind == "arbitrary":  # often a mapping, with keys of mixed types
        doc = data.draw(values | st.dictionaries(keys | st.sampled_from(CONFIG_KEYS), values,
                                                 min_size=1, max_size=5))
        raw = data.draw(st.sampled_from([dump(doc, "yaml"), str(doc).encode()]))
    else:
        doc = CONFIG_DOCS[data.draw(st.sampled_from(sorted(CONFIG_DOCS)))]
        if kind == "near_valid":
            doc, snippet = data.draw(mutated(doc, YAML_SNIPPETS))
            raw = dump(doc, "yaml", snippet)
        else:
            raw, _ = damaged(data, dump(doc, "yaml"))
    path = _write(work, "config", ".yaml", raw)
    config_or_our_error(path, _parsed(raw), data.draw(overrides))


@fast(EXAMPLES_OVERRIDES)
@given(items=overrides)
def test_config_overrides_load_or_name_the_key(items):
    config_or_our_error(None, {}, items)


# --- model-output parsers ----------------------------------------------------------------------

_numbers = st.one_of(st.integers(-3, 15).map(str), st.floats(0, 12).map("{:.2f}".format),
                     st.sampled_from(["9" * 400, "٩", "١٠", "0010", "1" * 5000]))
_denominators = st.one_of(st.integers(0, 100).map("/{}".format),
                          st.sampled_from(["", "/10", " out of 10", "/0010", "/" + "1" * 5000]))
grade_texts = st.one_of(
    st.text(),
    st.builds("{}{}{}".format, _numbers, _denominators,
              st.text(max_size=20) | st.sampled_from(["", ".", ". Good.", "\nreason", " or 10"])))


@fast(EXAMPLES_PARSER)
@given(text=grade_texts, lo=st.integers(0, 9), span=st.integers(1, 10))
def test_parse_grade_never_raises(text, lo, span):
    hi = min(lo + span, 10)
    grade = parse_grade(text, lo, hi)
    if grade.score is None:
        assert grade.reject_reason in ("grade_missing", "grade_unparseable", "grade_out_of_range")
    else:
        assert grade.reject_reason is None and lo <= grade.score <= hi


_list_lines = st.lists(st.one_of(
    st.text(max_size=30),
    st.builds("{}{} {}".format, st.integers(0, 12), st.sampled_from([".", ")", ":", ""]),
              st.text(max_size=30)),
    st.builds("{}. **{}**".format, st.integers(0, 12), st.text(max_size=10)),
), max_size=12)


@fast(EXAMPLES_PARSER)
@given(lines=_list_lines, newline=st.booleans(), start=st.integers(0, 9999),
       max_items=st.none() | st.integers(1, 10), cut_off=st.booleans())
def test_parse_numbered_list_never_raises(lines, newline, start, max_items, cut_off):
    text = "\n".join(lines) + ("\n" if newline else "")
    items = parse_numbered_list(text, start, max_items, cut_off)
    assert isinstance(items, list) and all(isinstance(i, ListItem) for i in items)
    assert max_items is None or len(items) <= max_items
    assert all(isinstance(i.text, str) and "\n" not in i.text for i in items)
    assert not any(i.truncated for i in items[:-1])  # only the last item can be cut
    assert cut_off or not any(i.truncated for i in items)


@fast(EXAMPLES_PARSER)
@given(thoughts=st.none() | st.text(max_size=60), answer=st.text(max_size=200),
       finish=st.sampled_from(["stop", "length", "abort"]) | st.text(max_size=6),
       exemplars=st.lists(st.text(max_size=80), max_size=3), n=st.integers(4, 12),
       min_words=st.integers(1, 20), max_rep=st.floats(0.01, 1.0))
def test_judge_answer_never_raises(thoughts, answer, finish, exemplars, n, min_words, max_rep):
    got = judge_answer(thoughts, answer, finish, LeakDetector(exemplars, n), min_words, max_rep)
    assert got.reject_reason is None or got.reject_reason in SELF_ALIGN_REASONS
    assert got.answer == answer.strip()
    if thoughts is not None and thoughts.strip() and finish == "length":
        assert got.reject_reason == "truncated"


@fast(EXAMPLES_PARSER)
@given(exemplars=st.lists(st.text(max_size=80), min_size=1, max_size=3), n=st.integers(4, 12),
       before=st.text(max_size=40), after=st.text(max_size=40))
def test_leak_detector_never_raises_and_finds_a_copied_run(exemplars, n, before, after):
    detector = LeakDetector(exemplars, n)
    assert isinstance(detector.leaks(before + after), bool)
    copied = exemplars[0]
    if len(words(copied)) >= n:  # an answer quoting a whole exemplar leaks it
        assert detector.leaks(f"{before} {copied} {after}")


# --- the chat API's request validation ---------------------------------------------------------

LIMITS = Limits(served_model="m", max_model_len=512)
FIELDS = set(ChatRequest.model_fields)
GOOD = {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hi"}],
        "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "n": 1, "stream": False,
        "stop": ["END"], "seed": 1, "frequency_penalty": 0.0, "presence_penalty": 0.0}


def request_or_api_error(raw: bytes) -> None:
    try:
        req = parse_chat_request(raw, LIMITS)
    except ApiError as err:
        assert 400 <= err.status < 500, err.status
        if err.param is None:
            assert err.code in ("invalid_json", "body_too_large"), (err.code, err.message)
        else:
            assert err.param.split(".")[0] in FIELDS and err.param in err.message, err.message
        assert err.body()["error"]["message"] == err.message
        return
    assert isinstance(req, ChatRequest) and req.model == "m" and req.messages
    assert req.max_tokens is None or 1 <= req.max_tokens < LIMITS.max_model_len
    assert 0 <= req.temperature <= 2 and 0 < req.top_p <= 1
    assert req.stop is None or (isinstance(req.stop, list) and len(req.stop) <= 4)


@fast(EXAMPLES_API)
@given(data=st.data())
def test_chat_request_near_valid_is_parsed_or_a_4xx_naming_the_field(data):
    doc, snippet = data.draw(mutated(GOOD, JSON_SNIPPETS))
    request_or_api_error(dump(doc, "json", snippet))


@fast(EXAMPLES_API)
@given(body=st.one_of(
    st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=8), values, max_size=6)
    .map(lambda d: json.dumps(d).encode()),
    values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=100),
    JSON_SNIPPETS.map(lambda s: s.encode("utf-8", "surrogatepass")),
))
def test_chat_request_arbitrary_body_is_parsed_or_a_4xx(body):
    request_or_api_error(body)


# --- the inputs that broke the code once, pinned --------------------------------------------------
# Each raised a raw exception (or, for U+2028, rejected a valid file) before issue 8's fixes.

REGRESSIONS = [
    ("principles", ".yaml", b"name: !!int ''\n"),  # IndexError in PyYAML's int constructor
    ("principles", ".yaml", b"name: !!float abc\n"),  # ValueError
    ("principles", ".yaml", b"name: !!timestamp x\n"),  # AttributeError
    ("red_team", ".yaml", b"name: !!bool x\n"),  # KeyError
    ("rubrics", ".yaml", _DEEP.encode()),  # RecursionError in PyYAML's composer
    ("seed_tasks", ".jsonl", b'{"instruction": "a", "id": ' + b"1" * 5000 + b"}\n"),  # ValueError
    ("seed_tasks", ".jsonl", b"[" * 1500 + b"\n"),  # RecursionError
    ("hhh", ".json", b'{"examples": ' + b"1" * 5000 + b"}"),  # ValueError
    ("truthfulqa_export", ".jsonl", _DEEP.encode() + b"\n"),  # RecursionError
    ("ifeval", ".jsonl", b'{"prompt": "p", "checks": [{"kind": []}]}\n'),  # unhashable kind
]


@pytest.mark.parametrize("name, suffix, raw", REGRESSIONS)
def test_pinned_bad_file_raises_our_error(work, name, suffix, raw):
    got = load_or_our_error(LOADERS[name], _write(work, f"pinned_{name}", suffix, raw))
    assert isinstance(got, InputFileError)


@pytest.mark.parametrize("name", ["seed_tasks", "ifeval"])
def test_pinned_line_separator_inside_a_string_loads(work, name):
    field = "instruction" if name == "seed_tasks" else "prompt"
    row = {field: "a\u2028b\x85c\x1cd", "checks": [{"kind": "lowercase"}]}
    raw = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    assert len(LOADERS[name].load(str(_write(work, f"pinned_{name}", ".jsonl", raw)))) == 1


@pytest.mark.parametrize("raw, items", [
    (b"1: a\nzz: b\n", []),  # unknown keys of mixed types: sorted() raised TypeError
    (b"\xff", []),  # UnicodeDecodeError
    (b"model: !!float abc\n", []),  # ValueError
    (b"", ["seeds.max_prompts=!!int ''"]),  # IndexError while parsing the override's value
])
def test_pinned_bad_config_raises_config_error(work, raw, items):
    path = _write(work, "pinned_config", ".yaml", raw)
    with pytest.raises(ConfigError):
        load_config(path, items)
    config_or_our_error(path, _parsed(raw), items)


@pytest.mark.parametrize("raw", [b'{"model": ' + b"1" * 5000 + b"}", b"[" * 1500])
def test_pinned_bad_body_is_a_400(raw):
    with pytest.raises(ApiError) as err:
        parse_chat_request(raw, LIMITS)
    assert err.value.status == 400 and err.value.code == "invalid_json"


def test_pinned_grade_with_a_5000_digit_denominator():
    assert parse_grade("5/" + "1" * 5000, 1, 10).reject_reason == "grade_unparseable"


def test_pinned_salmon_template_with_a_format_spec(work):
    doc = copy.deepcopy(BASE_DOCS["salmon"])
    doc["rm_prompt"]["template"] = "{prompt!x} {response} {principles}"  # ValueError at render
    got = load_or_our_error(LOADERS["salmon"], _write(work, "pinned_salmon", ".yaml",
                                                       dump(doc, "yaml")))
    assert isinstance(got, InputFileError) and got.key == "rm_prompt.template"
