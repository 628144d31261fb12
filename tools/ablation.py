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

Every student and the teacher answer the same held-out prompts greedily in PyTorch (fp32); the
table gives each task score, its share of the teacher's, and the student's share of the
teacher's transformer-block parameters. A variant's result is saved as soon as it is done
(OUT/<variant>.json), so a rerun only does what is missing. Writes OUT/ablation.json and
OUT/ablation.md.
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

from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgedistill.errors import EdgedistillError  # noqa: E402
from edgedistill.evaluate.task import load_heldout, task_score  # noqa: E402
from edgedistill.pipeline import Pipeline, is_complete  # noqa: E402
from edgedistill.recipe import Recipe, load_recipe  # noqa: E402
from edgedistill.stages import stages_for  # noqa: E402

SHARED = ("teacher", "generate", "logits", "student", "distill")


def _with(recipe: Recipe, **sections) -> Recipe:
    raw = recipe.model_dump()
    for name, fields in sections.items():
        raw[name] = {**(raw.get(name) or {}), **fields}
    return Recipe.model_validate(raw)


def variants(recipe: Recipe, teacher_layers: int) -> dict[str, tuple[str, Recipe]]:
    blocks = recipe.student.keep_layers
    intermediate = round(teacher_layers * 2 / 3)
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


def run_variant(name: str, recipe: Recipe, base: Path, out: Path) -> Path:
    run = out / name
    link_shared(base, run)
    stages = stages_for(recipe)
    last = "merge" if recipe.lora is not None else "distill"
    names = [s.name for s in stages]
    started = time.perf_counter()
    results = Pipeline(stages[:names.index(last) + 1], recipe, run).run()
    seconds = {r.name: round(r.seconds, 1) for r in results if not r.cached}
    print(f"[{name}] trained in {time.perf_counter() - started:.0f} s: {seconds}")
    return run / last


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "default.yaml")
    parser.add_argument("--base", type=Path, default=ROOT / "runs" / "sentiment", help="a finished run of --recipe")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation")
    parser.add_argument("--variants", nargs="*", help="a subset, in this order (default: all)")
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
    heldout = load_heldout(args.base / "generate" / "heldout.jsonl")
    max_new = recipe.eval.max_new_tokens

    reference_file = args.out / "teacher.json"
    if not reference_file.exists():
        reference = task_score(args.base / "teacher", heldout, max_new_tokens=max_new).to_dict()
        reference["block_parameters"] = block_parameters(args.base / "teacher")
        reference_file.write_text(json.dumps(reference, indent=2) + "\n")
    reference = json.loads(reference_file.read_text())

    for name, (title, variant) in chosen.items():
        result_file = args.out / f"{name}.json"
        if result_file.exists():
            continue
        try:
            model = run_variant(name, variant, args.base, args.out)
        except EdgedistillError as exc:
            # Not saved: a rerun tries again (after the fix the message names).
            print(f"[{name}] failed: {exc}")
            continue
        # The held-out prompts are the plain ones for every variant (reasoning is training data only).
        result = task_score(model, heldout, max_new_tokens=max_new).to_dict()
        result.update(variant=name, title=title, block_parameters=block_parameters(model),
                      distill=json.loads((model.parent / "distill" / "manifest.json").read_text())["result"])
        result_file.write_text(json.dumps(result, indent=2) + "\n")
        # The run folders are large (a student per stage); the result file is what the table needs.
        shutil.rmtree(model.parent / ".partial", ignore_errors=True)

    rows = []
    for name, (title, _) in variants(recipe, teacher_layers).items():
        if (args.out / f"{name}.json").exists():
            result = json.loads((args.out / f"{name}.json").read_text())
            rows.append({"variant": name, "title": title, "task_score": result["task_score"],
                         "correct": result["correct"], "examples": result["examples"],
                         "share_of_teacher": round(result["task_score"] / reference["task_score"], 4)
                         if reference["task_score"] else None,
                         "block_parameter_share": round(result["block_parameters"] / reference["block_parameters"], 4),
                         "train_examples": result["distill"]["train_examples"]})
    summary = {"recipe": str(args.recipe), "heldout_examples": len(heldout),
               "teacher": {"task_score": reference["task_score"], "correct": reference["correct"],
                           "block_parameters": reference["block_parameters"]}, "variants": rows}
    (args.out / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| variant | what | task score | share of teacher | block params vs teacher |", "|---|---|---|---|---|",
             f"| teacher | PyTorch fp32, reference | {reference['task_score']:.3f} ({reference['correct']}/"
             f"{len(heldout)}) | 100% | 100% |"]
    lines += [f"| {r['variant']} | {r['title']} | {r['task_score']:.3f} ({r['correct']}/{r['examples']}) | "
              f"{_percent(r['share_of_teacher'])} | {_percent(r['block_parameter_share'])} |" for r in rows]
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
