"""Task scorers: how one answer is scored against its held-out record, for any task kind
(classification, generation, extraction), behind one interface, and how eval scores a whole set.

    python -c "from edgedistill.evaluate.scorers import ScoreInput, build_scorers, score_all; \
from pathlib import Path; s = build_scorers(['exact_match', 'chrf'], base_dir=Path('.'), allow_code=False, \
schema=None, labels=None); print(score_all(s, [ScoreInput('Paris.', 'paris', {})])['exact_match'].as_dict())"

A scorer (edgedistill.evaluate.scorer_base.Scorer) maps one ScoreInput (the final answer,
reasoning already removed; the reference; the whole record) to a float in [0, 1]. `build_scorers`
turns the recipe's scorer list into scorers and checks every requirement before any answer is
generated; `score_all` scores a set of answers and never raises for one example: a scorer's
exception, or a value that is not a number in [0, 1], is an error counted for that example (the
first one's message kept), and an example without the reference a scorer needs is skipped and
counted. Both are None in the per-example values and stay out of the mean, which carries a
bootstrap interval (edgedistill.evaluate.intervals); a scorer that failed on every example still
has its result, with mean None. Values stay aligned by example, for paired intervals.

Built-in scorers (recipe `name`, and what 1 means):
- label: the label named first in the answer (whole words, case-insensitive) is record["label"];
  the labels are the record's "choices", else the task's labels;
- exact_match: the answer equals the reference after `normalize_text` (normalize: false compares raw);
- regex: `pattern`, one capture group, searched in the answer; the captured text, normalized, equals
  the normalized reference (no match scores 0);
- chrf: sacrebleu's sentence chrF (character 6-grams, beta 2, case-sensitive) / 100;
- rouge_l: rouge-score's ROUGE-L F-measure on Unicode words, case-folded (rouge-score's own
  tokenizer keeps only ASCII letters and digits, so other scripts would score 0). Both score an
  empty answer 0, unless the reference is empty too (1);
- json_parse: the answer holds a JSON value (`parse_json_answer` says where it is looked for);
- json_schema: that value is valid against the task's JSON Schema (formats are not asserted);
- json_fields: the share of the reference object's top-level fields that the answer's object has
  equal (strings normalized, recursively; true is not 1); also reported per field as
  "json_field:<name>", skipped on examples whose reference lacks that field. A reference given as
  text is parsed as JSON;
- custom: `function: module:function` (also its reported name), from the recipe's folder or an
  installed package, called as function(prediction, reference, record) with reference None where
  the example has none, returning a float or a bool; only with allow_code (a recipe is data
  people share).
The JSON scorers live in edgedistill.evaluate.json_scorers.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill.data.prompts import named_label
from edgedistill.errors import EdgedistillError
from edgedistill.evaluate.intervals import Interval, bootstrap_mean
from edgedistill.evaluate.judge import Chat, JudgeScorer, endpoint_chat
from edgedistill.evaluate.json_scorers import FIELD_PREFIX, JsonFields, JsonParse, JsonSchema, parse_json_answer
from edgedistill.evaluate.scorer_base import (Outcome, ScoreInput, Scorer, ScorerSpec, normalize_text, reference_text,
                                              require_package)

__all__ = ["FIELD_PREFIX", "NAMES", "ScoreInput", "Scorer", "ScorerResult", "ScorerSpec", "build_scorers",
           "default_scorers", "load_function", "normalize_text", "parse_json_answer", "score_all"]

NAMES = ("label", "exact_match", "regex", "chrf", "rouge_l", "json_parse", "json_schema", "json_fields", "custom",
         "judge")
DEFAULTS = {"classification": ["label"], "generation": ["chrf", "rouge_l", "exact_match"],
            "extraction": ["json_parse", "json_schema", "json_fields"]}


class LabelScorer(Scorer):
    name = "label"

    def __init__(self, labels: list[str]):
        self.labels = labels

    def has_reference(self, item: ScoreInput) -> bool:
        return item.record.get("label") is not None

    def __call__(self, item: ScoreInput) -> float:
        choices = item.record.get("choices") or self.labels
        return float(named_label(item.prediction, choices) == item.record["label"])


class ExactMatch(Scorer):
    name = "exact_match"

    def __init__(self, normalize: bool = True):
        self.normalize = normalize

    def __call__(self, item: ScoreInput) -> float:
        reference = reference_text(item)
        if self.normalize:
            return float(normalize_text(item.prediction) == normalize_text(reference))
        return float(item.prediction == reference)


class RegexMatch(Scorer):
    name = "regex"

    def __init__(self, pattern: str, normalize: bool = True):
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise EdgedistillError(f"the regex scorer's pattern '{pattern}' is not a regular expression: {exc}",
                                   "fix the pattern (in YAML, single quotes keep backslashes as they are)") from exc
        if self.pattern.groups != 1:
            raise EdgedistillError(
                f"the regex scorer's pattern '{pattern}' has {self.pattern.groups} capture groups; it needs exactly "
                "one, around the part of the answer to compare with the reference",
                "put the answer part in ( ) and make any other group non-capturing: (?: )")
        self.normalize = normalize

    def __call__(self, item: ScoreInput) -> float:
        reference = reference_text(item)
        match = self.pattern.search(item.prediction)
        if match is None or match.group(1) is None:
            return 0.0
        if self.normalize:
            return float(normalize_text(match.group(1)) == normalize_text(reference))
        return float(match.group(1) == reference)


def _empty_rule(prediction: str, reference: str) -> float | None:
    """Identical empty texts score 1 and one empty text 0 (sacrebleu would score two empties 0)."""
    if prediction.strip() and reference.strip():
        return None
    return float(not prediction.strip() and not reference.strip())


class Chrf(Scorer):
    name = "chrf"

    def __init__(self):
        self.metric = require_package("sacrebleu.metrics", "sacrebleu", self.name).CHRF()

    def __call__(self, item: ScoreInput) -> float:
        reference = reference_text(item)
        empty = _empty_rule(item.prediction, reference)
        return empty if empty is not None else self.metric.sentence_score(item.prediction, [reference]).score / 100


class _UnicodeWords:
    """rouge-score's tokenizer interface: case-folded Unicode words, no stemming."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.casefold())


class RougeL(Scorer):
    name = "rouge_l"

    def __init__(self):
        module = require_package("rouge_score.rouge_scorer", "rouge-score", self.name)
        self.metric = module.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())

    def __call__(self, item: ScoreInput) -> float:
        reference = reference_text(item)
        empty = _empty_rule(item.prediction, reference)
        return empty if empty is not None else self.metric.score(reference, item.prediction)["rougeL"].fmeasure


class CustomScorer(Scorer):
    needs_reference = False  # the function is given None and decides

    def __init__(self, function: str, base_dir: Path, allow_code: bool):
        if not allow_code:
            raise EdgedistillError(f"the recipe names scorer code {function}; recipes are data people share, "
                                   "so code runs only when you allow it",
                                   "pass --allow-recipe-code (or remove the scorer)")
        self.name = function
        self.function = load_function(function, base_dir)

    def __call__(self, item: ScoreInput) -> float:
        return self.function(item.prediction, item.reference, item.record)


def load_function(spec: str, base_dir: Path) -> Callable:
    """`module:function` from a module in `base_dir` (the recipe's folder, on sys.path only while
    importing) or else an installed package."""
    module_name, _, function_name = spec.partition(":")
    if not (all(part.isidentifier() for part in module_name.split(".")) and function_name.isidentifier()):
        raise EdgedistillError(f"scorer function {spec!r} is not of the form module:function",
                               "name it like my_scorers:score (my_scorers.py next to the recipe)")
    relative = Path(*module_name.split("."))
    if (base_dir / relative.with_suffix(".py")).is_file() or (base_dir / relative / "__init__.py").is_file():
        # a module of the same name imported from another recipe's folder must not stand in for this one
        sys.modules.pop(module_name, None)
    entry = str(base_dir)
    importlib.invalidate_caches()  # the folder's listing may be cached from before the module was written
    sys.path.insert(0, entry)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise EdgedistillError(
                f"scorer {spec}: there is no module {module_name} in {base_dir} nor an installed one",
                f"put {relative.with_suffix('.py')} in the recipe's folder, or install the package") from exc
        raise EdgedistillError(f"scorer {spec}: importing {module_name} failed: {exc}",
                               "install what the module imports") from exc
    except Exception as exc:
        raise EdgedistillError(f"scorer {spec}: importing {module_name} failed: {type(exc).__name__}: {exc}",
                               f"fix {module_name}") from exc
    finally:
        if entry in sys.path:
            sys.path.remove(entry)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise EdgedistillError(f"scorer {spec}: module {module_name} has no function {function_name}",
                               f"define {function_name}(prediction, reference, record) in {module_name}")
    return function


def default_scorers(kind: str) -> list[str]:
    """The scorers a task kind gets when its recipe names none."""
    if kind not in DEFAULTS:
        raise EdgedistillError(f"unknown task kind {kind!r}", f"use one of {', '.join(DEFAULTS)}")
    return list(DEFAULTS[kind])


def build_scorers(specs: Sequence[Any], *, base_dir: Path, allow_code: bool, schema: dict | None,
                  labels: list[str] | None, judge_chat: Chat | None = None, judge_cache: Path | None = None
                  ) -> list[Scorer]:
    """Scorers for a recipe's list: ScorerSpec-like objects (name, pattern, function, normalize) or
    bare names. Every requirement is checked here, before any answer is generated."""
    scorers: list[Scorer] = []
    for spec in specs:
        if isinstance(spec, str):
            spec = ScorerSpec(spec)
        name, normalize = spec.name, getattr(spec, "normalize", True)
        if name == "label":
            if not labels:
                raise EdgedistillError("the label scorer needs the task's labels", "list them in task.labels")
            scorers.append(LabelScorer(list(labels)))
        elif name == "exact_match":
            scorers.append(ExactMatch(normalize))
        elif name == "regex":
            if not spec.pattern:
                raise EdgedistillError("the regex scorer needs a pattern", "give it pattern: with one capture group")
            scorers.append(RegexMatch(spec.pattern, normalize))
        elif name == "chrf":
            scorers.append(Chrf())
        elif name == "rouge_l":
            scorers.append(RougeL())
        elif name == "json_parse":
            scorers.append(JsonParse())
        elif name == "json_schema":
            if schema is None:
                raise EdgedistillError("the json_schema scorer needs the task's JSON Schema", "give the task a schema")
            scorers.append(JsonSchema(schema))
        elif name == "json_fields":
            scorers.append(JsonFields(normalize))
        elif name == "custom":
            if not spec.function:
                raise EdgedistillError("the custom scorer needs a function", "give it function: module:function")
            scorers.append(CustomScorer(spec.function, Path(base_dir), allow_code))
        elif name == "judge":
            scorers.append(_judge(spec, judge_chat, judge_cache))
        else:
            raise EdgedistillError(f"unknown scorer {name!r}", f"use one of {', '.join(NAMES)}")
    seen: set[str] = set()
    for scorer in scorers:
        if scorer.name in seen:
            raise EdgedistillError(f"the scorer {scorer.name} is listed twice", "list each scorer once")
        seen.add(scorer.name)
    return scorers


def _judge(spec: Any, chat: Chat | None, cache: Path | None) -> Scorer:
    """The judge of `spec`: asking its endpoint, else `chat` (the teacher eval holds)."""
    if not getattr(spec, "rubric", None):
        raise EdgedistillError("the judge scorer needs a rubric", "give it rubric: a prompt over {prompt}, {answer}, "
                               "{reference} that asks for \"Score: N\"")
    endpoint = getattr(spec, "endpoint", None)
    if endpoint is not None:
        from edgedistill.recipe import EndpointConfig

        chat = endpoint_chat(endpoint if isinstance(endpoint, EndpointConfig) else EndpointConfig(**endpoint))
    if chat is None:
        raise EdgedistillError("the judge scorer has no model to ask",
                               "give eval a reference model (the teacher judges), or the scorer an endpoint")
    return JudgeScorer(spec.rubric, getattr(spec, "scale", (1, 5)), chat, cache)


@dataclass(frozen=True)
class ScorerResult:
    """One scorer over a set: `values` per example (None where skipped or errored), the errors (an
    exception, or a value not a number in [0, 1]) with the first one's message, and the mean of the
    scored values with its bootstrap interval (mean None when nothing was scored)."""

    name: str
    values: list[float | None]
    errors: int
    first_error: str | None
    skipped_no_reference: int
    summary: Interval

    @property
    def mean(self) -> float | None:
        return self.summary.mean

    def as_dict(self) -> dict:
        return {**self.summary.as_dict(), "errors": self.errors, "first_error": self.first_error,
                "skipped_no_reference": self.skipped_no_reference}


def _checked(outcome: Outcome | None) -> float | str | None:
    """A score as a float, None (skipped), or the error's message."""
    if outcome is None:
        return None
    if isinstance(outcome, Exception):
        return f"{type(outcome).__name__}: {outcome}"
    if isinstance(outcome, bool):
        return float(outcome)
    if not isinstance(outcome, numbers.Real):
        return f"returned {type(outcome).__name__} {outcome!r:.80}, not a number"
    if not math.isfinite(outcome) or not 0 <= outcome <= 1:
        return f"returned {outcome!r}, outside [0, 1]"
    return float(outcome)


def _result(name: str, outcomes: list[Outcome | None], seed: int) -> ScorerResult:
    values: list[float | None] = []
    errors, first_error = 0, None
    for index, outcome in enumerate(outcomes):
        checked = _checked(outcome)
        if isinstance(checked, str):
            errors += 1
            first_error = first_error or f"example {index}: {checked}"
            checked = None
        values.append(checked)
    skipped = sum(outcome is None for outcome in outcomes)
    summary = bootstrap_mean([value for value in values if value is not None], seed=seed)
    return ScorerResult(name, values, errors, first_error, skipped, summary)


def score_all(scorers: Sequence[Scorer], items: list[ScoreInput], *, seed: int = 0) -> dict[str, ScorerResult]:
    """Every scorer (and its parts) over `items`, by name; never raises for a bad example."""
    results: dict[str, ScorerResult] = {}
    for scorer in scorers:
        scored = [i for i, item in enumerate(items) if not scorer.needs_reference or scorer.has_reference(item)]
        batch = [items[i] for i in scored]
        try:
            outcomes: list[Outcome] = scorer.score_batch(batch)
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{scorer.name} gave {len(outcomes)} scores for {len(batch)} examples")
        except EdgedistillError:
            raise  # the user must act (a judge endpoint that is down): stop, what was scored is kept
        except Exception as exc:  # the whole batch failed: each of its examples counts the error
            outcomes = [exc] * len(batch)
        placed: list[Outcome | None] = [None] * len(items)
        for index, outcome in zip(scored, outcomes):
            # None stands for a skipped example below, so a scorer's None is an error here
            placed[index] = TypeError("returned None, not a number") if outcome is None else outcome
        results[scorer.name] = _result(scorer.name, placed, seed)
        for part, part_outcomes in scorer.parts(batch).items():
            placed = [None] * len(items)
            for index, outcome in zip(scored, part_outcomes):
                placed[index] = outcome
            results[part] = _result(part, placed, seed)
    return results
