"""Prompt templates with named fields, and rows that are already chat messages.

    python -c "from edgedistill.data.templates import render; \
print(render('{context}\n\nQ: {question}', {'question': 'Why?', 'context': 'Because.'}, 'demo:1'))"

A template is recipe text such as "Answer from the context.\n{context}\n\nQ: {question}": `{name}`
stands for the example's field `name`, and `{{` and `}}` are literal braces (string.Formatter's
syntax). A recipe is data, so a field is a name and nothing more: no attribute or index access,
no conversion, no format spec.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgedistill.errors import EdgedistillError

if TYPE_CHECKING:
    from edgedistill.data.readers import Row

ROLES = ("system", "user", "assistant")
# failures check_template lists before "... and N more": enough to show a pattern, short enough to read
SHOWN_FAILURES = 5
# fields an error lists as what the example has, before "... (N more)"
SHOWN_FIELDS = 20
PLAIN_FIELD = "a template field is a plain name, as in {question}"
LITERAL_BRACES = "write {{ and }} for a literal brace (e.g. JSON in the prompt)"


@dataclass(frozen=True)
class ChatPrompt:
    """A row that is already a conversation: `messages` to send (an optional system turn first,
    ending with a user turn), and `reference`, the row's final assistant turn (its gold answer) or None."""
    messages: list[dict[str, str]]
    reference: str | None


def template_fields(template: str, *, name: str = "task.prompt") -> list[str]:
    """The field names `template` uses, each once, in order of first use; a template that is not
    plain names and literal text is an EdgedistillError (`name` says where the template comes from)."""
    fields = []
    for _, field in _parsed(template, name):
        if field is not None and field not in fields:
            fields.append(field)
    return fields


def render(template: str, fields: dict, where: str, *, name: str = "task.prompt") -> str:
    """`template` with each `{field}` replaced by the example's value: a string as it is, a list or
    dict as JSON, anything else by str(). A field the example lacks or leaves empty (null, blank
    text, an empty list or dict) is an EdgedistillError naming the example (`where`) and the field."""
    parts = []
    for literal, field in _parsed(template, name):
        parts.append(literal)
        if field is not None:
            parts.append(_field_text(fields, field, where, name))
    return "".join(parts)


def check_template(template: str, rows: Iterable[Row], *, name: str = "task.prompt") -> None:
    """Every row checked against `template` before any model work: one EdgedistillError counting
    the rows that cannot fill it and listing the first few, or None when all can."""
    fields = template_fields(template, name=name)
    failures: list[EdgedistillError] = []
    n_failed = n_rows = 0
    for row in rows:
        n_rows += 1
        for field in fields:
            try:
                _field_text(row.fields, field, row.where, name)
            except EdgedistillError as exc:
                n_failed += 1
                if len(failures) < SHOWN_FAILURES:
                    failures.append(exc)
                break
    if failures:
        shown = "\n  ".join(exc.problem for exc in failures)
        more = f"\n  ... and {n_failed - len(failures)} more" if n_failed > len(failures) else ""
        hints = list(dict.fromkeys(exc.hint for exc in failures))
        raise EdgedistillError(f"{n_failed} of {n_rows} examples cannot fill {name}:\n  {shown}{more}",
                               "; ".join(hints))


def chat_messages(fields: dict, messages_field: str, where: str) -> ChatPrompt | None:
    """The conversation in the example's `messages_field`, checked, or None when the example has no
    such field (it is then a template row). Each turn is {"role": "system"|"user"|"assistant",
    "content": text}; a system turn may only come first, at least one user turn is needed, and a
    final assistant turn is taken off as the reference."""
    if messages_field not in fields:
        return None
    turns = fields[messages_field]
    fix = (f"make '{messages_field}' a list of turns {{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": "
           "\"...\"}} with at least one user turn, a system turn only first")
    if not isinstance(turns, list) or not turns:
        raise EdgedistillError(f"{where}: '{messages_field}' is {_shown(turns)}, not a list of chat turns", fix)
    messages = []
    for number, turn in enumerate(turns, 1):
        at = f"{where}: '{messages_field}' turn {number}"
        if not isinstance(turn, dict):
            raise EdgedistillError(f"{at} is {_shown(turn)}, not an object with a role and a content", fix)
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise EdgedistillError(f"{at} has role {_shown(role)}, not one of {', '.join(ROLES)}", fix)
        if not isinstance(content, str) or not content.strip():
            raise EdgedistillError(f"{at} ({role}) has content {_shown(content)}, not text", fix)
        if role == "system" and number != 1:
            raise EdgedistillError(f"{at} is a system turn after the first", fix)
        messages.append({"role": role, "content": content})
    reference = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
    if not any(message["role"] == "user" for message in messages):
        raise EdgedistillError(f"{where}: '{messages_field}' has no user turn", fix)
    if messages[-1]["role"] != "user":
        # the model would be asked to go on from its own turn, not to answer
        raise EdgedistillError(f"{where}: '{messages_field}' ends with two assistant turns", fix)
    return ChatPrompt(messages, reference)


def _parsed(template: str, name: str) -> list[tuple[str, str | None]]:
    """(literal text, field name or None) pairs of `template`, each field checked to be a plain name."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # "Single '}' encountered in format string", ...
        raise EdgedistillError(f"{name}: not a valid template ({exc})", LITERAL_BRACES) from None
    pairs = []
    for literal, field, spec, conversion in parsed:
        if field is not None:
            written = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            if not field.strip():
                raise EdgedistillError(f"{name}: {written} has no field name", f"{PLAIN_FIELD}; {LITERAL_BRACES}")
            if conversion or spec or any(char in field for char in ".[]"):
                raise EdgedistillError(
                    f"{name}: {written} is not a plain field name",
                    f"{PLAIN_FIELD}: no attribute or index access (. []), conversion (!r) or format spec (:>5); "
                    f"{LITERAL_BRACES}")
        pairs.append((literal, field))
    return pairs


def _field_text(fields: dict, field: str, where: str, name: str) -> str:
    if field not in fields:
        names = [str(key) for key in fields]
        listed = ", ".join(names[:SHOWN_FIELDS]) + (f", ... ({len(names) - SHOWN_FIELDS} more)"
                                                    if len(names) > SHOWN_FIELDS else "")
        raise EdgedistillError(f"{where}: the prompt uses {{{field}}}, which this example does not have "
                               f"(it has: {listed or 'no fields'})",
                               f"add the field to every example or remove {{{field}}} from {name}")
    value = fields[field]
    if value is None or (isinstance(value, str) and not value.strip()) or (
            isinstance(value, (list, tuple, dict)) and not value):
        raise EdgedistillError(f"{where}: the prompt uses {{{field}}}, which is empty in this example "
                               f"({_shown(value)})",
                               f"give every example a value for '{field}' or remove {{{field}}} from {name}")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _shown(value: object) -> str:
    """A value as the user wrote it (JSON), cut to 40 characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
