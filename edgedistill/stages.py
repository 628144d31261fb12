"""The stage graph of `edgedistill run`: which stage reads which folders and recipe sections.

    edgedistill run recipes/tiny.yaml --out runs/tiny --from distill

Stages run in this order; each one's folder under the run folder is named after it.
"""

from __future__ import annotations

from pathlib import Path

from edgedistill.bench.latency import bench_stage
from edgedistill.data.generate import generate
from edgedistill.data.logits import cache_teacher_logits
from edgedistill.distill.student import build_student
from edgedistill.distill.train import distill
from edgedistill.evaluate.task import eval_stage
from edgedistill.export.stage import export_student, export_student_onnx, export_teacher
from edgedistill.lora import merge_lora, train_lora
from edgedistill.pipeline import Stage, clear_folder
from edgedistill.recipe import Recipe, recipe_target_files
from edgedistill.report.stage import report_stage
from edgedistill.sources import materialize, resolve_source, tokenizer_source
from edgedistill.sources.random_model import build_random_model


def teacher_stage(recipe: Recipe, out: Path) -> dict:
    cfg = recipe.teacher
    # Not resumable: whatever a killed attempt left is started over.
    clear_folder(out)
    if cfg.source == "random":
        build_random_model(cfg.random, tokenizer_source(recipe.source(cfg.tokenizer)), out, seed=recipe.seed)
        return {"source": "random", "tokenizer": cfg.tokenizer}
    source = resolve_source(recipe.source(cfg.source))
    materialize(source, out, trust_remote_code=cfg.trust_remote_code)
    return {"source": source.kind, "name": source.name}


def teacher_files(recipe: Recipe) -> dict[str, Path]:
    """The files the teacher is made from, so a changed model file invalidates the cache."""
    cfg = recipe.teacher
    return {"source": resolve_source(recipe.source(cfg.tokenizer if cfg.source == "random" else cfg.source)).path}


def prompt_files(recipe: Recipe) -> dict[str, Path]:
    return {"prompts": recipe.resolve(recipe.data.prompts)}


def soft_label_files(recipe: Recipe) -> dict[str, Path]:
    cache = recipe.distill.soft_labels
    return {"soft_labels": recipe.resolve(cache)} if cache is not None else {}


def _step_recipe(recipe: Recipe, index: int) -> Recipe:
    """The recipe as progressive step `index` (1-based) sees it: its pruning and its epochs."""
    step = recipe.progressive.steps[index - 1]
    student = recipe.student.model_copy(update={"keep_layers": step.keep_layers, "layer_selection":
                                                step.layer_selection, "width": step.width})
    distill_cfg = recipe.distill.model_copy(update={"epochs": step.epochs or recipe.distill.epochs,
                                                    "soft_labels": None})
    return recipe.model_copy(update={"student": student, "distill": distill_cfg})


def _progressive_stages(recipe: Recipe) -> tuple[list[Stage], str, str]:
    """The stages of teacher -> step 1 -> ... -> step n, and the folders the student is pruned
    from and learns from (the last step's model, and the teacher's or that model's soft labels)."""
    if recipe.progressive is None:
        return [], "teacher", "logits"
    stages, parent, labels = [], "teacher", "logits"
    previous = recipe.progressive.soft_labels == "previous"
    for i in range(1, len(recipe.progressive.steps) + 1):
        model, trained = f"step{i}", f"step{i}_distill"

        def build(recipe, out, *, _parent=parent, _i=i, **inputs):
            return build_student(_step_recipe(recipe, _i), out, teacher=inputs[_parent],
                                 generate=inputs["generate"], root_teacher=inputs["teacher"])

        def train(recipe, out, *, _model=model, _labels=labels, _i=i, **inputs):
            return distill(_step_recipe(recipe, _i), out, student=inputs[_model], logits=inputs[_labels],
                           generate=inputs["generate"])

        sections = ("seed", "student.calibration_examples", "progressive")
        stages.append(Stage(model, build, inputs=tuple(dict.fromkeys((parent, "generate", "teacher"))),
                            sections=sections))
        stages.append(Stage(trained, train, inputs=(model, labels, "generate"), sections=(*sections, "distill"),
                            distributed=True))
        parent = trained
        if previous:
            def cache(recipe, out, *, _model=trained, **inputs):
                # This model's own top-k, never an imported cache (distill.soft_labels is the teacher's).
                own = recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"soft_labels": None})})
                return cache_teacher_logits(own, out, teacher=inputs[_model], generate=inputs["generate"])

            labels = f"step{i}_logits"
            stages.append(Stage(labels, cache, inputs=(trained, "generate"), sections=(
                "distill.topk", "distill.max_seq_len", "distill.shard_examples", "generate.batch_size")))
    return stages, parent, labels


def stages_for(recipe: Recipe) -> list[Stage]:
    """The stages a recipe runs, in order: `step*` with a `progressive:` section, `lora` and
    `merge` with a `lora:` section."""
    progressive, parent, labels = _progressive_stages(recipe)

    def build(recipe, out, **inputs):
        return build_student(recipe, out, teacher=inputs[parent], generate=inputs["generate"],
                             root_teacher=inputs["teacher"])

    def train(recipe, out, *, student, generate, **inputs):
        return distill(recipe, out, student=student, logits=inputs[labels], generate=generate)

    # what the export stage reads: the distilled student, and the adapter and merged model of a lora: section
    tuned = ("distill", "lora", "merge") if recipe.lora is not None else ("distill",)
    lora_stages = [
        Stage("lora", train_lora, inputs=("distill", "logits", "generate"), sections=("seed", "lora", "distill.topk"),
              distributed=True),
        Stage("merge", merge_lora, inputs=("distill", "lora", "logits", "generate")),
    ] if recipe.lora is not None else []
    trained = [*(s.name for s in progressive), "student", "distill", *(s.name for s in lora_stages)]
    onnx = ("export_onnx",) if recipe.export.onnx else ()
    return [
        Stage("teacher", teacher_stage, sections=("seed", "teacher"), external=teacher_files),
        # Not the endpoint's URL, key, concurrency or timeouts: a server that comes back elsewhere
        # resumes the same answers.
        Stage("generate", generate, inputs=("teacher",), external=prompt_files, sections=(
            "seed", "task", "data", "generate.max_new_tokens", "generate.batch_size", "generate.samples",
            "generate.temperature", "generate.reasoning", "generate.endpoint.model")),
        Stage("logits", cache_teacher_logits, inputs=("teacher", "generate"), external=soft_label_files,
              sections=("distill.topk", "distill.max_seq_len", "distill.shard_examples", "distill.soft_labels",
                        "generate.batch_size"), version=2),
        *progressive,
        # The student stage does not read the distill section; it looks at distill.kl_weight only to
        # refuse early a student that logit distillation cannot train.
        Stage("student", build, inputs=tuple(dict.fromkeys((parent, "generate", "teacher"))),
              sections=("seed", "student")),
        Stage("distill", train, inputs=("student", labels, "generate"), sections=("seed", "distill"), distributed=True),
        *lora_stages,
        # version 2: every file is verified in llama.cpp against its PyTorch model; 3: imatrix, GGUF LoRA
        Stage("export", export_student, inputs=(*tuned, "generate"),
              sections=("name", "export.quants", "export.imatrix"), version=3),
        # version 2: int4 rounded by importance on the generate stage's text
        *([Stage("export_onnx", export_student_onnx, inputs=(*tuned, "generate"),
                 sections=("export.onnx", "export.onnx_options"), version=2)]
          if recipe.export.onnx else []),
        Stage("teacher_gguf", export_teacher, inputs=("teacher",), sections=("name", "export.teacher_quants"),
              version=2),
        Stage("bench", bench_stage, inputs=("teacher_gguf", "export", *onnx), sections=("bench",),
              external=recipe_target_files),
        Stage("eval", eval_stage, inputs=("teacher", "generate", "teacher_gguf", "export", *onnx), sections=("eval",)),
        # version 2: report.html with plots beside report.md
        Stage("report", report_stage, inputs=("teacher", "generate", "logits", *trained, "export", *onnx,
                                              "teacher_gguf", "bench", "eval"),
              sections=("name", "teacher"), version=2),
    ]
