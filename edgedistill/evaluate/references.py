"""Teacher-built references: where a held-out example has no gold answer, the teacher's answer is
its reference, flagged as such, so open-ended tasks can be scored from prompts alone.

    edgedistill eval --build-references prompts.txt --reference runs/qa/teacher --save qa-heldout.jsonl
    edgedistill eval model.gguf --data qa-heldout.jsonl --reference runs/qa/teacher --json eval.json

Where a reference comes from, per held-out record ("reference_source"): gold (the data's own
answer; a label for classification), "teacher" (a reference built from the teacher's answer and
saved with the set) or none. In eval (edgedistill.evaluate.task.evaluate) the reference model's
answers fill the records that have none, for every artifact's scoring but not the reference's own
(it would agree with itself): the reference is scored on the gold examples only, which is its
agreement with gold, the measure of how far the teacher-built part can be trusted.

A teacher answer becomes a reference only when it could be one: its final answer not empty, and
for an extraction task JSON that follows the task's schema (the reference is then that JSON
value), as the generate stage keeps only such answers for training. Other answers leave their
record without a reference (counted as `unusable_teacher_answers`); scorers that need one skip it.

This module is pure: edgedistill.evaluate.task opens the models and generates the answers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgedistill.data.answers import parse_json_answer, schema_validator
from edgedistill.data.prompts import heldout_record, load_examples, task_file
from edgedistill.errors import EdgedistillError
from edgedistill.evaluate.intervals import bootstrap_mean
from edgedistill.evaluate.scorers import FIELD_PREFIX, Scorer, ScorerResult
from edgedistill.layout import TASK_JSON
from edgedistill.recipe import DataConfig, Recipe, StudentConfig, TaskConfig

TEACHER_BUILT = "teacher"  # a record's "reference_source" when its reference is the teacher's answer
GOLD = "gold"
# the task of a prompt file given without a recipe: each row's `text` is the prompt (or its
# `messages` the conversation), an `answer` field the gold reference
PLAIN_TASK = {"kind": "generation", "labels": None, "schema": None, "scorers": None, "answer_separator": None}


def reference_source(record: dict) -> str | None:
    """GOLD, TEACHER_BUILT or None (no reference): a classification record's label is always gold."""
    if "choices" in record:
        return GOLD
    if record.get("reference") is None:
        return None
    return TEACHER_BUILT if record.get("reference_source") == TEACHER_BUILT else GOLD


def answer_validator(task: dict | None) -> Any:
    """The JSON Schema validator a teacher-built reference must pass (extraction), else None."""
    schema = (task or {}).get("schema")
    return schema_validator(schema) if schema is not None else None


def teacher_reference(final_answer: str, validator: Any) -> Any:
    """The reference a teacher's final answer gives, or None when it cannot be one."""
    if validator is not None:
        found, value = parse_json_answer(final_answer)
        return value if found and validator.is_valid(value) else None
    text = final_answer.strip()
    return text or None


def fill_references(rows: list[dict], final_answers: list[str], validator: Any) -> tuple[list[dict], int]:
    """`rows` with the teacher's answer as the reference of each record that has none, marked
    reference_source "teacher"; and how many such records the teacher's answer could not serve."""
    filled, unusable = [], 0
    for row, answer in zip(rows, final_answers, strict=True):
        if reference_source(row) is not None:
            filled.append(row)
            continue
        reference = teacher_reference(answer, validator)
        unusable += reference is None
        filled.append(row if reference is None else {**row, "reference": reference, "reference_source": TEACHER_BUILT})
    return filled, unusable


def gold_only(rows: list[dict]) -> list[dict]:
    """`rows` as the reference model is scored on them: teacher-built references removed."""
    return [{k: v for k, v in row.items() if k not in ("reference", "reference_source")}
            if reference_source(row) == TEACHER_BUILT else row for row in rows]


def with_sources(scores: dict[str, dict], results: dict[str, ScorerResult], rows: list[dict]) -> dict[str, dict]:
    """Each scorer's eval.json entry with how many of the examples it scored had a gold reference
    (`n_gold`) and how many a teacher-built one (`n_teacher_built`)."""
    sources = [reference_source(row) for row in rows]
    counted = {}
    for name, entry in scores.items():
        scored = [source for source, value in zip(sources, results[name].values) if value is not None]
        counted[name] = {**entry, "n_gold": scored.count(GOLD), "n_teacher_built": scored.count(TEACHER_BUILT)}
    return counted


def agreement_with_gold(results: dict[str, ScorerResult], rows: list[dict], scorers: list[Scorer]) -> dict[str, dict]:
    """Per scorer that compares with a reference (and per json_field part), the mean and 95%
    interval of the reference model's answers against the gold references alone."""
    comparing = {scorer.name for scorer in scorers if scorer.needs_reference}
    gold = [reference_source(row) == GOLD for row in rows]
    agreement = {}
    for name, result in results.items():
        if name in comparing or name.startswith(FIELD_PREFIX):
            values = [value for value, is_gold in zip(result.values, gold) if is_gold and value is not None]
            agreement[name] = {key: round(value, 4) if isinstance(value, float) else value
                               for key, value in bootstrap_mean(values).as_dict().items()}
    return agreement


def _examples_recipe(prompts: Path, recipe: Recipe | None) -> Recipe:
    """The recipe whose task and data sections turn `prompts` into examples (load_examples reads
    no other section): the given one with its data file replaced, else a plain {text} prompt."""
    if recipe is not None:
        if recipe.task.kind == "classification":
            raise EdgedistillError("a classification task is scored against gold labels, which a teacher cannot "
                                   "build", "give every example its label and use the generate stage's heldout.jsonl")
        return recipe.model_copy(update={"data": recipe.data.model_copy(update={"prompts": prompts.resolve()})})
    # the student section is required by the schema and read by nothing here
    return Recipe(name="references", task=TaskConfig(kind="generation", prompt="{text}"),
                  data=DataConfig(prompts=prompts.resolve()), student=StudentConfig(keep_layers=1))


def prompt_records(prompts: Path, recipe: Recipe | None) -> tuple[list[dict], dict]:
    """The held-out records of a prompt file (any format edgedistill.data.readers reads), as the
    generate stage writes them, and the task.json content that scores them."""
    examples_recipe = _examples_recipe(prompts, recipe)
    records = [heldout_record(examples_recipe, example) for example in load_examples(examples_recipe)]
    return records, (task_file(examples_recipe) if recipe is not None else dict(PLAIN_TASK))


def check_save(save: Path, task: dict) -> None:
    """Refuses to overwrite a held-out file, or a task.json beside it that is another task's."""
    if save.exists():
        raise EdgedistillError(f"{save} exists", "choose another --save path, or delete the file first")
    if save.suffix != ".jsonl":
        raise EdgedistillError(f"--save {save}: a held-out set is a .jsonl file", "name it e.g. heldout.jsonl")
    task_path = save.parent / TASK_JSON
    if task_path.is_file() and json.loads(task_path.read_text(encoding="utf-8")) != task:
        raise EdgedistillError(f"{task_path} describes another task, and eval reads the task.json beside the data",
                               "save the set into a folder of its own")


def save_reference_set(save: Path, records: list[dict], task: dict) -> None:
    """heldout.jsonl and task.json beside it; the records' file written whole or not at all."""
    save.parent.mkdir(parents=True, exist_ok=True)
    (save.parent / TASK_JSON).write_text(json.dumps(task, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial = save.with_name(save.name + ".partial")
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in records), encoding="utf-8")
    os.replace(partial, save)
