"""Task prompts: read labelled examples (JSONL, CSV, .txt), turn them into chat prompts, split off a held-out set.

    python -c "from edgedistill.recipe import load_recipe; from edgedistill.data.prompts import load_examples; \
print(len(load_examples(load_recipe('recipes/default.yaml'))))"

The held-out split is chosen here, once, from the recipe's seed: its examples are written to
`heldout.jsonl` and never reach training.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from edgedistill.errors import EdgedistillError
from edgedistill.recipe import Recipe


@dataclass(frozen=True)
class Example:
    id: int
    text: str
    label: str


JSON_KINDS = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "an array",
              type(None): "null"}


def utf8_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text with its line ending) per line of a UTF-8 file; a byte that is not UTF-8
    is an EdgedistillError naming its line and byte offset (a UTF-8 byte-order mark is dropped)."""
    if not path.is_file():
        raise EdgedistillError(f"{path} does not exist", "check the path (relative paths in a recipe are "
                                                         "relative to the recipe's folder)")
    lines = []
    offset = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise EdgedistillError(
                    f"{path}:{line_no}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {offset + exc.start})",
                    f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix})"
                ) from None
            lines.append((line_no, text.removeprefix("\ufeff") if line_no == 1 else text))
            offset += len(raw)
    return lines


def numbered_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSONL file of user data: every reader of
    such a file goes through here, so that a bad line is an EdgedistillError naming the file, the
    line and what is wrong (not UTF-8, not valid JSON, not a JSON object)."""
    rows = []
    for line_no, line in utf8_lines(path):
        if not line.strip():
            continue
        fix = f"each line must be one whole JSON object ({{...}}): fix or delete line {line_no}"
        try:
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            # "Unterminated string starting at", "Expecting value": then where
            raise EdgedistillError(f"{path}:{line_no}: not valid JSON ({exc.msg.removesuffix(' at')} at column "
                                   f"{exc.colno})", fix) from None
        if not isinstance(row, dict):
            shown = line.strip() if len(line.strip()) <= 40 else line.strip()[:37] + "..."
            raise EdgedistillError(f"{path}:{line_no}: not a JSON object (got {JSON_KINDS[type(row)]}: {shown})",
                                   fix)
        rows.append((line_no, row))
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file, blank lines skipped; errors as `numbered_jsonl`'s."""
    return [row for _, row in numbered_jsonl(path)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_prompt_file(path: Path, text_field: str, label_field: str) -> list[tuple[str, str | None]]:
    """(text, label or None) per example, from JSONL, CSV (a header row naming the fields) or .txt.

    A .txt file is one prompt per line and has no labels; JSONL/CSV rows may lack the label field.
    """
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = "".join(text for _, text in utf8_lines(path)).splitlines()
        return [(line, None) for line in lines if line.strip()]
    if suffix == ".csv":
        reader = csv.DictReader(text for _, text in utf8_lines(path))
        if reader.fieldnames is None:
            return []
        if text_field not in reader.fieldnames:
            raise EdgedistillError(f"{path}: the CSV header {reader.fieldnames} has no column '{text_field}'",
                                   "set data.text_field to the column holding the text")
        rows = list(reader)
    else:
        rows = read_jsonl(path)
    return [(row.get(text_field), row.get(label_field) or None) for row in rows]


def load_examples(recipe: Recipe) -> list[Example]:
    path = recipe.resolve(recipe.data.prompts)
    field_text = recipe.data.text_field
    pairs = read_prompt_file(path, field_text, recipe.data.label_field)
    if not pairs:
        raise EdgedistillError(f"{path} holds no prompts", "data.prompts must name a JSONL, CSV or .txt file with examples")
    if all(label is None for _, label in pairs):
        # Unlabelled prompts could train (the teacher answers them), but the held-out split is
        # scored against gold labels, and every task kind so far is classification.
        raise EdgedistillError(
            f"{path} has no labels (field '{recipe.data.label_field}'), so the held-out split cannot be scored",
            f"a {recipe.task.kind} task needs a gold label per example: use JSONL or CSV with a label "
            "column named by data.label_field")
    examples = []
    for index, (text, label) in enumerate(pairs):
        if not isinstance(text, str) or not text.strip():
            raise EdgedistillError(f"{path}: example {index + 1} has no text in field '{field_text}'",
                                   "set data.text_field to the field holding the text")
        if label not in recipe.task.labels:
            raise EdgedistillError(f"{path}: example {index + 1} has label {label!r}, not one of {recipe.task.labels}",
                                   "fix the label or list it in task.labels")
        examples.append(Example(index, text.strip(), label))
    if recipe.data.limit is not None:
        examples = examples[: recipe.data.limit]
    if len(examples) < 2:
        raise EdgedistillError(f"{path} has {len(examples)} usable examples", "a run needs at least 2 (one held out)")
    return examples


def check_data(recipe: Recipe) -> None:
    """The user's data checked before the first stage of a run (an empty prompts file, a bad line,
    a label the task does not list), so a mistake there costs no teacher conversion."""
    split_examples(recipe, load_examples(recipe))


def split_examples(recipe: Recipe, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, heldout), shuffled by the recipe's seed; at least one example on each side."""
    order = list(examples)
    random.Random(recipe.seed).shuffle(order)
    n_heldout = min(max(1, round(len(order) * recipe.data.heldout_fraction)), len(order) - 1)
    return order[n_heldout:], order[:n_heldout]


def reasoning_instruction(labels: list[str]) -> str:
    """Appended to the user turn, not sent as a system turn: small instruct models (SmolLM2-135M)
    follow an instruction at the end of the user message far more often than a system prompt."""
    return ("\n\nThink step by step and explain your reasoning briefly. Then write your final answer on the "
            f"last line as \"Answer: <label>\", where <label> is one of: {', '.join(labels)}.")


def prompt_messages(recipe: Recipe, text: str, *, reasoning: bool | None = None) -> list[dict[str, str]]:
    """The chat prompt for one example; with reasoning (recipe.generate.reasoning unless given) it
    asks for a trace and an `Answer:` line."""
    messages = [{"role": "system", "content": recipe.task.system}] if recipe.task.system else []
    content = recipe.task.prompt.replace("{text}", text)
    if recipe.generate.reasoning if reasoning is None else reasoning:
        content += reasoning_instruction(recipe.task.labels)
    messages.append({"role": "user", "content": content})
    return messages


def named_label(text: str, labels: list[str]) -> str | None:
    """The label named first in `text` (whole words, case-insensitive), as the eval stage reads answers."""
    found = []
    for label in labels:
        match = re.search(rf"\b{re.escape(label.lower())}\b", text.lower())
        if match:
            found.append((match.start(), label))
    return min(found)[1] if found else None
