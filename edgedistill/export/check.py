"""Whether every export a run makes can be made, asked right after the teacher stage.

    edgedistill run recipes/tiny.yaml --to teacher     # prints "exports checked: ..." or stops here

The exporters refuse some models from their config.json alone: an architecture llama.cpp or the
ONNX paths lack, rope scaling, a Qwen2 student whose pruned heads no longer span the hidden size
(edgedistill.export.gguf.arch, edgedistill.export.onnx.paths, edgedistill.export.gguf.lora). In the
export stages such a refusal comes after generation and training. So the run applies the same rule
functions once the teacher stage is done or found up to date (the teacher Stage's Check in
edgedistill.stages), to the teacher's config.json and to the config the student will have
(edgedistill.preflight.student_config: the teacher's config with the recipe's pruning, a config
student's overrides, a given student's own config), for the exports the run makes:

- teacher GGUF (teacher_gguf stage) and student GGUF (export stage): always, since both stages
  write F16 even when export.teacher_quants or export.quants is empty;
- student ONNX (export_onnx stage): each precision in export.onnx;
- student GGUF LoRA (export stage, lora/): with a lora: section, its target_modules.

Every refusal found goes into one EdgedistillError that names the recipe field to change. What
only the trained files show (tensor shapes, values beyond float16, the quality bounds) is still
checked by the exporters themselves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from edgedistill import layout
from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import arch
from edgedistill.export.gguf.lora import check_lora_targets
from edgedistill.export.onnx.paths import check_path_precision, choose_path
from edgedistill.preflight import student_config
from edgedistill.recipe import Recipe

# What the recipe reads: the Check's sections in edgedistill.stages.
SECTIONS = ("teacher.trust_remote_code", "teacher.source", "student", "progressive", "export.onnx", "lora")

# The config keys depth and width pruning change, and the student field that changes each.
PRUNED_KEYS = {"num_hidden_layers": "keep_layers", "layer_types": "keep_layers",
               "intermediate_size": "width.intermediate_size", "num_attention_heads": "width.num_attention_heads",
               "num_key_value_heads": "width.num_attention_heads", "head_dim": "width.num_attention_heads",
               "hidden_size": "width.hidden_size"}


def _gguf(config: dict, where: str) -> None:
    arch.gguf_layout(config, where)


def _onnx(precision: str) -> Callable[[dict, str], None]:
    def check(config: dict, where: str) -> None:
        # the run's ONNX exports take path "auto" (export.onnx_options has no path)
        check_path_precision(choose_path(config, "auto", where), precision)
    return check


def _gguf_lora(target_modules: list[str]) -> Callable[[dict, str], None]:
    def check(config: dict, where: str) -> None:
        spec, dims = arch.gguf_layout(config, where)
        check_lora_targets(target_modules, spec, dims, bool(config.get("tie_word_embeddings", spec.tied_default)),
                           where)
    return check


@dataclass(frozen=True)
class PlannedExport:
    """One export the run makes: the stage that makes it, of which model, in what format, checked by
    `rule(config, where)`; `asked_by`: the recipe field that asks for it (None: every run makes it)."""

    stage: str
    role: str
    format: str
    rule: Callable[[dict, str], None]
    asked_by: str | None = None


def planned_exports(recipe: Recipe) -> list[PlannedExport]:
    # an endpoint teacher has no weights here to export
    planned = ([] if recipe.teacher.source == "endpoint" else [PlannedExport(layout.TEACHER_GGUF, "teacher", "GGUF",
                                                                             _gguf)])
    planned.append(PlannedExport(layout.EXPORT, "student", "GGUF", _gguf))
    planned += [PlannedExport(layout.EXPORT_ONNX, "student", f"ONNX {p}", _onnx(p), f"{p} from export.onnx")
                for p in recipe.export.onnx]
    if recipe.lora is not None:
        planned.append(PlannedExport(layout.EXPORT, "student", "GGUF LoRA", _gguf_lora(recipe.lora.target_modules),
                                     "the lora: section"))
    return planned


def _student_config_json(recipe: Recipe, teacher: Path) -> dict:
    """The config.json the student stage will write: save_pretrained's keys, and the model class it names."""
    config = student_config(recipe, teacher)
    as_saved = json.loads(config.to_json_string(use_diff=True))
    if not as_saved.get("architectures"):  # a given GGUF student's config names none until its model is saved
        as_saved["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "?")]
    return as_saved


def _recipe_fields(recipe: Recipe, teacher: dict, student: dict) -> dict[str, str]:
    """Config key -> the recipe field that gives the student its own value for it (none: a given student's
    values are its own)."""
    cfg = recipe.student
    if cfg.method == "given":
        return {}
    if cfg.method == "config":
        return {key: f"student.config.{key}" for key in cfg.config}
    steps = " (or a progressive step's)" if recipe.progressive is not None else ""
    return {key: f"student.{field}{steps}" for key, field in PRUNED_KEYS.items()
            if student.get(key) != teacher.get(key)}


def _fix(recipe: Recipe, export: PlannedExport, refusal: EdgedistillError, fields: dict[str, str]) -> str:
    """What to change in the recipe: the field that gave the refused value, else the model it comes from."""
    named = list(dict.fromkeys(fields[k] for k in getattr(refusal, "keys", ()) if k in fields))
    if named and export.role == "student":
        fix = f"change {', '.join(named)}"
    elif export.role == "student" and recipe.student.method == "given":
        fix = "choose a student the exporter takes (student.source)"
    else:  # the teacher's own config, or a value the student keeps from it
        fix = "choose a teacher the exporter takes (teacher.source)"
    if export.asked_by is not None:
        fix += f", or drop {export.asked_by}"
    return fix + (f" (the exporter: {refusal.hint})" if refusal.hint else "")


def check_exports(recipe: Recipe, teacher: Path, stages: tuple[str, ...] | None = None) -> list[str]:
    """The exports `recipe` makes from the teacher folder `teacher` (those of `stages` only, when
    given), as "<stage>: <model> <format>", once each has passed its exporter's config rules; else
    EdgedistillError naming every refusal and the recipe fields to change."""
    planned = [e for e in planned_exports(recipe) if stages is None or e.stage in stages]
    if not planned:
        return []
    teacher_file = Path(teacher) / layout.HF_CONFIG
    configs = {"teacher": (json.loads(teacher_file.read_text(encoding="utf-8")), str(teacher_file)),
               # an impossible pruning is the student stage's own EdgedistillError, raised here already
               "student": (_student_config_json(recipe, Path(teacher)),
                           f"the student's config.json (from {teacher_file} and the recipe's student section)")}
    # the GGUF LoRA rule reads the adapter's target_modules: the lora section's
    fields = {**_recipe_fields(recipe, configs["teacher"][0], configs["student"][0]),
              "target_modules": "lora.target_modules"}
    checked, problems, fixes = [], [], []
    for export in planned:
        what = f"{export.stage}: {export.role} {export.format}"
        config, where = configs[export.role]
        try:
            export.rule(config, where)
        except EdgedistillError as refusal:
            problems.append(f"{what}: {refusal.problem}")
            fixes.append(_fix(recipe, export, refusal, fields))
            continue
        checked.append(what)
    if problems:
        raise EdgedistillError(
            f"{len(problems)} export(s) the recipe asks for would be refused after training, so the run stops "
            "before it:\n  " + "\n  ".join(problems),
            "; ".join(dict.fromkeys(fixes)))
    return checked


def export_check(recipe: Recipe, teacher: Path, *, stages: tuple[str, ...]) -> str | None:
    """The Check after the teacher stage, for the export stages among `stages` (those the run goes to):
    EdgedistillError before the long stages, or a line for the log (None when the run exports nothing)."""
    checked = check_exports(recipe, teacher, stages)
    return "exports checked: " + ", ".join(checked) if checked else None
