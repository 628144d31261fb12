"""The task recipes' targets (issue 14): a student with at most a third of the teacher's
transformer-block parameters keeps at least 90% of the teacher's task score at Q4_K_M.

    .venv/bin/python tools/bench_task_recipes.py --runs runs --json runs/task-recipes.json

For each recipe (recipes/past-tense.yaml and recipes/contacts.yaml unless named) this runs
`edgedistill run RECIPE --out RUNS/<name>` (a finished run is only checked, not redone), then reads
the run's eval.json and the teacher's and student's safetensors headers. The JSON holds, per
recipe, one row per model (the teacher, which is the eval's reference, the distilled student in
PyTorch, and every GGUF and ONNX artifact): each scorer's mean with its 95% bootstrap interval,
the task score's share of the teacher's with its paired interval and whether the two differ by less
than the noise, and each scorer's share of the teacher's with its paired interval (the answers in
eval.json rescored with the run's scorers); the teacher's agreement with gold where references are teacher-built; the block
parameter counts; and the two targets, each with the figures it was judged on. The share target is
met by the point estimate; "target_met_at_interval_low" says whether the interval's low end clears
it too, which on 100 held-out examples it seldom can. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from edgedistill.evaluate.intervals import bootstrap_ratio
from edgedistill.evaluate.scorer_base import ScoreInput
from edgedistill.evaluate.scorers import score_all
from edgedistill.evaluate.task import final_answer, load_heldout, read_task, task_scorers

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [ROOT / "recipes" / "past-tense.yaml", ROOT / "recipes" / "contacts.yaml"]
BLOCK_SHARE_TARGET = 1 / 3
SCORE_SHARE_TARGET = 0.9
QUANT = "q4_k_m"  # artifact names carry the quant type in lower case: student-q4_k_m.gguf


def block_parameters(folder: Path) -> int:
    """Parameters in the transformer blocks (model.layers.*) of an HF folder's safetensors files,
    counted from the headers alone: embeddings, the final norm and the head are not blocks."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                if ".layers." in name:
                    count = 1
                    for size in handle.get_slice(name).get_shape():
                        count *= size
                    total += count
    return total


def per_example_scores(run: Path, rows: list[dict]) -> dict[str, dict[str, list]]:
    """Each row's answers rescored with the run's own scorers, per example (eval.json keeps the
    answers and each scorer's mean, not the per-example values a paired share needs)."""
    data = run / "generate" / "heldout.jsonl"
    heldout = {record["id"]: record for record in load_heldout(data)}
    task, scorers = read_task(data), task_scorers(data, list(heldout.values()))
    found = {}
    for row in rows:
        items = [ScoreInput(final_answer(a["answer"], task), heldout[a["id"]].get("reference"), heldout[a["id"]])
                 for a in row.get("answers", [])]
        found[row["artifact"]] = {"ids": [a["id"] for a in row.get("answers", [])],
                                  **{name: result.values for name, result in score_all(scorers, items).items()}}
    return found


def scorer_shares(values: dict[str, list], teacher: dict[str, list]) -> dict[str, dict]:
    """Per scorer, an artifact's mean as a share of the teacher's on the examples both were scored
    on, with its paired 95% bootstrap interval."""
    shares = {}
    position = {example: i for i, example in enumerate(teacher["ids"])}
    for name, column in values.items():
        if name == "ids" or name not in teacher:
            continue
        pairs = [(value, teacher[name][position[example]]) for example, value in zip(values["ids"], column)
                 if example in position and value is not None and teacher[name][position[example]] is not None]
        share = bootstrap_ratio([a for a, _ in pairs], [b for _, b in pairs])
        shares[name] = {"share": None if share.mean is None else round(share.mean, 4),
                        "low": None if share.low is None else round(share.low, 4),
                        "high": None if share.high is None else round(share.high, 4), "n": share.n}
    return shares


def model_row(name: str, row: dict) -> dict:
    return {
        "model": name,
        "task_score": row.get("task_score"),
        "task_score_interval": row.get("task_score_interval"),
        "scores": {scorer: {k: v for k, v in found.items() if k in ("mean", "low", "high", "n", "errors")}
                   for scorer, found in (row.get("scores") or {}).items()},
        "share_of_teacher": row.get("share_of_reference", 1.0 if name == "teacher" else None),
        "share_of_teacher_interval": row.get("share_of_reference_interval"),
        "within_noise_of_teacher": row.get("within_noise_of_reference"),
    }


def summarize(run: Path) -> dict:
    """One recipe's rows and targets from its finished run folder."""
    report = json.loads((run / "eval" / "eval.json").read_text())
    reference = report["reference"]
    rows = [model_row("teacher", reference)] + [model_row(r["artifact"], r) for r in report["artifacts"]]
    values = per_example_scores(run, [reference, *report["artifacts"]])
    for row, source in zip(rows, [reference, *report["artifacts"]]):
        row["scorer_share_of_teacher"] = scorer_shares(values[source["artifact"]], values[reference["artifact"]])
    student_folder = run / ("merge" if (run / "merge").is_dir() else "distill")
    teacher_blocks, student_blocks = block_parameters(run / "teacher"), block_parameters(student_folder)
    quantized = [r for r in rows if QUANT in r["model"].lower() and "teacher" not in r["model"].lower()]
    if not quantized:
        raise SystemExit(f"{run}: eval.json has no student {QUANT} artifact; add {QUANT.upper()} to export.quants")
    q4 = quantized[0]
    share, interval = q4["share_of_teacher"], q4["share_of_teacher_interval"]
    return {
        "run": str(run),
        "held_out_examples": reference.get("examples"),
        "teacher_built_references": report.get("teacher_built_references"),
        "teacher_agreement_with_gold": reference.get("agreement_with_gold") or reference.get("scores"),
        "rows": rows,
        "targets": {
            "block_parameters": {
                "teacher": teacher_blocks, "student": student_blocks,
                "share": round(student_blocks / teacher_blocks, 4), "at_most": round(BLOCK_SHARE_TARGET, 4),
                "target_met": student_blocks <= BLOCK_SHARE_TARGET * teacher_blocks,
            },
            "q4_k_m_share_of_teacher": {
                "artifact": q4["model"], "share": share, "interval": interval, "at_least": SCORE_SHARE_TARGET,
                "target_met": share is not None and share >= SCORE_SHARE_TARGET,
                "target_met_at_interval_low": bool(interval) and interval[0] >= SCORE_SHARE_TARGET,
                # the task score is the first scorer's; the others can tell a different story
                "scorers_below_target": {name: found for name, found in q4["scorer_share_of_teacher"].items()
                                         if found["share"] is not None and found["share"] < SCORE_SHARE_TARGET},
            },
        },
    }


def run_recipe(recipe: Path, out: Path) -> None:
    # a finished run re-checks its stages' files and returns; an interrupted one resumes
    command = [str(Path(sys.executable).parent / "edgedistill"), "run", str(recipe), "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", type=Path, default=RECIPES)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="folder of run folders, one per recipe")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--no-run", action="store_true", help="only read run folders already finished")
    args = parser.parse_args()
    results = {}
    for recipe in args.recipes:
        name = recipe.stem
        out = args.runs / name
        if not args.no_run:
            run_recipe(recipe.resolve(), out.resolve())
        results[name] = summarize(out)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    missed = [f"{name}: {target}" for name, found in results.items()
              for target, value in found["targets"].items() if not value["target_met"]]
    for name, found in results.items():
        blocks, q4 = found["targets"]["block_parameters"], found["targets"]["q4_k_m_share_of_teacher"]
        print(f"{name}: student blocks {blocks['share']:.1%} of the teacher's; {q4['artifact']} keeps "
              f"{q4['share'] if q4['share'] is None else format(q4['share'], '.1%')} of the teacher's score "
              f"(95% interval {q4['interval']})")
        for scorer, share in q4["scorers_below_target"].items():
            print(f"  {scorer}: {share['share']:.1%} [{share['low']:.1%}, {share['high']:.1%}] of the teacher's")
    if missed:
        print("missed: " + "; ".join(missed), file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
