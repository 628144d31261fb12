"""Task prompts: read labelled examples, turn them into chat prompts, split off a held-out set.

    python -c "from edgedistill.recipe import load_recipe; from edgedistill.data.prompts import load_examples; \
print(len(load_examples(load_recipe('recipes/default.yaml'))))"

The held-out split is chosen here, once, from the recipe's seed: its examples are written to
`heldout.jsonl` and never reach training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from edgedistill.errors import EdgedistillError
from edgedistill.recipe import Recipe


@dataclass(frozen=True)
class Example:
    id: int
    text: str
    label: str


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise EdgedistillError(f"{path}:{line_no}: not valid JSON ({exc})",
                                       "each line must be one JSON object") from None
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_examples(recipe: Recipe) -> list[Example]:
    path = recipe.resolve(recipe.data.prompts)
    field_text, field_label = recipe.data.text_field, recipe.data.label_field
    examples = []
    for index, row in enumerate(read_jsonl(path)):
        text, label = row.get(field_text), row.get(field_label)
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


def split_examples(recipe: Recipe, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, heldout), shuffled by the recipe's seed; at least one example on each side."""
    order = list(examples)
    random.Random(recipe.seed).shuffle(order)
    n_heldout = min(max(1, round(len(order) * recipe.data.heldout_fraction)), len(order) - 1)
    return order[n_heldout:], order[:n_heldout]


def prompt_messages(recipe: Recipe, text: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": recipe.task.system}] if recipe.task.system else []
    messages.append({"role": "user", "content": recipe.task.prompt.replace("{text}", text)})
    return messages
