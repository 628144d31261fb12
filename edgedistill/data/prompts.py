"""Task examples: rows of any data file (edgedistill.data.readers) turned into chat prompts with their
gold label or reference answer, and the held-out split.

    python -c "from edgedistill.recipe import load_recipe; from edgedistill.data.prompts import load_examples; \
print(len(load_examples(load_recipe('recipes/default.yaml'))))"

A row is a template row (task.prompt and task.system filled from its fields, edgedistill.data.templates)
or a conversation of its own (data.messages_field, whose last assistant turn is the reference). The
held-out split is chosen here, once, from the recipe's seed: its examples are written to
`heldout.jsonl` and never reach training.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill.data.answers import schema_validator
from edgedistill.data.readers import Row, numbered_jsonl, read_rows
from edgedistill.data.templates import chat_messages, check_template, render, template_fields
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import Recipe


@dataclass(frozen=True)
class Example:
    """One task example: its prompt as chat messages (the template filled in, or the row's own
    conversation), its gold label (classification) or reference answer (text or JSON), if any."""

    id: int
    messages: list[dict[str, str]]
    label: str | None = None
    reference: Any = None
    where: str = ""  # names it in an error: "prompts.jsonl:12"


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file, blank lines skipped; errors as `numbered_jsonl`'s."""
    return [row for _, row in numbered_jsonl(path)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_prompt_file(path: Path, text_field: str, label_field: str) -> list[tuple[str, str | None]]:
    """(text, label or None) per row of any data file (edgedistill.data.readers.read_rows)."""
    return [(row.fields.get(text_field), row.fields.get(label_field) or None)
            for row in read_rows(path, text_field=text_field)]


def _stripped(fields: dict) -> dict:
    # surrounding whitespace of a text field is not part of the example
    return {name: value.strip() if isinstance(value, str) else value for name, value in fields.items()}


def _example(recipe: Recipe, index: int, row: Row) -> Example:
    task, data = recipe.task, recipe.data
    fields = _stripped(row.fields)
    chat = chat_messages(fields, data.messages_field, row.where)
    if chat is not None:
        messages, reference = chat.messages, chat.reference
    elif task.prompt is None:
        raise EdgedistillError(f"{row.where} has no '{data.messages_field}' conversation and task.prompt is not set",
                               "set task.prompt to a template over the example's fields, e.g. \"Question: {question}\"")
    else:
        system = render(task.system, fields, row.where, name="task.system") if task.system else None
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": render(task.prompt, fields, row.where)}]
        reference = fields.get(data.reference_field)
    if task.kind == "classification":
        label = fields.get(data.label_field) or None
        if label is not None and label not in task.labels:
            raise EdgedistillError(f"{row.where} has label {label!r}, not one of {task.labels}",
                                   "fix the label or list it in task.labels")
        return Example(index, messages, label=label, where=row.where)
    if isinstance(reference, str) and not reference:
        raise EdgedistillError(f"{row.where}: the reference answer ('{data.reference_field}') is empty",
                               "remove the field where there is no gold answer, or fill it")
    return Example(index, messages, reference=reference, where=row.where)


def load_examples(recipe: Recipe) -> list[Example]:
    """The recipe's examples, every row checked before any model work (its template fields, its
    conversation, its label), with the first `data.limit`."""
    path = recipe.resolve(recipe.data.prompts)
    rows = read_rows(path, text_field=recipe.data.text_field)
    if recipe.data.limit is not None:
        rows = rows[: recipe.data.limit]
    template_rows = [row for row in rows if recipe.data.messages_field not in row.fields]
    if recipe.task.prompt is not None:
        if template_rows and not template_fields(recipe.task.prompt):
            raise EdgedistillError("task.prompt uses no field of the examples, so every one would get the same prompt",
                                   f"put the example's text in it, e.g. {{{recipe.data.text_field}}}")
        check_template(recipe.task.prompt, template_rows)  # every failing row named at once
    if recipe.task.system:
        check_template(recipe.task.system, template_rows, name="task.system")
    examples = [_example(recipe, index, row) for index, row in enumerate(rows)]
    if recipe.task.kind == "classification" and all(ex.label is None for ex in examples):
        # Unlabelled prompts could train (the teacher answers them), but the held-out split is
        # scored against gold labels.
        raise EdgedistillError(
            f"{path} has no labels (field '{recipe.data.label_field}'), so the held-out split cannot be scored",
            "a classification task needs a gold label per example: use rows with a label field named by "
            "data.label_field, or make the task kind generation")
    if recipe.task.kind == "classification":
        unlabelled = [ex.where for ex in examples if ex.label is None]
        if unlabelled:
            raise EdgedistillError(f"{len(unlabelled)} examples have no label, the first {unlabelled[0]}",
                                   f"give every example a label in field '{recipe.data.label_field}'")
    if len(examples) < 2:
        raise EdgedistillError(f"{path} has {len(examples)} usable examples", "a run needs at least 2 (one held out)")
    return examples


def task_schema(recipe: Recipe) -> dict | None:
    """The extraction task's JSON Schema: inline in the recipe, or read from its .json file."""
    schema = recipe.task.output_schema
    if schema is None or isinstance(schema, dict):
        return schema
    path = recipe.resolve(Path(schema))
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EdgedistillError(f"task.schema: cannot read {path} ({exc.strerror})",
                               "point task.schema at a JSON Schema file, relative to the recipe") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgedistillError(f"task.schema: {path} is not JSON ({exc})", "fix the schema file") from None
    if not isinstance(value, dict):
        raise EdgedistillError(f"task.schema: {path} holds {type(value).__name__}, not a JSON Schema object",
                               "a JSON Schema is an object, e.g. {\"type\": \"object\", \"properties\": {...}}")
    return value


def heldout_record(recipe: Recipe, example: Example) -> dict:
    """An example as eval reads it: the plain prompt (no reasoning request) and its gold, if any."""
    record = {"id": example.id, "messages": prompt_messages(recipe, example, reasoning=False)}
    if recipe.task.kind == "classification":
        return record | {"label": example.label, "choices": recipe.task.labels}
    return record | ({"reference": example.reference} if example.reference is not None else {})


def task_file(recipe: Recipe) -> dict | None:
    """task.json's content, or None for a classification task scored by its label alone (its
    held-out records carry their choices, as before task.json existed)."""
    if recipe.task.kind == "classification" and recipe.task.scorers is None and recipe.task.answer_separator is None:
        return None
    scorers = recipe.task.scorers
    return {"kind": recipe.task.kind, "labels": recipe.task.labels, "schema": task_schema(recipe),
            "scorers": [scorer.model_dump(mode="json") for scorer in scorers] if scorers is not None else None,
            "answer_separator": recipe.task.answer_separator,
            # a custom scorer's module is looked for beside the recipe
            **({"base_dir": str(recipe.base_dir)} if any(s.name == "custom" for s in scorers or []) else {})}


def write_task(path: Path, recipe: Recipe) -> None:
    task = task_file(recipe)
    if task is not None:
        path.write_text(json.dumps(task, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_data(recipe: Recipe) -> None:
    """The user's data checked before the first stage of a run (an empty prompts file, a bad line,
    a label the task does not list, a schema that is not valid JSON Schema), so a mistake there
    costs no teacher conversion."""
    split_examples(recipe, load_examples(recipe))
    schema = task_schema(recipe)
    if schema is not None:
        schema_validator(schema)


def split_examples(recipe: Recipe, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, heldout), shuffled by the recipe's seed; at least one example on each side."""
    order = list(examples)
    random.Random(recipe.seed).shuffle(order)
    n_heldout = min(max(1, round(len(order) * recipe.data.heldout_fraction)), len(order) - 1)
    return order[n_heldout:], order[:n_heldout]


def reasoning_instruction(labels: list[str] | None, separator: str | None = None) -> str:
    """Appended to the user turn, not sent as a system turn: small instruct models (SmolLM2-135M)
    follow an instruction at the end of the user message far more often than a system prompt."""
    marker = separator or "Answer:"
    if not labels:
        return ("\n\nThink step by step and explain your reasoning briefly. Then write \"" + marker + "\" on a line "
                "of its own, followed by your final answer.")
    return ("\n\nThink step by step and explain your reasoning briefly. Then write your final answer on the "
            f"last line as \"{marker} <label>\", where <label> is one of: {', '.join(labels)}.")


def prompt_messages(recipe: Recipe, example: Example, *, reasoning: bool | None = None) -> list[dict[str, str]]:
    """The chat prompt for one example; with reasoning (recipe.generate.reasoning unless given) its
    last user turn asks for a trace and an `Answer:` line."""
    messages = [dict(message) for message in example.messages]
    if recipe.generate.reasoning if reasoning is None else reasoning:
        messages[-1]["content"] += reasoning_instruction(recipe.task.labels, recipe.task.answer_separator)
    return messages


def named_label(text: str, labels: list[str]) -> str | None:
    """The label named first in `text` (whole words, case-insensitive), as the eval stage reads answers."""
    found = []
    for label in labels:
        match = re.search(rf"\b{re.escape(label.lower())}\b", text.lower())
        if match:
            found.append((match.start(), label))
    return min(found)[1] if found else None
