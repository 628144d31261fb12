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
from edgedistill.export.stage import export_student, export_teacher
from edgedistill.lora import merge_lora, train_lora
from edgedistill.pipeline import Stage, clear_folder
from edgedistill.recipe import Recipe
from edgedistill.report.markdown import report_stage
from edgedistill.sources import materialize, resolve_source, tokenizer_source
from edgedistill.sources.random_model import build_random_model


def teacher_stage(recipe: Recipe, out: Path) -> dict:
    cfg = recipe.teacher
    # Not resumable: whatever a killed attempt left is started over.
    clear_folder(out)
    if cfg.source == "random":
        build_random_model(cfg.random, tokenizer_source(cfg.tokenizer), out, seed=recipe.seed)
        return {"source": "random", "tokenizer": cfg.tokenizer}
    source = resolve_source(cfg.source)
    materialize(source, out, trust_remote_code=cfg.trust_remote_code)
    return {"source": source.kind, "name": source.name}


def teacher_files(recipe: Recipe) -> dict[str, Path]:
    """The files the teacher is made from, so a changed model file invalidates the cache."""
    cfg = recipe.teacher
    return {"source": resolve_source(cfg.tokenizer if cfg.source == "random" else cfg.source).path}


def prompt_files(recipe: Recipe) -> dict[str, Path]:
    return {"prompts": recipe.resolve(recipe.data.prompts)}


def stages_for(recipe: Recipe) -> list[Stage]:
    """The stages a recipe runs, in order; `lora` and `merge` only when it has a `lora:` section."""
    tuned = ("merge",) if recipe.lora is not None else ("distill",)
    lora_stages = [
        Stage("lora", train_lora, inputs=("distill", "logits"), sections=("seed", "lora")),
        Stage("merge", merge_lora, inputs=("distill", "lora", "logits")),
    ] if recipe.lora is not None else []
    return [
        Stage("teacher", teacher_stage, sections=("seed", "teacher"), external=teacher_files),
        # Not the endpoint's URL, key, concurrency or timeouts: a server that comes back elsewhere
        # resumes the same answers.
        Stage("generate", generate, inputs=("teacher",), external=prompt_files, sections=(
            "seed", "task", "data", "generate.max_new_tokens", "generate.batch_size", "generate.samples",
            "generate.temperature", "generate.reasoning", "generate.endpoint.model")),
        Stage("logits", cache_teacher_logits, inputs=("teacher", "generate"),
              sections=("distill.topk", "distill.max_seq_len", "generate.batch_size")),
        Stage("student", build_student, inputs=("teacher", "generate"), sections=("seed", "student")),
        Stage("distill", distill, inputs=("student", "logits"), sections=("seed", "distill")),
        *lora_stages,
        Stage("export", export_student, inputs=tuned, sections=("name", "export.quants")),
        Stage("teacher_gguf", export_teacher, inputs=("teacher",), sections=("name", "export.teacher_quants")),
        Stage("bench", bench_stage, inputs=("teacher_gguf", "export"), sections=("bench",)),
        Stage("eval", eval_stage, inputs=("teacher", "generate", "teacher_gguf", "export"), sections=("eval",)),
        Stage("report", report_stage, inputs=("teacher", "generate", "logits", "student", "distill",
                                              *(s.name for s in lora_stages), "export", "teacher_gguf", "bench",
                                              "eval"),
              sections=("name", "teacher")),
    ]
