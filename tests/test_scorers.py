"""Task scorers of edgedistill.evaluate.scorers on hand-made answers: each built-in scorer, the
user's own scorer code (allowed or not), build-time checks, and score_all's counting of skipped
examples and errors.

    .venv/bin/python -m pytest -q tests/test_scorers.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgedistill.errors import EdgedistillError
from edgedistill.evaluate.scorers import (ScoreInput, Scorer, ScorerSpec, build_scorers, default_scorers,
                                          normalize_text, parse_json_answer, score_all)

CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
               "required": ["city", "year"], "additionalProperties": False}


def build(*specs, base_dir: Path = Path("."), allow_code: bool = False, schema: dict | None = None,
          labels: list[str] | None = None) -> list[Scorer]:
    return build_scorers([ScorerSpec(**s) if isinstance(s, dict) else s for s in specs], base_dir=base_dir,
                         allow_code=allow_code, schema=schema, labels=labels)


def one(spec, prediction: str, reference=None, record: dict | None = None, **build_args) -> float:
    (scorer,) = build(spec, **build_args)
    return scorer(ScoreInput(prediction, reference, record or {}))


@pytest.mark.unit
def test_defaults_per_task_kind():
    assert default_scorers("classification") == ["label"]
    assert default_scorers("generation") == ["chrf", "rouge_l", "exact_match"]
    assert default_scorers("extraction") == ["json_parse", "json_schema", "json_fields"]
    with pytest.raises(EdgedistillError, match="unknown task kind 'summarize'"):
        default_scorers("summarize")


@pytest.mark.unit
def test_label_is_the_label_named_first():
    record = {"label": "negative", "choices": ["positive", "negative"]}
    labels = ["positive", "negative"]
    assert one("label", "Negative, not positive.", record=record, labels=labels) == 1.0
    assert one("label", "positive... or negative", record=record, labels=labels) == 0.0
    assert one("label", "negatively", record=record, labels=labels) == 0.0  # whole words only
    assert one("label", "", record=record, labels=labels) == 0.0
    # without choices in the record, the task's labels
    assert one("label", "NEGATIVE", record={"label": "negative"}, labels=labels) == 1.0


@pytest.mark.unit
def test_label_needs_labels_and_skips_a_record_without_label():
    with pytest.raises(EdgedistillError, match="label scorer needs the task's labels"):
        build("label")
    results = score_all(build("label", labels=["a", "b"]), [ScoreInput("a", None, {"label": "a"}),
                                                           ScoreInput("a", None, {})])
    assert results["label"].values == [1.0, None] and results["label"].skipped_no_reference == 1


@pytest.mark.unit
@pytest.mark.parametrize(("prediction", "reference", "expected"), [
    ("Paris", "paris", 1.0),
    ('  "Paris."  ', "Paris", 1.0),
    ("«Zürich»", "zürich", 1.0),
    ("`New   York`", "new york", 1.0),
    ("Straße", "STRASSE", 1.0),  # case-folding
    ("Cafe\u0301", "Café", 1.0),  # e + combining accent is é
    ("Paris, France", "Paris", 0.0),
    ("", "Paris", 0.0),
    ("", "", 1.0),
])
def test_exact_match_normalized(prediction, reference, expected):
    assert one("exact_match", prediction, reference) == expected


@pytest.mark.unit
def test_exact_match_without_normalization_and_normalize_text():
    assert one({"name": "exact_match", "normalize": False}, "Paris", "paris") == 0.0
    assert one({"name": "exact_match", "normalize": False}, "Paris", "Paris") == 1.0
    assert normalize_text("  ¡Hola,\n\tmundo!  ") == "hola, mundo"


@pytest.mark.unit
def test_regex_captures_then_compares():
    spec = {"name": "regex", "pattern": r"Answer:\s*(.+)"}
    assert one(spec, "Let me think.\nAnswer: 42.", "42") == 1.0
    assert one(spec, "Answer: 41", "42") == 0.0
    assert one(spec, "no answer here", "42") == 0.0
    assert one({"name": "regex", "pattern": r"(?:x(\d)|y)"}, "y", "1") == 0.0  # the group took no part


@pytest.mark.unit
@pytest.mark.parametrize(("pattern", "problem"), [
    (r"Answer: \w+", "has 0 capture groups"),
    (r"(\w+) (\w+)", "has 2 capture groups"),
    (r"Answer: (\w+", "is not a regular expression"),
])
def test_regex_pattern_is_checked_at_build_time(pattern, problem):
    with pytest.raises(EdgedistillError, match="regex scorer's pattern") as caught:
        build({"name": "regex", "pattern": pattern})
    assert problem in caught.value.problem and pattern in caught.value.problem
    with pytest.raises(EdgedistillError, match="needs a pattern"):
        build("regex")


@pytest.mark.unit
def test_chrf_and_rouge_l():
    reference = "the cat sat on the mat"
    for name in ("chrf", "rouge_l"):
        assert one(name, reference, reference) == pytest.approx(1.0)
        close, far = one(name, "the cat sat on a mat", reference), one(name, "dogs bark loudly", reference)
        assert 0.0 <= far < close < 1.0
        assert one(name, "", reference) == 0.0
        assert one(name, "", "") == 1.0
    assert one("rouge_l", "the cat sat", reference) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    # rouge-score's own tokenizer keeps only ASCII: these would score 0
    assert one("rouge_l", "Смотри: кот сидит", "кот сидит") == pytest.approx(0.8)
    assert one("chrf", "東京タワー", "東京タワー") == pytest.approx(1.0)


@pytest.mark.unit
@pytest.mark.parametrize(("text", "found", "value"), [
    ('{"city": "Paris"}', True, {"city": "Paris"}),
    ("  [1, 2]\n", True, [1, 2]),
    ("42", True, 42),
    ('Sure! Here it is: {"city": "Paris", "year": 1889} Hope that helps.', True, {"city": "Paris", "year": 1889}),
    ('Here:\n```json\n{"city": "Köln"}\n```\nand {"other": 1}', True, {"city": "Köln"}),
    ('```\n["a"]\n```', True, ["a"]),
    ('See [note 1] for {"a": [1]} below', True, {"a": [1]}),
    ('{"a": NaN}', False, None),
    ('{"city": "Paris"', False, None),
    ("", False, None),
    ("no json at all", False, None),
])
def test_where_json_is_found(text, found, value):
    assert parse_json_answer(text) == (found, value)
    assert one("json_parse", text) == float(found)


@pytest.mark.unit
def test_json_schema_validity():
    good = '{"city": "Paris", "year": 1889}'
    assert one("json_schema", good, schema=CITY_SCHEMA) == 1.0
    assert one("json_schema", f"The answer: {good}.", schema=CITY_SCHEMA) == 1.0
    assert one("json_schema", '{"city": "Paris", "year": "1889"}', schema=CITY_SCHEMA) == 0.0  # parses, invalid
    assert one("json_schema", '{"city": "Paris"}', schema=CITY_SCHEMA) == 0.0
    assert one("json_schema", "Paris, 1889", schema=CITY_SCHEMA) == 0.0


@pytest.mark.unit
def test_json_schema_is_checked_at_build_time():
    with pytest.raises(EdgedistillError, match="needs the task's JSON Schema"):
        build("json_schema")
    with pytest.raises(EdgedistillError, match="JSON Schema is not valid at properties/year") as caught:
        build("json_schema", schema={"type": "object", "properties": {"year": {"type": "integr"}}})
    assert "integr" in caught.value.problem


@pytest.mark.unit
def test_json_fields_per_field_and_overall():
    reference = {"city": "Paris", "year": 1889, "tall": True}
    items = [
        ScoreInput('{"city": " paris ", "year": 1889, "tall": true}', reference),
        ScoreInput('{"city": "Lyon", "year": 1889.0, "tall": 1}', reference),  # true is not 1
        ScoreInput("not json", reference),
        ScoreInput('["Paris"]', {"city": "Paris"}),  # not an object: every field wrong
        ScoreInput('{"city": "Paris"}', None),
    ]
    results = score_all(build("json_fields"), items)
    assert results["json_fields"].values == [1.0, pytest.approx(1 / 3), 0.0, 0.0, None]
    assert results["json_fields"].skipped_no_reference == 1
    assert results["json_field:city"].values == [1.0, 0.0, 0.0, 0.0, None]
    assert results["json_field:year"].values == [1.0, 1.0, 0.0, None, None]
    assert results["json_field:year"].skipped_no_reference == 2
    assert results["json_field:tall"].mean == pytest.approx(1 / 3)
    assert list(results) == ["json_fields", "json_field:city", "json_field:year", "json_field:tall"]


@pytest.mark.unit
def test_json_fields_nested_values_reference_as_text_and_bad_references():
    nested = {"tags": ["A", "b"], "where": {"city": "Paris"}}
    assert one("json_fields", '{"tags": ["a", "B"], "where": {"city": "PARIS"}}', nested) == 1.0
    assert one("json_fields", '{"tags": ["a"], "where": {"city": "Paris", "x": 1}}', nested) == 0.0
    assert one("json_fields", '{"city": "paris"}', '{"city": "Paris"}') == 1.0
    assert one({"name": "json_fields", "normalize": False}, '{"city": "paris"}', {"city": "Paris"}) == 0.0
    assert one("json_fields", "{}", {}) == 1.0
    results = score_all(build("json_fields"), [ScoreInput("{}", ["a list"]), ScoreInput("{}", "not json")])
    assert results["json_fields"].errors == 2 and results["json_fields"].mean is None
    assert "reference is list" in results["json_fields"].first_error


@pytest.mark.unit
def test_missing_reference_is_skipped_and_counted():
    items = [ScoreInput("Paris", "Paris"), ScoreInput("Lyon", None), ScoreInput("Nice", "Nice")]
    results = score_all(build("exact_match", "chrf", "json_parse"), items)
    assert results["exact_match"].values == [1.0, None, 1.0]
    assert results["exact_match"].skipped_no_reference == 1 and results["exact_match"].errors == 0
    assert results["exact_match"].summary.n == 2
    assert results["json_parse"].skipped_no_reference == 0  # needs no reference
    assert results["exact_match"].as_dict() == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 2, "errors": 0,
                                                "first_error": None, "skipped_no_reference": 1}


@pytest.mark.unit
def test_a_text_scorer_given_a_json_reference_counts_an_error():
    results = score_all(build("exact_match"), [ScoreInput("Paris", {"city": "Paris"}), ScoreInput("a", "a")])
    assert results["exact_match"].values == [None, 1.0] and results["exact_match"].errors == 1
    assert results["exact_match"].first_error.startswith("example 0: TypeError: this scorer compares text")


def write_module(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(source, encoding="utf-8")
    return folder


SCORER_SOURCE = """
def score(prediction, reference, record):
    if prediction == "boom":
        raise ValueError("cannot score boom")
    if prediction == "big":
        return 1.5
    if prediction == "nan":
        return float("nan")
    if prediction == "text":
        return "1"
    if prediction == "nothing":
        return None
    return prediction == reference and record.get("ok", True)
"""


@pytest.mark.unit
def test_custom_scorer_errors_are_counted_never_raised(tmp_path):
    folder = write_module(tmp_path / "recipe", "my_scorers", SCORER_SOURCE)
    scorers = build({"name": "custom", "function": "my_scorers:score"}, base_dir=folder, allow_code=True)
    assert str(folder) not in sys.path  # the recipe's folder is on sys.path only for the import
    items = [ScoreInput("yes", "yes"), ScoreInput("boom", "yes"), ScoreInput("big", "yes"),
             ScoreInput("no", "yes"), ScoreInput("nan", None), ScoreInput("text", None),
             ScoreInput("nothing", None), ScoreInput("yes", "yes", {"ok": False})]
    result = score_all(scorers, items)["my_scorers:score"]
    assert result.values == [1.0, None, None, 0.0, None, None, None, 0.0]
    assert result.errors == 5 and result.skipped_no_reference == 0
    assert result.first_error == "example 1: ValueError: cannot score boom"
    assert result.mean == 1 / 3 and result.summary.n == 3


@pytest.mark.unit
def test_out_of_range_error_message(tmp_path):
    folder = write_module(tmp_path / "r", "range_scorers", "def score(p, r, rec):\n    return 1.5\n")
    scorers = build({"name": "custom", "function": "range_scorers:score"}, base_dir=folder, allow_code=True)
    result = score_all(scorers, [ScoreInput("a", None)])["range_scorers:score"]
    assert result.first_error == "example 0: returned 1.5, outside [0, 1]" and result.mean is None


@pytest.mark.unit
def test_custom_scorer_code_needs_permission(tmp_path):
    folder = write_module(tmp_path, "my_scorers", SCORER_SOURCE)
    with pytest.raises(EdgedistillError) as caught:
        build({"name": "custom", "function": "my_scorers:score"}, base_dir=folder, allow_code=False)
    assert caught.value.problem == ("the recipe names scorer code my_scorers:score; recipes are data people "
                                    "share, so code runs only when you allow it")
    assert caught.value.hint == "pass --allow-recipe-code (or remove the scorer)"


@pytest.mark.unit
def test_custom_scorer_that_cannot_be_loaded(tmp_path):
    def load(function: str) -> EdgedistillError:
        with pytest.raises(EdgedistillError) as caught:
            build({"name": "custom", "function": function}, base_dir=tmp_path, allow_code=True)
        return caught.value

    assert "no module no_such_scorers in" in load("no_such_scorers:score").problem
    write_module(tmp_path, "few_scorers", "def other(p, r, rec):\n    return 1\n")
    assert load("few_scorers:score").problem == "scorer few_scorers:score: module few_scorers has no function score"
    write_module(tmp_path, "needy_scorers", "import no_such_dependency\n")
    assert "importing needy_scorers failed: No module named 'no_such_dependency'" in load("needy_scorers:x").problem
    write_module(tmp_path, "broken_scorers", "def score(:\n")
    assert "importing broken_scorers failed: SyntaxError" in load("broken_scorers:score").problem
    assert "not of the form module:function" in load("my_scorers.score").problem
    with pytest.raises(EdgedistillError, match="needs a function"):
        build("custom", allow_code=True)
    assert str(tmp_path) not in sys.path


@pytest.mark.unit
def test_custom_scorer_from_an_installed_package():
    (scorer,) = build({"name": "custom", "function": "operator:truth"}, allow_code=True)
    assert scorer.name == "operator:truth"
    assert score_all([scorer], [ScoreInput("x", None)])["operator:truth"].errors == 1  # truth takes one argument


@pytest.mark.unit
def test_two_recipes_with_a_module_of_the_same_name(tmp_path):
    first = write_module(tmp_path / "one", "shared_scorers", "def score(p, r, rec):\n    return 1.0\n")
    second = write_module(tmp_path / "two", "shared_scorers", "def score(p, r, rec):\n    return 0.0\n")
    item = ScoreInput("a", None)
    for folder, expected in ((first, 1.0), (second, 0.0)):
        (scorer,) = build({"name": "custom", "function": "shared_scorers:score"}, base_dir=folder, allow_code=True)
        assert scorer(item) == expected


@pytest.mark.unit
def test_unknown_and_repeated_scorers_are_refused():
    with pytest.raises(EdgedistillError, match="unknown scorer 'bleu'"):
        build("bleu")
    with pytest.raises(EdgedistillError, match="chrf is listed twice"):
        build("chrf", "chrf")


class _Judge(Scorer):
    """A batched scorer, as the teacher-as-judge will be: one call for the whole batch."""

    name = "judge"
    needs_reference = False

    def __init__(self, fail: bool = False):
        self.batches: list[int] = []
        self.fail = fail

    def score_batch(self, items):
        self.batches.append(len(items))
        if self.fail:
            raise ConnectionError("teacher endpoint down")
        return [float(len(item.prediction) > 2) for item in items]


@pytest.mark.unit
def test_a_batched_scorer_is_called_once_and_a_failed_batch_counts_every_example():
    items = [ScoreInput("long", None), ScoreInput("no", None), ScoreInput("yes", None)]
    judge = _Judge()
    assert score_all([judge], items)["judge"].values == [1.0, 0.0, 1.0]
    assert judge.batches == [3]
    failed = score_all([_Judge(fail=True), *build("json_parse")], items)
    assert failed["judge"].errors == 3 and failed["judge"].mean is None
    assert failed["judge"].first_error == "example 0: ConnectionError: teacher endpoint down"
    assert failed["json_parse"].values == [0.0, 0.0, 0.0]  # the other scorers still run


@pytest.mark.unit
def test_empty_set_and_unicode_predictions():
    results = score_all(build("exact_match", "json_fields"), [])
    assert results["exact_match"].mean is None and results["exact_match"].values == []
    assert list(results) == ["exact_match", "json_fields"]
    item = ScoreInput('🚀 {"名前": "東京"}', {"名前": "東京"})
    assert score_all(build("json_fields"), [item])["json_field:名前"].values == [1.0]
