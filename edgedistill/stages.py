"""The stage graph of `edgedistill run`: which stage reads which folders and recipe sections.

    edgedistill run recipes/tiny.yaml --out runs/tiny --from distill

Stages run in this order; each one's folder under the run folder is named after it. Each Stage
declares the recipe sections its function reads; the function gets a view of the recipe with
only those (edgedistill.pipeline.SectionView), so what a stage reads is what its cache key covers.
"""

from __future__ import annotations

from pathlib import Path

from edgedistill.bench.latency import bench_stage
from edgedistill.data.generate import generate
from edgedistill.data.endpoint_labels import cache_endpoint_logits
from edgedistill.data.logits import cache_teacher_logits
from edgedistill.distill.on_policy import on_policy_stage
from edgedistill.distill.student import build_student
from edgedistill.distill.train import distill
from edgedistill.errors import EdgedistillError
from edgedistill.evaluate.task import eval_stage
from edgedistill.export import check as export_check
from edgedistill.export.quant_grids import build_quant_aware
from edgedistill.export.stage import export_student, export_student_onnx, export_teacher
from edgedistill.layout import (BENCH, DISTILL, EVAL, EXPORT, EXPORT_ONNX, GENERATE, LOGITS, LORA, MERGE, ON_POLICY,
                                PREFLIGHT, REPORT, ROUTE, STUDENT, TEACHER, TEACHER_GGUF)
from edgedistill.lora import merge_lora, train_lora
from edgedistill.pipeline import Check, Stage, clear_folder
from edgedistill.preflight import preflight_stage
from edgedistill.recipe import Recipe, recipe_target_files
from edgedistill.report.stage import report_stage
from edgedistill.route import route_stage
from edgedistill.runtimes.compute import require_device
from edgedistill.runtimes.pytorch import load_model
from edgedistill.sources import materialize, resolve_source, tokenizer_source
from edgedistill.sources.endpoint import is_endpoint_teacher, write_endpoint_teacher
from edgedistill.sources.endpoint import tokenizer_path as endpoint_tokenizer_path
from edgedistill.sources.random_model import build_random_model


def teacher_stage(recipe: Recipe, out: Path) -> dict:
    cfg = recipe.teacher
    # Not resumable: whatever a killed attempt left is started over.
    clear_folder(out)
    if cfg.source == "random":
        build_random_model(cfg.random, tokenizer_source(recipe.source(cfg.tokenizer)), out, seed=recipe.seed)
        return {"source": "random", "tokenizer": cfg.tokenizer}
    if cfg.source == "endpoint":
        return write_endpoint_teacher(recipe.source(cfg.tokenizer), out)
    source = resolve_source(recipe.source(cfg.source))
    materialize(source, out, trust_remote_code=cfg.trust_remote_code)
    return {"source": source.kind, "name": source.name}


def logits_stage(recipe: Recipe, out: Path, *, teacher: Path, generate: Path) -> dict:
    """The teacher's top-k: from its forward passes, or from an endpoint teacher's answer tokens."""
    if is_endpoint_teacher(teacher):
        return cache_endpoint_logits(recipe, out, teacher=teacher, generate=generate)
    return cache_teacher_logits(recipe, out, teacher=teacher, generate=generate)


def teacher_files(recipe: Recipe) -> dict[str, Path]:
    """The files the teacher is made from, so a changed model file invalidates the cache."""
    cfg = recipe.teacher
    if cfg.source == "endpoint":
        return {"source": endpoint_tokenizer_path(recipe.source(cfg.tokenizer))}
    return {"source": resolve_source(recipe.source(cfg.tokenizer if cfg.source == "random" else cfg.source)).path}


def prompt_files(recipe: Recipe) -> dict[str, Path]:
    """The data file and, for an extraction task, its schema file: the generate stage's key covers their content."""
    schema = recipe.task.output_schema
    return {"prompts": recipe.resolve(recipe.data.prompts),
            **({"schema": recipe.resolve(Path(schema))} if isinstance(schema, (str, Path)) else {})}


def soft_label_files(recipe: Recipe) -> dict[str, Path]:
    cache = recipe.distill.soft_labels
    return {"soft_labels": recipe.resolve(cache)} if cache is not None else {}


# teacher.trust_remote_code is a permission to load the teacher, not a setting of the result.
LOADS_TEACHER = ("teacher.trust_remote_code",)
# What building a student reads: how to prune (the student section, or a progressive step's pruning
# written into it by _step_recipe); distill.kl_weight only to refuse early a student that logit
# distillation cannot train.
STUDENT_SECTIONS = ("seed", "student")
STUDENT_UNKEYED = (*LOADS_TEACHER, "distill.kl_weight")
# compute: where and in what dtype the teacher runs, which changes its answers and log-probs (in the
# key of every stage that runs it; left out at its default, so older runs stay cached)
LOGITS_SECTIONS = ("distill.topk", "distill.max_seq_len", "distill.shard_examples", "distill.soft_labels",
                   "generate.batch_size", "compute")
# distill.quant_aware's grids are the exports' (edgedistill.export.quant_grids): in the key of the
# stages it fake-quantizes, only when it is set, so other runs keep their keys
QUANT_AWARE_SECTIONS = ("distill.quant_aware", "export.quants", "export.imatrix", "export.onnx", "export.onnx_options")


def _step_recipe(recipe: Recipe, index: int) -> Recipe:
    """The recipe as progressive step `index` (1-based) sees it: its pruning and its epochs."""
    step = recipe.progressive.steps[index - 1]
    student = recipe.student.model_copy(update={"keep_layers": step.keep_layers, "layer_selection":
                                                step.layer_selection, "width": step.width})
    # an intermediate model is never exported: it trains in float
    distill_cfg = recipe.distill.model_copy(update={"epochs": step.epochs or recipe.distill.epochs,
                                                    "soft_labels": None, "on_policy": None, "quant_aware": None})
    return recipe.model_copy(update={"student": student, "distill": distill_cfg})


def _off_policy(recipe: Recipe) -> Recipe:
    """The distill stage's recipe: distill.on_policy is the on_policy stage's, not in distill's key."""
    return recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"on_policy": None})})


def _quant_aware(recipe: Recipe, student: Path, first_epoch: int):
    """distill.quant_aware's grids for the student in `student` (None without quant_aware), rounded
    from epoch `first_epoch` on (0-based)."""
    if recipe.distill.quant_aware is None:
        return None
    return build_quant_aware(load_model(student), student, recipe.distill, recipe.export, first_epoch=first_epoch)


def _on_policy_stage(quant_aware: bool):
    """The on_policy stage; with distill.quant_aware (`quant_aware`, known from the whole recipe:
    the stage's view declares that section only when it is set) every on-policy epoch is
    fake-quantized."""
    def stage(recipe: Recipe, out: Path, *, distill: Path, teacher: Path, generate: Path) -> dict:
        return on_policy_stage(recipe, out, distill=distill, teacher=teacher, generate=generate,
                               quant_aware=_quant_aware(recipe, distill, 0) if quant_aware else None)
    return stage


def _reading_as_distill(fn, folder: str):
    """`fn`, which takes the trained student as its `distill` input, given stage `folder`'s instead
    (on_policy's); `fn` itself for distill and merge, which it takes by their own names."""
    if folder != ON_POLICY:
        return fn

    def stage(recipe, out, **inputs):
        return fn(recipe, out, **{DISTILL: inputs.pop(folder)}, **inputs)

    return stage


def _refuse_unsupported(recipe: Recipe) -> None:
    """Combinations of distill.soft_labels_from / distill.on_policy with other sections that do not run yet."""
    online = recipe.distill.soft_labels_from == "online"
    if recipe.teacher.source == "endpoint" and online:
        # the endpoint's soft labels of its own answers are cached already: asking again each step
        # would give the same rows at the price of a request per token
        raise EdgedistillError("distill.soft_labels_from: online runs the teacher here, and teacher.source is endpoint "
                               "(no weights here)",
                               "remove distill.soft_labels_from to distill from the endpoint's cached soft labels; "
                               "distill.on_policy does score the student's own answers through the endpoint")
    if online and recipe.progressive is not None:
        raise EdgedistillError("distill.soft_labels_from: online with a progressive: section: the steps learn from "
                               "cached soft labels only",
                               "set distill.soft_labels_from: cache (the default), or remove progressive:")


def _own_soft_labels(recipe: Recipe) -> Recipe:
    """A model's own top-k is cached from it, never imported (distill.soft_labels is the teacher's)."""
    return recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"soft_labels": None})})


def _progressive_stages(recipe: Recipe) -> tuple[list[Stage], str, str]:
    """The stages of teacher -> step 1 -> ... -> step n, and the folders the student is pruned
    from and learns from (the last step's model, and the teacher's or that model's soft labels)."""
    if recipe.progressive is None:
        return [], TEACHER, LOGITS
    stages, parent, labels = [], TEACHER, LOGITS
    previous = recipe.progressive.soft_labels == "previous"
    for i in range(1, len(recipe.progressive.steps) + 1):
        model, trained = f"step{i}", f"step{i}_distill"

        def build(recipe, out, *, _parent=parent, **inputs):
            return build_student(recipe, out, teacher=inputs[_parent], generate=inputs[GENERATE],
                                 root_teacher=inputs[TEACHER])

        def train(recipe, out, *, _model=model, _labels=labels, **inputs):
            return distill(recipe, out, student=inputs[_model], logits=inputs[_labels], generate=inputs[GENERATE])

        def step_recipe(recipe, _i=i):
            return _step_recipe(recipe, _i)

        stages.append(Stage(model, build, inputs=tuple(dict.fromkeys((parent, GENERATE, TEACHER))),
                            sections=STUDENT_SECTIONS, unkeyed_sections=STUDENT_UNKEYED, derive=step_recipe))
        stages.append(Stage(trained, train, inputs=(model, labels, GENERATE), sections=("seed", "distill"),
                            derive=step_recipe, distributed=True))
        parent = trained
        if previous:
            def cache(recipe, out, *, _model=trained, **inputs):
                return cache_teacher_logits(recipe, out, teacher=inputs[_model], generate=inputs[GENERATE])

            labels = f"step{i}_logits"
            stages.append(Stage(labels, cache, inputs=(trained, GENERATE), sections=LOGITS_SECTIONS,
                                unkeyed_sections=LOADS_TEACHER, derive=_own_soft_labels))
    return stages, parent, labels


def stages_for(recipe: Recipe) -> list[Stage]:
    """The stages a recipe runs, in order: `preflight` with a bench.target, `step*` with a
    `progressive:` section, `lora` and `merge` with a `lora:` section, `export_onnx` with export.onnx,
    `route` (after eval) with a `route:` section.
    A compute: section that asks for a GPU this machine lacks is refused here, before any stage runs.
    With distill.soft_labels_from online, distill reads the teacher instead of the logits stage, which
    runs only for a lora: section; with distill.on_policy, an `on_policy` stage follows distill and
    what read distill (lora, merge, the exports, eval) reads it instead."""
    require_device(recipe.compute)
    _refuse_unsupported(recipe)
    progressive, parent, labels = _progressive_stages(recipe)
    online = recipe.distill.soft_labels_from == "online"
    # lora trains from the cache whichever way distill got its soft labels
    cache = (LOGITS,) if not online or recipe.lora is not None else ()

    def build(recipe, out, **inputs):
        return build_student(recipe, out, teacher=inputs[parent], generate=inputs[GENERATE],
                             root_teacher=inputs[TEACHER])

    def train(recipe, out, *, student, generate, **inputs):
        qa = recipe.distill.quant_aware
        return distill(recipe, out, student=student, generate=generate, logits=inputs.get(labels),
                       teacher=inputs.get(TEACHER),
                       quant_aware=_quant_aware(recipe, student, recipe.distill.epochs - qa.epochs) if qa else None)

    quant_aware = QUANT_AWARE_SECTIONS if recipe.distill.quant_aware is not None else ()
    # the online teacher runs in the recipe's compute: section (left out of the key at its default)
    distill_stage = Stage(DISTILL, train, inputs=(STUDENT, TEACHER if online else labels, GENERATE),
                          sections=("seed", "distill", *(("compute",) if online else ()), *quant_aware),
                          unkeyed_sections=LOADS_TEACHER if online else (), derive=_off_policy, distributed=True)
    on_policy = [Stage(ON_POLICY, _on_policy_stage(bool(quant_aware)), inputs=(DISTILL, TEACHER, GENERATE),
                       sections=("seed", "distill.on_policy", "distill.topk", "distill.max_seq_len",
                                 "generate.max_new_tokens", "compute", "teacher.source", "generate.endpoint.model",
                                 *quant_aware),
                       # an endpoint teacher scores the samples: where it is, how many requests at once
                       unkeyed_sections=("distill.threads", "generate.endpoint", *LOADS_TEACHER))] \
        if recipe.distill.on_policy else []
    # the student the rest starts from: the on-policy one when there is one
    base = ON_POLICY if on_policy else DISTILL
    # what the export stages read: that student, and the adapter and merged model of a lora: section
    tuned = (base, LORA, MERGE) if recipe.lora is not None else (base,)
    lora_stages = [
        Stage(LORA, _reading_as_distill(train_lora, base), inputs=(base, LOGITS, GENERATE),
              sections=("seed", "lora", "distill.topk"), distributed=True),
        # lora only picks the examples the merge is checked on
        Stage(MERGE, _reading_as_distill(merge_lora, base), inputs=(base, LORA, LOGITS, GENERATE),
              unkeyed_sections=("lora",)),
    ] if recipe.lora is not None else []
    trained = [*(s.name for s in progressive), STUDENT, DISTILL, *(s.name for s in on_policy),
               *(s.name for s in lora_stages)]
    onnx = (EXPORT_ONNX,) if recipe.export.onnx else ()
    preflight = (PREFLIGHT,) if recipe.bench.target is not None else ()
    route = (ROUTE,) if recipe.route is not None else ()
    return [
        # the check: whether every export the recipe asks for takes the teacher and the student it will
        # have, before the long stages (a refusal would otherwise come after training)
        Stage(TEACHER, teacher_stage, sections=("seed", "teacher"), external=teacher_files,
              check=Check(export_check.export_check, export_check.SECTIONS)),
        # with a device target, whether the student will fit it, estimated before the long stages
        *([Stage(PREFLIGHT, preflight_stage, inputs=(TEACHER,), external=recipe_target_files,
                 sections=("bench.target", "export.quants", "export.teacher_quants", "student", "progressive",
                           "teacher.trust_remote_code"))] if preflight else []),
        # Not the endpoint's URL, key, concurrency or timeouts: a server that comes back elsewhere
        # resumes the same answers. min_kept only decides whether the stage stops: lowering it
        # after a stop resumes with the answers kept.
        Stage(GENERATE, generate, inputs=(TEACHER,), external=prompt_files, sections=(
            "seed", "task", "data", "generate.max_new_tokens", "generate.batch_size", "generate.samples",
            "generate.temperature", "generate.reasoning", "generate.endpoint.model", "compute"),
            unkeyed_sections=("generate.endpoint", "generate.min_kept", *LOADS_TEACHER)),
        *([Stage(LOGITS, logits_stage, inputs=(TEACHER, GENERATE), external=soft_label_files,
                 sections=LOGITS_SECTIONS, unkeyed_sections=LOADS_TEACHER, version=2)] if cache else []),
        *progressive,
        Stage(STUDENT, build, inputs=tuple(dict.fromkeys((parent, GENERATE, TEACHER))), sections=STUDENT_SECTIONS,
              unkeyed_sections=STUDENT_UNKEYED),
        distill_stage,
        *on_policy,
        *lora_stages,
        # version 2: every file is verified in llama.cpp against its PyTorch model; 3: imatrix, GGUF LoRA
        Stage(EXPORT, _reading_as_distill(export_student, base), inputs=(*tuned, GENERATE),
              sections=("name", "export.quants", "export.imatrix"), version=3),
        # version 2: int4 rounded by importance on the generate stage's text
        *([Stage(EXPORT_ONNX, _reading_as_distill(export_student_onnx, base), inputs=(*tuned, GENERATE),
                 sections=("export.onnx", "export.onnx_options"), version=2)] if onnx else []),
        Stage(TEACHER_GGUF, export_teacher, inputs=(TEACHER,), sections=("name", "export.teacher_quants"), version=2),
        Stage(BENCH, bench_stage, inputs=(TEACHER_GGUF, EXPORT, *onnx), sections=("bench",),
              external=recipe_target_files),
        # the trained student (tuned[-1]: distill, or merge) is a row too, in PyTorch fp32
        # allow_code: a permission to run a custom scorer, not a setting; generate.endpoint: where an
        # endpoint teacher answers (its URL, like generate's, is not part of the key)
        Stage(EVAL, _reading_as_distill(eval_stage, tuned[-1]), inputs=(TEACHER, GENERATE, tuned[-1], TEACHER_GGUF,
                                                                   EXPORT, *onnx), sections=("eval", "compute"),
              unkeyed_sections=("allow_code", "generate.endpoint")),
        # when a served student hands a request to the teacher (edgedistill.route): eval's answers of the
        # student artifact and the teacher, that artifact's confidence, from the export folder holding it
        *([Stage(ROUTE, route_stage, inputs=(GENERATE, EVAL, EXPORT, *onnx), sections=("route",))] if route else []),
        # version 2: report.html with plots beside report.md; 3: reads its inputs' folders only
        Stage(REPORT, report_stage, inputs=(TEACHER, *preflight, GENERATE, *cache, *trained, EXPORT, *onnx,
                                            TEACHER_GGUF, BENCH, EVAL, *route),
              sections=("name", "teacher"), version=3),
    ]
