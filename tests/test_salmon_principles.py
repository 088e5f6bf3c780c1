"""SALMON principle library and synthetic-preference aggregation. Pure Python, milliseconds
(except the one `slow` check of the choice letters against the SmolLM2 tokenizer)."""

import copy
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from dromedary_ray.algos.salmon_prefs import (
    REJECT_NO_CONSISTENT,
    JudgedPair,
    JudgeScore,
    aggregate_rm_examples,
    judge_score,
    normalize_per_principle,
)
from dromedary_ray.errors import InputFileError
from dromedary_ray.salmon_principles import (
    SalmonPrinciple,
    classify_prompt,
    load_salmon_principles,
    render_judge_prompt,
    render_rm_input,
    sample_principles,
)

SHIPPED = "principles/salmon.yaml"
INTERVENTIONS = ["No self-praise", "Does the task itself", "No padding", "No needless caveats",
                 "No echoing the question"]
REASONING = ["Logically sound", "Methodical", "Numerically careful"]
HARMLESSNESS = ["Harmless", "Ethical", "Law-abiding"]


@pytest.fixture(scope="module")
def pset():
    return load_salmon_principles(SHIPPED)


# --- the shipped file ------------------------------------------------------------------------


def test_shipped_file_has_31_principles_and_the_interventions(pset):
    assert len(pset.principles) == 31
    names = [p.name for p in pset.principles]
    assert len(set(names)) == 31 and "Honest and accurate" in names
    assert [p.name for p in pset.interventions][:5] == INTERVENTIONS
    for p in pset.principles + pset.interventions:
        assert p.definition != p.negation and len(p.definition.split()) >= 8
    assert {"general", "reasoning", "red_team", "creative", "coding"} <= set(pset.prompt_types)
    assert pset.choices == ("A", "B")


def test_shipped_weights_favour_the_right_principles(pset):
    names = [p.name for p in pset.principles]

    def w(prompt_type, name):
        return pset.weights(prompt_type)[names.index(name)]

    for name in REASONING:
        assert w("reasoning", name) > w("general", name) == 1.0
    for name in HARMLESSNESS:
        assert w("red_team", name) > w("general", name) == 1.0
    assert w("creative", "Creative") > 1.0 and w("coding", "Correct code") > 1.0
    assert w("creative", "Correct code") == 0.0
    with pytest.raises(ValueError, match="unknown prompt type"):
        pset.weights("poetry")


def test_rendered_judge_prompt_ends_where_the_letter_goes(pset):
    principle = pset.get("Concise")
    text = render_judge_prompt(pset, principle, "  What is 2+2? ", "4", "The answer is four.\n")
    assert text.endswith("Reply (")
    for part in ("Concise", principle.definition, "What is 2+2?", "\n4\n", "The answer is four."):
        assert part in text
    assert "{" not in text and "}" not in text
    assert text.index("4\n") < text.index("The answer is four.")  # A comes before B


def test_rendered_rm_input_numbers_principles_and_uses_negations(pset):
    concise, honest = pset.get("Concise"), pset.get("Honest and accurate")
    praise = pset.get("No self-praise")
    text = render_rm_input(pset, "Prompt {braces} kept", "Resp",
                           [(concise, False), (honest, True), (praise, False)])
    assert f"1. Concise: {concise.definition}" in text
    assert f"2. Honest and accurate: {honest.negation}" in text
    assert honest.definition not in text
    assert f"3. No self-praise: {praise.definition}" in text
    assert "Prompt {braces} kept" in text and "Resp" in text
    with pytest.raises(ValueError):
        render_rm_input(pset, "p", "r", [])


@pytest.mark.slow
def test_choices_are_single_tokens_after_the_judge_prompt(pset, tiny_model):
    from transformers import AutoTokenizer

    from dromedary_ray.eval.loglik import single_token_id

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = render_judge_prompt(pset, pset.principles[0], "Hi?", "Hello.", "Hey.")
    base = tok(prompt, add_special_tokens=False).input_ids
    for choice in pset.choices:
        # The letter is one token and does not merge with the "(" that ends the prompt.
        letter = single_token_id(tok, choice)
        assert tok(prompt + choice, add_special_tokens=False).input_ids == base + [letter]


# --- malformed files -------------------------------------------------------------------------

GOOD = {
    "principles": [
        {"name": "Honest", "definition": "Tells the truth.", "negation": "Bends the truth."},
        {"name": "Concise", "definition": "Is short.", "negation": "Is long."},
    ],
    "intervention_principles": [
        {"name": "No self-praise", "definition": "Does not brag.", "negation": "Brags."},
    ],
    "prompt_types": [
        {"name": "reasoning", "keywords": ["solve"], "weights": {"Honest": 2.0}},
        {"name": "general", "keywords": [], "weights": {}},
    ],
    "judge": {
        "template": "{principle_name}: {principle_definition}\nQ: {prompt}\n"
                    "A: {response_a}\nB: {response_b}\nBetter: (",
        "choices": ["A", "B"],
    },
    "rm_prompt": {"template": "{prompt}\n{response}\n{principles}\nScore:"},
}


def _write(tmp_path: Path, doc) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _edit(fn):
    doc = copy.deepcopy(GOOD)
    fn(doc)
    return doc


def test_minimal_file_loads(tmp_path):
    ps = load_salmon_principles(_write(tmp_path, GOOD))
    assert [p.name for p in ps.principles] == ["Honest", "Concise"]
    assert ps.interventions == (SalmonPrinciple("No self-praise", "Does not brag.", "Brags."),)
    assert ps.weights("reasoning") == [2.0, 1.0] and ps.weights("general") == [1.0, 1.0]
    assert ps.type_keywords == (("reasoning", ("solve",)), ("general", ()))


def _set(path: str, value):
    def fn(doc):
        *parents, last = path
        node = doc
        for k in parents:
            node = node[k]
        node[last] = value
    return fn


def _delete(path: str):
    def fn(doc):
        *parents, last = path
        node = doc
        for k in parents:
            node = node[k]
        del node[last]
    return fn


@pytest.mark.parametrize(
    "edit, match",
    [
        (_delete(("principles", 1, "definition")),
         r"s\.yaml \[principles\[1\]\.definition\]: missing required key"),
        (_set(("principles", 0, "negation"), "  "), r"\[principles\[0\]\.negation\]: must not be"),
        (_set(("principles", 0, "name"), 3), r"\[principles\[0\]\.name\]: expected str"),
        (_set(("principles", 1), "just text"), r"\[principles\[1\]\]: expected a mapping"),
        (_set(("principles",), []), r"\[principles\]: needs at least one principle"),
        (_set(("principles",), {"a": 1}), r"\[principles\]: expected list"),
        (_delete(("intervention_principles", 0, "negation")),
         r"\[intervention_principles\[0\]\.negation\]: missing required key"),
        (_set(("principles", 1, "name"), "Honest"),
         r"\[principles\[1\]\.name\]: duplicate name 'Honest' \(also at principles\[0\]\)"),
        (_set(("intervention_principles", 0, "name"), "Concise"),
         r"\[intervention_principles\[0\]\.name\]: duplicate name"),
        (_set(("prompt_types", 0, "weights", "Nope"), 1.0),
         r"\[prompt_types\[0\]\.weights\.Nope\]: not the name of a principle"),
        (_set(("prompt_types", 0, "weights", "No self-praise"), 1.0),
         r"\[prompt_types\[0\]\.weights\.No self-praise\]: not the name"),
        (_set(("prompt_types", 0, "weights", "Honest"), -0.5),
         r"\[prompt_types\[0\]\.weights\.Honest\]: weight must be >= 0"),
        (_set(("prompt_types", 0, "weights", "Honest"), "high"),
         r"\[prompt_types\[0\]\.weights\.Honest\]: weight must be a number"),
        (_set(("prompt_types", 0, "weights", "Honest"), True), r"weight must be a number"),
        (_set(("prompt_types", 0, "weights"), {"Honest": 0, "Concise": 0.0}),
         r"\[prompt_types\[0\]\.weights\]: every principle has weight 0"),
        (_set(("prompt_types", 0, "weights"), [1, 2]),
         r"\[prompt_types\[0\]\.weights\]: expected dict"),
        (_set(("prompt_types", 0, "keywords"), "solve"),
         r"\[prompt_types\[0\]\.keywords\]: expected list"),
        (_set(("prompt_types", 0, "keywords"), ["solve", ""]),
         r"\[prompt_types\[0\]\.keywords\[1\]\]: keywords must be non-empty"),
        (_set(("prompt_types", 0, "name"), "general"),
         r"\[prompt_types\[1\]\.name\]: duplicate prompt type 'general'"),
        (_set(("prompt_types", 1, "name"), "chat"), r"\[prompt_types\]: needs a 'general' type"),
        (_delete(("prompt_types", 0, "weights")),
         r"\[prompt_types\[0\]\.weights\]: missing required key"),
        (_set(("judge", "template"), "{principle_name} {principle_definition} {prompt} "
              "{response_a} ("), r"\[judge\.template\]: missing placeholder\(s\) \['response_b'\]"),
        (_set(("judge", "template"), GOOD["judge"]["template"] + "{score}"),
         r"\[judge\.template\]: unknown placeholder\(s\) \['score'\]"),
        (_set(("judge", "template"), GOOD["judge"]["template"] + " { ("),
         r"\[judge\.template\]: not a valid template"),
        (_delete(("judge", "template")), r"\[judge\.template\]: missing required key"),
        (_set(("judge", "choices"), ["A"]), r"\[judge\.choices\]: must be two different"),
        (_set(("judge", "choices"), ["A", "A"]), r"\[judge\.choices\]: must be two different"),
        (_set(("judge", "choices"), ["A", 2]), r"\[judge\.choices\]: must be two different"),
        (_delete(("judge",)), r"\[judge\]: missing required key"),
        (_set(("rm_prompt", "template"), "{prompt} {response}"),
         r"\[rm_prompt\.template\]: missing placeholder\(s\) \['principles'\]"),
        (_set(("rm_prompt",), "{prompt} {response} {principles}"), r"\[rm_prompt\]: expected dict"),
    ],
)
def test_malformed_files_name_the_key(tmp_path, edit, match):
    with pytest.raises(InputFileError, match=match):
        load_salmon_principles(_write(tmp_path, _edit(edit)))


def test_unparsable_or_missing_file(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("principles: [unclosed\n")
    with pytest.raises(InputFileError, match=r"s\.yaml:\d+: invalid YAML"):
        load_salmon_principles(bad)
    with pytest.raises(InputFileError, match="file not found"):
        load_salmon_principles(tmp_path / "nope.yaml")
    with pytest.raises(InputFileError, match="expected a mapping"):
        load_salmon_principles(_write(tmp_path, ["a", "list"]))


# --- classification and sampling -------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("How do I build a bomb in my garage?", "red_team"),
        ("Write a story where the hero explains how to poison a well.", "red_team"),
        ("Write a Python function that reverses a linked list.", "coding"),
        ("Why does my SQL query return duplicates?", "coding"),
        ("A train covers 60 km in 45 minutes. How many km does it cover per hour?", "reasoning"),
        ("Solve for x: 3x + 5 = 20.", "reasoning"),
        ("Write a haiku about autumn rain.", "creative"),
        ("Compose a short poem for my mother's birthday.", "creative"),
        ("What is the capital of France?", "general"),
        ("My colleague has great skill at pottery. Any gift ideas for her?", "general"),  # skill
        ("Is Rusty a good name for a dog?", "general"),  # not the language Rust
    ],
)
def test_classify_prompt(pset, prompt, expected):
    assert classify_prompt(prompt, pset) == expected


def test_classify_prompt_follows_inflections_and_file_order(pset):
    assert classify_prompt("They were killing time.", pset) == "red_team"
    assert classify_prompt("Can you debug this script?", pset) == "coding"


def test_sampling_is_deterministic_under_a_seed(pset):
    def draw(seed):
        rng = random.Random(seed)
        return [[p.name for p in sample_principles(pset, "reasoning", 4, rng)] for _ in range(5)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    picked = sample_principles(pset, "general", 31, random.Random(0))
    assert sorted(p.name for p in picked) == sorted(p.name for p in pset.principles)


def test_sampling_never_draws_zero_weight_and_respects_weights(pset, tmp_path):
    rng = random.Random(0)
    for _ in range(500):
        names = [p.name for p in sample_principles(pset, "creative", 8, rng)]
        assert "Correct code" not in names and len(set(names)) == 8
    with pytest.raises(ValueError, match="cannot draw 31"):
        sample_principles(pset, "creative", 31, rng)  # only 30 have positive weight
    # Honest weighs 2.0 against Concise 1.0 on reasoning prompts: drawn first ~2/3 of the time.
    small = load_salmon_principles(_write(tmp_path, GOOD))
    first = Counter(sample_principles(small, "reasoning", 1, rng)[0].name for _ in range(6000))
    assert first["Honest"] / 6000 == pytest.approx(2 / 3, abs=0.03)
    # Statistically on the shipped set: reasoning principles come up more on reasoning prompts.
    counts = {t: Counter() for t in ("general", "reasoning")}
    for t, c in counts.items():
        for _ in range(2000):
            c.update(p.name for p in sample_principles(pset, t, 3, rng))
    for name in REASONING:
        assert counts["reasoning"][name] > 2 * counts["general"][name]


# --- judge scores ----------------------------------------------------------------------------


def test_judge_score_combines_both_orders():
    s = judge_score({"A": -0.2, "B": -2.0}, {"A": -1.5, "B": -0.5})
    assert s.forward == pytest.approx(1.8) and s.backward == pytest.approx(1.0)
    assert s.consistent and s.score == pytest.approx(1.4)


def test_judge_score_sign_flips_when_responses_are_swapped():
    x, y = {"A": -0.2, "B": -2.0}, {"A": -1.5, "B": -0.5}
    s, swapped = judge_score(x, y), judge_score(y, x)
    assert swapped.score == pytest.approx(-s.score)
    assert swapped.forward == pytest.approx(-s.backward)
    assert swapped.consistent == s.consistent


def test_judge_score_consistency():
    # Position bias: the judge always prefers whatever is shown first -> orders disagree.
    biased = judge_score({"A": -0.1, "B": -3.0}, {"A": -0.1, "B": -2.0})
    assert not biased.consistent and biased.score == pytest.approx((2.9 - 1.9) / 2)
    assert not judge_score({"A": -1.0, "B": -1.0}, {"A": -2.0, "B": -1.0}).consistent  # a tie
    both_b = judge_score({"A": -3.0, "B": -1.0}, {"A": -0.5, "B": -2.5})
    assert both_b.consistent and both_b.score < 0
    custom = judge_score({"1": -0.1, "2": -1.1}, {"1": -1.0, "2": -0.2}, choices=("1", "2"))
    assert custom.consistent and custom.score == pytest.approx(0.9)


def _score(value: float, consistent: bool = True) -> JudgeScore:
    backward = value if consistent else -value / 2
    return JudgeScore(value, backward, consistent, (value + backward) / 2)


def test_normalize_per_principle_scales_without_changing_signs():
    rows = [JudgedPair(f"p{i}", f"q{i}", "q", "a", "b", name, _score(v))
            for i, (name, v) in enumerate([("Concise", 4.0), ("Concise", -2.0),
                                           ("Honest and accurate", 0.1),
                                           ("Honest and accurate", 0.3)])]
    out = normalize_per_principle(rows)
    for name in ("Concise", "Honest and accurate"):
        vals = [v for r in out if r.principle == name
                for v in (r.score.forward, r.score.backward)]
        assert sum(v * v for v in vals) / len(vals) == pytest.approx(1.0)
    assert [r.score.score > 0 for r in out] == [r.score.score > 0 for r in rows]
    assert out[0].score.score / out[1].score.score == pytest.approx(-2.0)  # ratios kept
    zero = JudgedPair("z", "z", "q", "a", "b", "Concise", _score(0.0, consistent=False))
    assert normalize_per_principle([zero])[0] == zero


# --- aggregation into RM examples ------------------------------------------------------------

PRINCIPLES = ["Concise", "Honest and accurate", "Helpful", "Harmless", "Specific", "Creative"]


def _judged_rows(n_pairs: int = 30, seed: int = 0) -> list[JudgedPair]:
    rng = random.Random(seed)
    rows = []
    for i in range(n_pairs):
        for name in PRINCIPLES:
            value = rng.uniform(-3, 3)
            rows.append(JudgedPair(f"pair{i:03d}", f"prompt{i // 2}", f"question {i}",
                                   f"answer A{i}", f"answer B{i}", name,
                                   _score(value, consistent=rng.random() < 0.8)))
    return rows


def _normalised_lookup(rows):
    return {(r.pair_id, r.principle): r for r in normalize_per_principle(rows)}


def test_aggregation_is_deterministic_and_independent_of_row_order(pset):
    rows = _judged_rows()
    a = aggregate_rm_examples(rows, pset, seed=3)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert aggregate_rm_examples(shuffled, pset, seed=3) == a
    assert aggregate_rm_examples(rows, pset, seed=4) != a
    assert len(a.examples) == 4 * 30 - 4 * len(a.rejects)  # SALMON's four draws per pair
    assert [e.pair_id for e in a.examples] == sorted(e.pair_id for e in a.examples)


def test_label_follows_the_largest_scaled_score_of_consistent_principles(pset):
    rows = _judged_rows()
    lookup = _normalised_lookup(rows)
    out = aggregate_rm_examples(rows, pset, seed=0, flip_prob=0.0)
    assert out.examples and not any(e.flipped for e in out.examples)
    sizes = Counter()
    for e in out.examples:
        picked = [lookup[(e.pair_id, name)] for name in e.principles]
        assert all(r.score.consistent for r in picked)
        signed = [-r.score.score if neg else r.score.score
                  for r, neg in zip(picked, e.negated, strict=True)]
        best = max(range(len(signed)), key=lambda i: abs(signed[i]))
        assert e.decisive_principle == e.principles[best]
        assert e.margin == pytest.approx(abs(signed[best]))
        a, b = picked[0].response_a, picked[0].response_b
        assert (e.chosen, e.rejected) == ((a, b) if signed[best] > 0 else (b, a))
        sizes[len(e.principles)] += 1
    assert sizes[1] > sizes[4] > 0  # geometric: few principles most often, several sometimes


def test_label_on_a_hand_made_pair(pset):
    rows = [JudgedPair("p", "q", "prompt", "resp A", "resp B", name, _score(v))
            for name, v in [("Concise", 0.5), ("Helpful", -3.0), ("Specific", 1.0)]]
    out = aggregate_rm_examples(rows, pset, seed=0, principles_per_example=(3, 3),
                                negate_prob=0.0, flip_prob=0.0, normalize=False)
    for e in out.examples:
        assert e.decisive_principle == "Helpful" and e.margin == pytest.approx(3.0)
        assert (e.chosen, e.rejected) == ("resp B", "resp A")


def test_negation_flips_the_label(pset):
    rows = _judged_rows()
    plain = aggregate_rm_examples(rows, pset, seed=5, negate_prob=0.0, flip_prob=0.0).examples
    negated = aggregate_rm_examples(rows, pset, seed=5, negate_prob=1.0, flip_prob=0.0).examples
    assert len(plain) == len(negated) > 0
    for p, n in zip(plain, negated, strict=True):
        assert p.principles == n.principles and p.decisive_principle == n.decisive_principle
        assert not any(p.negated) and all(n.negated)
        assert (n.chosen, n.rejected) == (p.rejected, p.chosen)


def test_flip_probability_zero_and_one(pset):
    rows = _judged_rows()
    clean = aggregate_rm_examples(rows, pset, seed=2, flip_prob=0.0).examples
    noisy = aggregate_rm_examples(rows, pset, seed=2, flip_prob=1.0).examples
    assert all(e.flipped for e in noisy) and not any(e.flipped for e in clean)
    for c, n in zip(clean, noisy, strict=True):
        assert (n.chosen, n.rejected) == (c.rejected, c.chosen)
        assert c.principles == n.principles and c.negated == n.negated
    default = aggregate_rm_examples(_judged_rows(300), pset, seed=2).examples
    share = sum(e.flipped for e in default) / len(default)
    assert share == pytest.approx(0.1, abs=0.03)  # SALMON's 10% label noise


def test_principle_count_range_and_inconsistent_pairs(pset):
    rows = _judged_rows()
    lonely = [JudgedPair("solo", "s", "q", "a", "b", name, _score(1.0, consistent=False))
              for name in PRINCIPLES]
    out = aggregate_rm_examples(rows + lonely, pset, seed=1, principles_per_example=(2, 3))
    assert [(r.pair_id, r.reason) for r in out.rejects if r.pair_id == "solo"] == [
        ("solo", REJECT_NO_CONSISTENT)]
    lookup = _normalised_lookup(rows)
    for e in out.examples:
        available = sum(lookup[(e.pair_id, n)].score.consistent for n in PRINCIPLES)
        assert min(2, available) <= len(e.principles) <= min(3, available)
        assert len(set(e.principles)) == len(e.principles) == len(e.negated)


def test_aggregation_rejects_bad_input(pset):
    rows = _judged_rows(2)
    unknown = JudgedPair("pair000", "prompt0", "question 0", "answer A0", "answer B0", "Bogus",
                         _score(1.0))
    with pytest.raises(ValueError, match="'Bogus'"):
        aggregate_rm_examples(rows + [unknown], pset, seed=0)
    with pytest.raises(ValueError, match="more than one judgement"):
        aggregate_rm_examples(rows + [rows[0]], pset, seed=0)
    clash = JudgedPair("pair000", "prompt0", "question 0", "other", "answer B0", "Ethical",
                       _score(1.0))
    with pytest.raises(ValueError, match="different prompts or responses"):
        aggregate_rm_examples(rows + [clash], pset, seed=0)
    with pytest.raises(ValueError, match="principles_per_example"):
        aggregate_rm_examples(rows, pset, seed=0, principles_per_example=(3, 2))
    with pytest.raises(ValueError, match="flip_prob"):
        aggregate_rm_examples(rows, pset, seed=0, flip_prob=1.5)
