"""Ablation of a recipe: what each ingredient of distillation is worth on its held-out task.

    .venv/bin/python tools/ablation.py --recipe recipes/default.yaml --base runs/sentiment --out runs/ablation

Each variant is the recipe with one thing changed, run through the pipeline up to its trained
student (in OUT/<variant>/; stages it shares with the base run, same cache key, are hard-linked
from there instead of recomputed):

  sft          responses only: cross-entropy on the teacher's answers, no soft labels
  kd           + logit distillation on the teacher's cached top-k (the recipe as it is)
  random_init  kd, but the student has the same shape with random weights instead of pruned ones
  reasoning    kd on distilling-step-by-step data: the teacher's reasoning traces are learned too
  lora         kd, then a LoRA adapter trained on the task data and merged
  progressive  kd through an intermediate model with two thirds of the teacher's blocks
  online       kd with the teacher's forward pass at every step instead of the cached top-k
  on_policy_L_D  kd, then on-policy distillation (distill.on_policy) on a fraction L of the batches
               (0.5 or 1.0) with divergence D (fkl: forward KL, rkl: reverse KL)
  on_policy_L_rkl_t0.5  the same with reverse KL, the student sampling at temperature 0.5
  quant_aware  kd with the exported grids fake-quantized in the last epoch (distill.quant_aware)
  quant_aware_N  the same in the last N epochs, N from 2 to distill.epochs (with two grids taking
               turns, each grid has N/2 epochs' worth of steps)
  quant_aware_N_GRID  the same with one grid (Q4_K_M or onnx-int4) alone: all N epochs' steps on it
  quant_aware_self_N  kd, then N more epochs in which the grids learn the float student's own soft
               labels (distill.quant_aware.soft_labels: float_student, NVIDIA's QAD)
  quant_aware_self_N[_Q4_K_M]_lrR  the same for N = 1 or 2 epochs (Q4_K_M's grid alone) at a
               constant rate R, 1e-5 or 3e-5 (distill.quant_aware.learning_rate)
  on_policy_qa on_policy_0.5_rkl with quant_aware

Every student and the teacher answer the same held-out prompts greedily in PyTorch (fp32), scored
with the task's own scorers (any task kind: --recipe recipes/past-tense.yaml); the table gives
each task score, its share of the teacher's, the student's share of the teacher's
transformer-block parameters and the seconds its training stages took. With --exports every
variant is also exported as the recipe says (GGUF F16 and export.quants, the ONNX of export.onnx)
and each file is scored on the same prompts in its runtime, against the float student (its share
of that student's score, the KL from it on the student's own answers with a 95% interval over
the records) and the teacher (its share, with a 95% paired-bootstrap interval; the KL from the
teacher on the teacher's answers, for the float student too). A variant's result is saved as
soon as it is done (OUT/<variant>.json), so a rerun only does what is missing. Writes
OUT/ablation.json and OUT/ablation.md.

    .venv/bin/python tools/ablation.py --variants kd quant_aware on_policy_0.5_rkl --exports
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pydantic import ValidationError
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgedistill.errors import EdgedistillError  # noqa: E402
from edgedistill.evaluate.intervals import bootstrap_ratio  # noqa: E402
from edgedistill.evaluate.task import evaluate, load_heldout, read_task, task_score, task_scorers  # noqa: E402
from edgedistill.layout import EXPORT, EXPORT_ONNX, FLOAT_STUDENT, HELDOUT_JSONL, ON_POLICY  # noqa: E402
from edgedistill.pipeline import Pipeline, is_complete  # noqa: E402
from edgedistill.recipe import Recipe, load_recipe  # noqa: E402
from edgedistill.records import format_interval  # noqa: E402
from edgedistill.runtimes import gguf_artifacts  # noqa: E402
from edgedistill.runtimes.onnx import onnx_artifacts  # noqa: E402
from edgedistill.stages import stages_for  # noqa: E402

# Linked from the base run; the pipeline keeps a linked stage only where its cache key matches.
SHARED = ("teacher", "generate", "logits", "student", "distill", EXPORT, EXPORT_ONNX)
# The stages whose seconds are a variant's training time.
TRAINING = ("step", "distill", ON_POLICY, "lora", "merge")
# The 4-bit files the recipe ships: Q8_0 is nearly lossless, and a step spent on its grid is one
# not spent on these (quant-aware training takes one grid per step in turn).
QUANT_AWARE = {"grids": ["Q4_K_M", "onnx-int4"]}


def _with(recipe: Recipe, **sections) -> Recipe:
    raw = recipe.model_dump()
    for name, fields in sections.items():
        raw[name] = {**(raw.get(name) or {}), **fields}
    return Recipe.model_validate(raw)


def _if_valid(name: str, title: str, make) -> dict[str, tuple[str, Recipe]]:
    """The variant, or none where the recipe cannot take it (the reason printed): quant-aware
    training refuses what its exports cannot match, such as calibrated int4 ONNX rounding."""
    try:
        return {name: (title, make())}
    except ValidationError as exc:
        print(f"[{name}] left out: {exc.errors()[0]['msg']}")
        return {}


def variants(recipe: Recipe, teacher_layers: int) -> dict[str, tuple[str, Recipe]]:
    blocks = recipe.student.keep_layers
    intermediate = round(teacher_layers * 2 / 3)

    def on_policy(fraction: float, divergence: str, **sampling) -> Recipe:
        return _with(recipe, distill={"on_policy": {"fraction": fraction, "divergence": divergence, **sampling}})

    def quant_aware(**fields):
        """A maker of kd with distill.quant_aware: QUANT_AWARE, with `fields` in its place (for _if_valid)."""
        return lambda: _with(recipe, distill={"quant_aware": {**QUANT_AWARE, **fields}})

    return {
        "sft": ("responses only (cross-entropy on the teacher's answers)", _with(recipe, distill={"kl_weight": 0.0})),
        "kd": ("+ logit distillation (top-k soft labels)", recipe),
        "random_init": ("+ logit distillation, random init instead of pruned",
                        _with(recipe, student={"method": "config", "keep_layers": None, "layer_selection": "even",
                                               "config": {"num_hidden_layers": blocks}})),
        "reasoning": ("+ logit distillation + reasoning traces (step-by-step)",
                      # min_kept 0: measure what the surviving traces give, however few.
                      _with(recipe, generate={"reasoning": True, "max_new_tokens": 96, "min_kept": 0.0})),
        "lora": ("+ logit distillation + LoRA, merged", _with(recipe, lora={})),
        "progressive": ("+ logit distillation through an intermediate (2/3 of the blocks)",
                        _with(recipe, progressive={"steps": [{"keep_layers": intermediate, "epochs": 2}]})),
        "online": ("+ logit distillation, the teacher's forward at every step instead of the cache",
                   _with(recipe, distill={"soft_labels_from": "online"})),
        **{f"on_policy_{fraction}_{short}": (
            f"kd, then on-policy ({long}) on {fraction:.0%} of the batches", on_policy(fraction, divergence))
           for fraction in (0.5, 1.0)
           for short, divergence, long in (("fkl", "forward_kl", "forward KL"), ("rkl", "reverse_kl", "reverse KL"))},
        **{f"on_policy_{fraction}_rkl_t0.5": (
            f"kd, then on-policy (reverse KL) on {fraction:.0%} of the batches, sampled at T=0.5",
            on_policy(fraction, "reverse_kl", temperature=0.5))
           for fraction in (0.5, 1.0)},
        **_if_valid("quant_aware", "kd, the exported grids fake-quantized in the last epoch", quant_aware()),
        **{name: variant for epochs in range(2, recipe.distill.epochs + 1)
           for name, variant in _if_valid(
               f"quant_aware_{epochs}", f"kd, the exported grids fake-quantized in the last {epochs} epochs",
               quant_aware(epochs=epochs)).items()},
        **{name: variant for epochs in range(1, recipe.distill.epochs + 1) for grid in QUANT_AWARE["grids"]
           for name, variant in _if_valid(
               f"quant_aware_{epochs}_{grid}", f"kd, {grid} alone fake-quantized in the last {epochs} epochs",
               quant_aware(grids=[grid], epochs=epochs)).items()},
        # NVIDIA's QAD: the float student, trained as kd's, teaches its own rounded self one more epoch
        **{name: variant for epochs in (1, 2) for name, variant in _if_valid(
            f"quant_aware_self_{epochs}",
            f"kd + {epochs} epoch{'s' * (epochs > 1)} in which the exported grids, fake-quantized, learn the float "
            "student's soft labels",
            lambda epochs=epochs: _with(recipe, distill={
                "epochs": recipe.distill.epochs + epochs,
                "quant_aware": {**QUANT_AWARE, "epochs": epochs, "soft_labels": "float_student"}})).items()},
        # the same at a constant learning rate, both grids or Q4_K_M's alone: Adam moves each weight by
        # about the rate per step, so it sets how many weights can cross a rounding boundary
        **{name: variant for epochs in (1, 2) for rate in ("1e-5", "3e-5")
           for grids, which, who in ((QUANT_AWARE["grids"], "", "the exported grids, fake-quantized, learn"),
                                     (["Q4_K_M"], "_Q4_K_M", "Q4_K_M alone, fake-quantized, learns"))
           for name, variant in _if_valid(
               f"quant_aware_self_{epochs}{which}_lr{rate}",
               f"kd + {epochs} epoch{'s' * (epochs > 1)} in which {who} the float student's soft labels at a "
               f"constant learning rate of {rate}",
               lambda epochs=epochs, grids=grids, rate=rate: _with(recipe, distill={
                   "epochs": recipe.distill.epochs + epochs,
                   "quant_aware": {"grids": grids, "epochs": epochs, "soft_labels": "float_student",
                                   "learning_rate": float(rate)}})).items()},
        **_if_valid("on_policy_qa", "kd, then on-policy (reverse KL, 50%), both quant-aware",
                    lambda: _with(recipe, distill={"quant_aware": QUANT_AWARE,
                                                   "on_policy": {"fraction": 0.5, "divergence": "reverse_kl"}})),
    }


def block_parameters(folder: Path) -> int:
    """Parameters of the transformer blocks (model.layers.*), from the safetensors headers."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if ".layers." in name:
                    total += math.prod(handle.get_slice(name).get_shape())
    return total


def link_shared(base: Path, run: Path) -> None:
    """Hard-links the base run's finished stages into `run`; the pipeline reuses those whose key matches."""
    run.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if is_complete(base / name) and not (run / name).exists():
            subprocess.run(["cp", "-al", str(base / name), str(run / name)], check=True)


def trained_stage(recipe: Recipe) -> str:
    """The stage holding the finished student: what the exports are made from."""
    return "merge" if recipe.lora is not None else ON_POLICY if recipe.distill.on_policy else "distill"


def run_variant(name: str, recipe: Recipe, base: Path, out: Path, *, exports: bool = False) -> Path:
    """Runs the variant up to its trained student (with `exports`: up to its export stages too) and
    returns the student's folder; the seconds of every stage are in its manifest."""
    run = out / name
    link_shared(base, run)
    stages = stages_for(recipe)
    last = trained_stage(recipe)
    names = [s.name for s in stages]
    wanted = stages[:names.index(last) + 1]
    if exports:
        wanted += [s for s in stages if s.name in (EXPORT, EXPORT_ONNX)]
    started = time.perf_counter()
    results = Pipeline(wanted, recipe, run).run()
    seconds = {r.name: round(r.seconds, 1) for r in results if not r.cached}
    print(f"[{name}] done in {time.perf_counter() - started:.0f} s: {seconds}")
    return run / last


def training_seconds(run: Path) -> float:
    """Seconds the variant's training stages took, from their manifests (a stage linked from the
    base run reports the base run's seconds)."""
    total = 0.0
    for manifest in run.glob("*/manifest.json"):
        if manifest.parent.name.startswith(TRAINING):
            total += json.loads(manifest.read_text()).get("seconds") or 0.0
    return round(total, 1)


def paired_share(student_answers: list[dict], teacher_answers: list[dict]):
    """The student's share of the teacher's score on the label answers both gave (matched by id),
    with its paired bootstrap interval; None with fewer than two such examples."""
    def correct(answers):
        return {a["id"]: float(a["predicted"] == a["label"]) for a in answers if "label" in a}

    mine, theirs = correct(student_answers), correct(teacher_answers)
    ids = [i for i in theirs if i in mine]
    return bootstrap_ratio([mine[i] for i in ids], [theirs[i] for i in ids]) if len(ids) >= 2 else None


def exported_files(run: Path) -> list[Path]:
    """The variant's GGUF files and ONNX folders, as its export stages wrote them."""
    return [*gguf_artifacts(run / EXPORT), *onnx_artifacts(run / EXPORT_ONNX)]


def score_exports(student: Path, heldout: Path, teacher: dict, max_new_tokens: int) -> list[dict]:
    """Every exported file of the variant scored on the held-out prompts in its runtime, against
    the float student (the reference: share of its score, KL from it on its own answers; the one
    that taught the fake-quantized epochs where it did, distill/float_student) and the teacher's
    scores on the same prompts (share with a paired interval for label tasks; the ratio of the
    scores for others)."""
    reference = student / FLOAT_STUDENT if (student / FLOAT_STUDENT).is_dir() else student
    report = evaluate(exported_files(student.parent), heldout, reference, max_new_tokens=max_new_tokens)
    rows = []
    for row in report.artifacts:
        share = paired_share(row.answers, teacher["answers"])
        known = share is not None and share.low is not None
        if known:
            share_of_teacher = round(share.mean, 4)
        elif share is None and teacher["task_score"]:
            # open-ended tasks: the ratio of the scores, without an interval
            share_of_teacher = round(row.task_score / teacher["task_score"], 4)
        else:
            share_of_teacher = None
        rows.append({"artifact": row.artifact, "task_score": row.task_score,
                     "share_of_teacher": share_of_teacher,
                     "share_of_teacher_interval": [round(share.low, 4), round(share.high, 4)] if known else None,
                     "share_of_float_student": row.share_of_reference,
                     "share_of_float_student_interval": row.share_of_reference_interval,
                     "kl_to_float_student": row.kl_to_reference,
                     "kl_to_float_student_interval": row.kl_to_reference_interval,
                     "top1_to_float_student": row.top1_agreement,
                     "float_student": str(reference.relative_to(student.parent)),
                     "float_student_task_score": report.reference.task_score})
    return rows


def teacher_kl(student: Path, teacher: Path, heldout: Path, max_new_tokens: int) -> dict[str, float]:
    """The KL from the teacher's next-token distribution on the teacher's own answers, for the float
    student ("student/") and each exported file: the distance distillation trains down, measured on
    what ships. Quantization-aware training pulls the rounded weights towards the teacher, not
    towards the float ones, so the KL to the float student alone does not say whether a file came
    closer to the teacher."""
    report = evaluate([student, *exported_files(student.parent)], heldout, teacher, max_new_tokens=max_new_tokens,
                      names={student: "student/"})
    return {row.artifact: row.kl_to_reference for row in report.artifacts}


def add_teacher_kl(result: dict, student: Path, teacher: Path, heldout: Path, max_new_tokens: int) -> None:
    kl = teacher_kl(student, teacher, heldout, max_new_tokens)
    result["kl_to_teacher"] = kl.get("student/")
    for row in result["exports"]:
        row["kl_to_teacher"] = kl.get(row["artifact"])


def _score(row: dict) -> str:
    """The task score, with the count answered right where the task has labels."""
    counted = f" ({row['correct']}/{row['examples']})" if row.get("correct") is not None else ""
    return f"{row['task_score']:.3f}{counted}"


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.1f}%"


def export_lines(rows: list[dict]) -> list[str]:
    """The exports table: one line per variant and file."""
    lines = ["| variant | file | task score | share of teacher [95%] | share of float student [95%] | "
             "KL to float student [95%] | KL to teacher | training s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for e in r.get("exports") or []:
            of_teacher, of_float = (format_interval(e[key], scale=100, digits=1) for key in
                                    ("share_of_teacher_interval", "share_of_float_student_interval"))
            # a result saved before KL intervals existed has none
            kl = format_interval(e.get("kl_to_float_student_interval"), digits=3, significant=True)
            lines.append(f"| {r['variant']} | {e['artifact']} | {e['task_score']:.3f} | "
                         f"{_percent(e['share_of_teacher'])}{of_teacher} | "
                         f"{_percent(e['share_of_float_student'])}{of_float} | "
                         f"{e['kl_to_float_student']}{kl} | "
                         f"{e.get('kl_to_teacher', '–')} | "
                         f"{r.get('training_seconds', '–')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "default.yaml")
    parser.add_argument("--base", type=Path, default=ROOT / "runs" / "sentiment", help="a finished run of --recipe")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation")
    parser.add_argument("--variants", nargs="*", help="a subset, in this order (default: all)")
    parser.add_argument("--exports", action="store_true",
                        help="also export each variant as the recipe says and score every file in its runtime")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    if not is_complete(args.base / "generate"):
        sys.exit(f"{args.base} is not a finished run of {args.recipe}: run `edgedistill run {args.recipe} --out "
                 f"{args.base}` first")
    teacher_layers = json.loads((args.base / "teacher" / "config.json").read_text())["num_hidden_layers"]
    chosen = variants(recipe, teacher_layers)
    if args.variants:
        unknown = set(args.variants) - set(chosen)
        if unknown:
            sys.exit(f"unknown variants {sorted(unknown)}; choose from {', '.join(chosen)}")
        chosen = {name: chosen[name] for name in args.variants}
    args.out.mkdir(parents=True, exist_ok=True)
    heldout_file = args.base / "generate" / HELDOUT_JSONL
    heldout = load_heldout(heldout_file)
    max_new = recipe.eval.max_new_tokens
    # the task's own scorers (generation and extraction too), as the eval stage scores it
    task, scorers = read_task(heldout_file), task_scorers(heldout_file, heldout)

    def score(model: Path) -> dict:
        return task_score(model, heldout, max_new_tokens=max_new, scorers=scorers, task=task)[0].to_dict()

    reference_file = args.out / "teacher.json"
    if not reference_file.exists():
        reference = score(args.base / "teacher")
        reference["block_parameters"] = block_parameters(args.base / "teacher")
        reference_file.write_text(json.dumps(reference, indent=2) + "\n")
    reference = json.loads(reference_file.read_text())

    for name, (title, variant) in chosen.items():
        result_file = args.out / f"{name}.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        if result is not None and (not args.exports or "exports" in result):
            trained = args.out / name / trained_stage(variant)
            if args.exports and "kl_to_teacher" not in result and trained.is_dir():
                # a result saved before the teacher's KL was measured: only that is added
                add_teacher_kl(result, trained, args.base / "teacher", heldout_file, max_new)
                result_file.write_text(json.dumps(result, indent=2) + "\n")
            continue
        try:
            model = run_variant(name, variant, args.base, args.out, exports=args.exports)
        except EdgedistillError as exc:
            # Not saved: a rerun tries again (after the fix the message names).
            print(f"[{name}] failed: {exc}")
            continue
        if result is None:
            # The held-out prompts are the plain ones for every variant (reasoning is training data only).
            result = score(model)
            result.update(variant=name, title=title, block_parameters=block_parameters(model),
                          distill=json.loads((model.parent / "distill" / "manifest.json").read_text())["result"])
        result["training_seconds"] = training_seconds(model.parent)
        if args.exports:
            result["exports"] = score_exports(model, heldout_file, reference, max_new)
            add_teacher_kl(result, model, args.base / "teacher", heldout_file, max_new)
        result_file.write_text(json.dumps(result, indent=2) + "\n")
        # The run folders are large (a student per stage); the result file is what the table needs.
        shutil.rmtree(model.parent / ".partial", ignore_errors=True)

    rows = []
    for name, (title, _) in variants(recipe, teacher_layers).items():
        if (args.out / f"{name}.json").exists():
            result = json.loads((args.out / f"{name}.json").read_text())
            rows.append({"variant": name, "title": title, "task_score": result["task_score"],
                         "correct": result.get("correct"), "examples": result["examples"],
                         "share_of_teacher": round(result["task_score"] / reference["task_score"], 4)
                         if reference["task_score"] else None,
                         "block_parameter_share": round(result["block_parameters"] / reference["block_parameters"], 4),
                         "train_examples": result["distill"]["train_examples"],
                         "training_seconds": result.get("training_seconds"),
                         **({"kl_to_teacher": result["kl_to_teacher"]} if "kl_to_teacher" in result else {}),
                         **({"exports": result["exports"]} if "exports" in result else {})})
    summary = {"recipe": str(args.recipe), "heldout_examples": len(heldout),
               "teacher": {"task_score": reference["task_score"], "correct": reference.get("correct"),
                           "block_parameters": reference["block_parameters"]}, "variants": rows}
    (args.out / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| variant | what | task score | share of teacher | block params vs teacher | training s |",
             "|---|---|---|---|---|---|",
             f"| teacher | PyTorch fp32, reference | {_score(reference)} | 100% | 100% | |"]
    lines += [f"| {r['variant']} | {r['title']} | {_score(r)} | "
              f"{_percent(r['share_of_teacher'])} | {_percent(r['block_parameter_share'])} | "
              f"{r['training_seconds'] if r['training_seconds'] is not None else '–'} |" for r in rows]
    if any("exports" in r for r in rows):
        lines += ["", *export_lines(rows)]
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
