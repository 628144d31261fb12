"""JSON scorers for extraction tasks: does the answer hold JSON (json_parse), is it valid against
the task's JSON Schema (json_schema), which of the reference object's fields does it get right
(json_fields, and json_field:<name> per field). Built by edgedistill.evaluate.scorers.build_scorers.

    python -c 'from edgedistill.evaluate.json_scorers import JsonParse, ScoreInput; print(JsonParse()(ScoreInput("Hi {\"a\": 1} ok", None)))'
"""

from __future__ import annotations

import json
from typing import Any

from edgedistill.data.answers import parse_json_answer, schema_validator
from edgedistill.evaluate.scorer_base import Outcome, ScoreInput, Scorer, normalize_text

FIELD_PREFIX = "json_field:"


class JsonParse(Scorer):
    name = "json_parse"
    needs_reference = False

    def __call__(self, item: ScoreInput) -> float:
        return float(parse_json_answer(item.prediction)[0])


class JsonSchema(Scorer):
    name = "json_schema"
    needs_reference = False

    def __init__(self, schema: dict):
        self.validator = schema_validator(schema)

    def __call__(self, item: ScoreInput) -> float:
        found, value = parse_json_answer(item.prediction)
        return float(found and self.validator.is_valid(value))


def _same_json(a: Any, b: Any, normalize: bool) -> bool:
    """Equal JSON values, strings compared normalized; a bool equals only a bool (Python's True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, str) and isinstance(b, str):
        return normalize_text(a) == normalize_text(b) if normalize else a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y, normalize) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[key], b[key], normalize) for key in a)
    return a is None and b is None


class JsonFields(Scorer):
    name = "json_fields"

    def __init__(self, normalize: bool = True):
        self.normalize = normalize

    def field_scores(self, item: ScoreInput) -> dict[str, float]:
        """Per top-level field of the reference object: 1 if the answer's object has it equal."""
        reference = item.reference
        if isinstance(reference, str):
            try:
                reference = json.loads(reference)
            except ValueError as exc:
                raise ValueError(f"the reference is text that is not JSON ({exc})") from exc
        if not isinstance(reference, dict):
            raise TypeError(f"json_fields compares an object's fields, and the reference is {type(reference).__name__}")
        found, value = parse_json_answer(item.prediction)
        answer = value if found and isinstance(value, dict) else {}
        return {key: float(key in answer and _same_json(answer[key], gold, self.normalize))
                for key, gold in reference.items()}

    def __call__(self, item: ScoreInput) -> float:
        scores = self.field_scores(item)
        if not scores:  # an empty reference object: only the answer's being an object can be checked
            found, value = parse_json_answer(item.prediction)
            return float(found and isinstance(value, dict))
        return sum(scores.values()) / len(scores)

    def parts(self, items: list[ScoreInput]) -> dict[str, list[Outcome | None]]:
        per_item: list[dict[str, float] | Exception] = []
        for item in items:
            try:
                per_item.append(self.field_scores(item))
            except Exception as exc:
                per_item.append(exc)
        names = list(dict.fromkeys(key for scores in per_item if isinstance(scores, dict) for key in scores))
        return {FIELD_PREFIX + key: [scores if isinstance(scores, Exception) else scores.get(key)
                                     for scores in per_item] for key in names}

