"""What an answer holds: the JSON value in it (extraction tasks), and whether that value follows the
task's JSON Schema. The generate stage keeps only teacher answers that do; the eval stage's JSON
scorers (edgedistill.evaluate.json_scorers) score with the same reading.

    python -c 'from edgedistill.data.answers import parse_json_answer as p; print(p("Hi {\"a\": 1} ok"))'
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

from edgedistill.errors import EdgedistillError


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_FENCE = re.compile(r"```[ \t]*(?:json\b)?[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_json_answer(text: str) -> tuple[bool, Any]:
    """(found, value): the JSON value an answer holds, looked for in this order: the whole answer
    (surrounding whitespace stripped); the first fenced block opened by ``` or ```json (any case);
    the first "{" or "[" in the answer from which a whole JSON value decodes, trying each in turn
    (text after that value is ignored). NaN and Infinity are not JSON."""
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    candidates = [text.strip()]
    fence = _FENCE.search(text)
    if fence:
        candidates.append(fence.group(1).strip())
    for candidate in candidates:
        try:
            return True, decoder.decode(candidate)
        except ValueError:
            pass
    for match in re.finditer(r"[\[{]", text):
        try:
            return True, decoder.raw_decode(text, match.start())[0]
        except ValueError:
            pass
    return False, None


def schema_validator(schema: dict) -> Any:
    """A jsonschema validator for `schema`, the schema itself checked first (against its own
    $schema, by default 2020-12): an invalid one is an EdgedistillError naming where."""
    try:
        jsonschema = importlib.import_module("jsonschema")
    except ImportError as exc:
        raise EdgedistillError("an extraction task needs the package jsonschema, which is not installed",
                               "pip install jsonschema") from exc
    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(part) for part in exc.absolute_path) or "(top level)"
        raise EdgedistillError(
            f"the task's JSON Schema is not valid at {at}: {exc.message}",
            "fix the schema (it is checked against its own $schema, by default 2020-12)") from exc
    return validator_class(schema)


def follows_schema(answer: str, validator: Any) -> bool:
    """Whether `answer` holds a JSON value (as parse_json_answer finds it) that `validator` accepts."""
    found, value = parse_json_answer(answer)
    return found and validator.is_valid(value)
