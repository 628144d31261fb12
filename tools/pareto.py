"""Pareto front of a recipe's student shapes: share of the teacher's task score against decode speed.

    .venv/bin/python tools/pareto.py --recipe recipes/default.yaml --base runs/sentiment --out runs/pareto
    .venv/bin/python tools/pareto.py --recipe recipes/default.yaml --base runs/sentiment --out runs/pareto \
        --shapes 10x576x1536 8x384x1024 6x320x1024 8x256x1024 8x256x1024@8

A shape is BLOCKSxHIDDENxMLP[@EPOCHS]: the recipe's student with student.keep_layers BLOCKS (chosen
as the recipe's layer_selection says) and, where narrower than the teacher, student.width.hidden_size
HIDDEN and student.width.intermediate_size MLP; with @EPOCHS, distill.epochs EPOCHS instead of the
recipe's (a narrow stream has more to recover). Each shape runs through the pipeline up to its export
stage in OUT/<shape>/ (ONNX left out; stages whose cache key matches the base run's are hard-linked
from it, tools/ablation.py's link_shared), then
- its Q4_K_M answers the base run's held-out prompts greedily in llama.cpp (the eval stage's task
  score, its share of the teacher's PyTorch score with a paired 95% bootstrap interval for label
  tasks, and of the teacher's Q4_K_M score; both teacher scores from BASE/eval/eval.json, or, before
  the base run has them, scored here once into OUT/teacher.json);
- the teacher's Q4_K_M (BASE/teacher_gguf, or exported into OUT/teacher_gguf) and the student's are benched one right after the other
  in llama.cpp (edgedistill.bench, the recipe's bench: settings, same threads, --threads to set
  them), --rounds times in turn: the decode speed ratio is the median of the rounds' ratios, each
  taken within one round, with the load average before and after.
A shape's result is saved as soon as it is done (OUT/shapes/<shape>.json): a rerun does only the
missing ones. Writes OUT/pareto.json, OUT/pareto.md and OUT/pareto.svg (share vs speed ratio, the
front marked). On a shared machine speeds are noisy: compare the ratios, and read the load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from ablation import _percent, _with, block_parameters, link_shared, paired_share  # noqa: E402

from edgedistill.bench.latency import bench_many  # noqa: E402
from edgedistill.evaluate.task import load_heldout, task_score, task_scorers  # noqa: E402
from edgedistill.export.stage import export_gguf_set  # noqa: E402
from edgedistill.layout import (DISTILL, EVAL, EVAL_JSON, EXPORT, GENERATE, HELDOUT_JSONL, LOGITS,  # noqa: E402
                                STUDENT, TEACHER, TEACHER_GGUF, gguf_name)
from edgedistill.pipeline import Pipeline, is_complete  # noqa: E402
from edgedistill.recipe import Recipe, load_recipe  # noqa: E402
from edgedistill.records import read_eval  # noqa: E402
from edgedistill.report.data import pareto_front  # noqa: E402
from edgedistill.stages import stages_for  # noqa: E402

QTYPE = "Q4_K_M"
# the target (issue 16): at least 5x the teacher's Q4_K_M decode speed at 90% of its score
TARGET_SPEED_RATIO, TARGET_SHARE = 5.0, 0.90
DEFAULT_SHAPES = ("10x576x1536", "8x384x1024", "6x320x1024", "8x256x1024")
STAGES = (TEACHER, GENERATE, LOGITS, STUDENT, DISTILL, EXPORT)


@dataclass(frozen=True)
class Shape:
    blocks: int
    hidden_size: int
    intermediate_size: int
    epochs: int | None = None  # distill.epochs; None: the recipe's

    @property
    def name(self) -> str:
        epochs = f"-e{self.epochs}" if self.epochs is not None else ""
        return f"{self.blocks}x{self.hidden_size}x{self.intermediate_size}{epochs}"


def parse_shape(text: str) -> Shape:
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:@(\d+))?", text)
    if match is None or match[4] == "0":
        raise SystemExit(f"shape {text!r}: write BLOCKSxHIDDENxMLP or BLOCKSxHIDDENxMLP@EPOCHS, e.g. 8x384x1024@8")
    blocks, hidden, mlp, epochs = match.groups()
    return Shape(int(blocks), int(hidden), int(mlp), int(epochs) if epochs else None)


def shape_recipe(recipe: Recipe, shape: Shape, teacher_config: dict) -> Recipe:
    """The recipe with the student of `shape`; a width as wide as the teacher's is left out, so a shape
    equal to the recipe's own student has the base run's cache keys. No ONNX export: the front is
    drawn from the Q4_K_M GGUFs (a quant-aware recipe keeps its GGUF grids only)."""
    width = dict((recipe.student.width.model_dump() if recipe.student.width else {}))
    for key, value in (("hidden_size", shape.hidden_size), ("intermediate_size", shape.intermediate_size)):
        if value > teacher_config[key]:
            raise SystemExit(f"shape {shape.name}: {key} {value} is wider than the teacher's {teacher_config[key]}")
        if value < teacher_config[key]:
            width[key] = value
    width = {k: v for k, v in width.items() if v is not None}
    quants = list(dict.fromkeys([*recipe.export.quants, QTYPE]))
    distill = {"epochs": shape.epochs} if shape.epochs is not None else {}
    quant_aware = recipe.distill.quant_aware
    if quant_aware is not None and quant_aware.grids is not None:
        # the ONNX grids go with the ONNX export; a quant-aware recipe trains for its GGUF grids
        kept = [grid for grid in quant_aware.grids if grid in quants]
        distill["quant_aware"] = {**quant_aware.model_dump(), "grids": kept} if kept else None
    return _with(recipe, student={"keep_layers": shape.blocks, "width": width or None},
                 export={"quants": quants, "onnx": []}, **({"distill": distill} if distill else {}))


def with_front(rows: list[dict]) -> list[dict]:
    """`rows` (share_of_teacher, speed_ratio) each marked on_front: no other row is at least as good
    in both and better in one. A row without both values is never on it and does not count."""
    measured = [r for r in rows if r.get("share_of_teacher") is not None and r.get("speed_ratio") is not None]
    front = pareto_front([(r["share_of_teacher"], r["speed_ratio"]) for r in measured])
    on_front = {id(r) for r, keep in zip(measured, front) if keep}
    return [{**r, "on_front": id(r) in on_front} for r in rows]


def pending(shapes: list[Shape], results: Path) -> list[Shape]:
    """The shapes without a saved result in `results` (OUT/shapes): what a rerun still has to do."""
    return [s for s in shapes if not (results / f"{s.name}.json").is_file()]


def load_results(shapes: list[Shape], results: Path) -> list[dict]:
    """The saved results of `shapes`, in their order; shapes not done yet are left out."""
    return [json.loads((results / f"{s.name}.json").read_text()) for s in shapes
            if (results / f"{s.name}.json").is_file()]


def _share(student_answers: list[dict], teacher_answers: list[dict]) -> list[float] | None:
    """The paired bootstrap interval of the student's share of the teacher's score (label tasks only)."""
    share = paired_share(student_answers, teacher_answers)
    return None if share is None or share.low is None else [round(share.low, 4), round(share.high, 4)]


def _manifest_result(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text()).get("result", {})


def _seconds(run: Path) -> dict:
    return {name: json.loads((run / name / "manifest.json").read_text())["seconds"]
            for name in (STUDENT, DISTILL, EXPORT) if is_complete(run / name)}


def run_shape(shape: Shape, recipe: Recipe, base: Path, out: Path, reference: dict, rounds: int) -> dict:
    """One shape through the pipeline to its export, its Q4_K_M scored and benched beside the teacher's."""
    run = out / shape.name
    link_shared(base, run)
    stages = [s for s in stages_for(recipe) if s.name in STAGES]
    Pipeline(stages, recipe, run).run()
    student_file = run / EXPORT / gguf_name("student", QTYPE)
    row = _scored(student_file, recipe, base)
    load_before = os.getloadavg()
    rows = bench_many([reference["teacher_file"], student_file] * rounds, recipe.bench)
    load_after = os.getloadavg()
    pairs = list(zip(rows[0::2], rows[1::2]))
    ratios = [s.decode_tokens_per_s / t.decode_tokens_per_s for t, s in pairs]
    teacher_bench, student_bench = pairs[0]
    student = _manifest_result(run / STUDENT)
    return {
        "shape": shape.name, "blocks": shape.blocks, "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size, "distill_epochs": recipe.distill.epochs,
        "kept_layers": student.get("kept_layers"), "width": student.get("width"),
        "student_parameters": student.get("student_parameters"), "parameter_ratio": student.get("parameter_ratio"),
        "block_parameters": block_parameters(run / DISTILL),
        "task_score": row.task_score, "task_score_interval": row.task_score_interval, "correct": row.correct,
        "examples": row.examples,
        "share_of_teacher": round(row.task_score / reference["task_score"], 4) if reference["task_score"] else None,
        "share_of_teacher_interval": _share(row.answers, reference["answers"]),
        "share_of_teacher_q4_k_m": (round(row.task_score / reference["q4_task_score"], 4)
                                    if reference.get("q4_task_score") else None),
        "file_mb": student_bench.file_mb, "bytes_per_token": student_bench.bytes_per_token,
        "decode_tokens_per_s": round(median([s.decode_tokens_per_s for _, s in pairs]), 1),
        "teacher_decode_tokens_per_s": round(median([t.decode_tokens_per_s for t, _ in pairs]), 1),
        "speed_ratio": round(median(ratios), 3), "speed_ratio_per_round": [round(r, 3) for r in ratios],
        "bytes_ratio": round(teacher_bench.bytes_per_token / student_bench.bytes_per_token, 3),
        "threads": student_bench.threads, "prompt_tokens": student_bench.prompt_tokens,
        "gen_tokens": student_bench.gen_tokens, "repetitions": student_bench.repetitions,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "bench": [row.model_dump(exclude_none=True) for row in rows],
        "stage_seconds": _seconds(run),
    }


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def table_lines(summary: dict) -> list[str]:
    teacher = summary["teacher"]
    lines = ["| student (blocks x hidden x MLP) | Q4_K_M MB | task score | share of teacher [95%] | "
             "decode tokens/s (teacher's in the same bench) | speed ratio | front | 1-min load |",
             "|---|---|---|---|---|---|---|---|",
             f"| teacher Q4_K_M (reference) | {teacher['q4_file_mb']} | {_score(teacher['q4_task_score'])} | "
             f"{_percent(teacher['q4_share'])} | – | 1.00x | {'yes' if teacher.get('on_front') else ''} | – |"]
    for r in summary["shapes"]:
        interval = r.get("share_of_teacher_interval")
        low_high = f" [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]" if interval else ""
        lines.append(f"| {r['shape']} | {r['file_mb']} | {_score(r['task_score'])} ({r['correct']}/{r['examples']}) | "
                     f"{_percent(r['share_of_teacher'])}{low_high} | {r['decode_tokens_per_s']:.0f} "
                     f"({r['teacher_decode_tokens_per_s']:.0f}) | {r['speed_ratio']:.2f}x | "
                     f"{'yes' if r['on_front'] else ''} | {r['load_average_before'][0]:.1f}–"
                     f"{r['load_average_after'][0]:.1f} |")
    return lines


def write_plot(summary: dict, path: Path) -> None:
    """Share of the teacher's score against decode speed ratio, the front joined, the target's corner shaded."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.6), layout="constrained")
    ax = fig.subplots()
    teacher = summary["teacher"]
    # a share is None when the teacher scores 0: nothing to place on this plot
    points = [(r["shape"], r["speed_ratio"], 100 * r["share_of_teacher"], r["on_front"]) for r in summary["shapes"]
              if r["share_of_teacher"] is not None]
    if teacher["q4_share"] is not None:
        points.append(("teacher Q4_K_M", 1.0, 100 * teacher["q4_share"], teacher["on_front"]))
    for label, x, y, front in points:
        ax.scatter([x], [y], color="#d62728" if front else "#1f77b4", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = sorted((x, y) for _, x, y, on in points if on)
    if front:
        ax.plot(*zip(*front), color="#d62728", linewidth=1.5, label="Pareto front")
    ax.axvline(TARGET_SPEED_RATIO, color="#7f7f7f", linestyle=":", linewidth=1)
    ax.axhline(100 * TARGET_SHARE, color="#7f7f7f", linestyle=":", linewidth=1,
               label=f"target: {TARGET_SPEED_RATIO:.0f}x at {100 * TARGET_SHARE:.0f}%")
    ax.set_xlabel("decode speed / teacher Q4_K_M's (llama.cpp, same bench)")
    ax.set_ylabel("task score, % of the teacher's (PyTorch)")
    ax.set_title(f"{summary['recipe']}: student shapes at {QTYPE}")
    ax.legend(loc="lower left", fontsize=8)
    with matplotlib.rc_context({"svg.hashsalt": "edgedistill-pareto", "svg.fonttype": "none"}):
        fig.savefig(path, format="svg", metadata={"Date": None})


def _scored(artifact: Path, recipe: Recipe, base: Path):
    heldout_file = base / GENERATE / HELDOUT_JSONL
    heldout = load_heldout(heldout_file)
    row, _ = task_score(artifact, heldout, max_new_tokens=recipe.eval.max_new_tokens,
                        scorers=task_scorers(heldout_file, heldout), name=artifact.name)
    return row


def _reference(recipe: Recipe, base: Path, out: Path) -> dict:
    """The teacher's PyTorch score and answers, its Q4_K_M file and that file's score: from the base run's
    eval and teacher_gguf stages when it has finished them, else made here once and kept in
    OUT/teacher.json (the Q4_K_M exported and verified in OUT/teacher_gguf/ as the teacher_gguf stage
    does, both scored on the held-out prompts as run_shape scores a student)."""
    q4_name = gguf_name("teacher", QTYPE)
    teacher_file = base / TEACHER_GGUF / q4_name
    if is_complete(base / EVAL) and teacher_file.is_file():
        report = read_eval(base / EVAL / EVAL_JSON)
        q4 = next((r for r in report.artifacts if r.artifact == q4_name), None)
        return {"task_score": report.reference.task_score, "answers": report.reference.answers,
                "q4_task_score": q4.task_score if q4 else None, "teacher_file": teacher_file,
                "q4_file_mb": round(teacher_file.stat().st_size / 1e6, 2), "source": str(base / EVAL / EVAL_JSON)}
    saved = out / "teacher.json"
    if not saved.is_file():
        if not (is_complete(base / TEACHER_GGUF) and teacher_file.is_file()):
            (out / TEACHER_GGUF).mkdir(parents=True, exist_ok=True)
            export_gguf_set(base / TEACHER, out / TEACHER_GGUF, "teacher", [QTYPE], f"{recipe.name}-teacher")
            teacher_file = out / TEACHER_GGUF / q4_name
        teacher, q4 = _scored(base / TEACHER, recipe, base), _scored(teacher_file, recipe, base)
        saved.write_text(json.dumps({
            "task_score": teacher.task_score, "answers": teacher.answers, "q4_task_score": q4.task_score,
            "teacher_file": str(teacher_file), "q4_file_mb": round(teacher_file.stat().st_size / 1e6, 2),
            "source": "scored here: the base run had no eval yet"}, indent=2) + "\n")
    reference = json.loads(saved.read_text())
    return {**reference, "teacher_file": Path(reference["teacher_file"])}


def summarize(recipe_path: Path, reference: dict, rows: list[dict]) -> dict:
    q4_share = (round(reference["q4_task_score"] / reference["task_score"], 4)
                if reference.get("q4_task_score") and reference["task_score"] else None)
    teacher_row = {"shape": "teacher Q4_K_M", "share_of_teacher": q4_share, "speed_ratio": 1.0}
    marked = with_front([*rows, teacher_row])
    return {"recipe": str(recipe_path), "qtype": QTYPE,
            "target": {"speed_ratio": TARGET_SPEED_RATIO, "share_of_teacher": TARGET_SHARE},
            "teacher": {"task_score": reference["task_score"], "q4_task_score": reference.get("q4_task_score"),
                        "q4_share": q4_share, "q4_file_mb": reference["q4_file_mb"],
                        "on_front": marked[-1]["on_front"]},
            "shapes": marked[:-1],
            "meeting_target": [r["shape"] for r in rows if r["speed_ratio"] >= TARGET_SPEED_RATIO
                               and r["share_of_teacher"] is not None and r["share_of_teacher"] >= TARGET_SHARE]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "default.yaml")
    parser.add_argument("--base", type=Path, default=ROOT / "runs" / "sentiment", help="a run of --recipe, done at least to its logits stage")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "pareto")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BLOCKSxHIDDENxMLP[@EPOCHS] each")
    parser.add_argument("--threads", type=int, help="llama.cpp threads for both benches (default: bench.threads)")
    parser.add_argument("--rounds", type=int, default=2, help="teacher-then-student bench rounds per shape")
    args = parser.parse_args()
    shapes = [parse_shape(s) for s in args.shapes]
    recipe = load_recipe(args.recipe)
    if args.threads is not None:
        # bench is in no stage's key this tool runs: the trained shapes stay cached
        recipe = _with(recipe, bench={"threads": args.threads})
    if not is_complete(args.base / GENERATE):
        sys.exit(f"{args.base} is not a run of {args.recipe} up to generate: run `edgedistill run "
                 f"{args.recipe} --out {args.base}` first")
    teacher_config = json.loads((args.base / TEACHER / "config.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    reference = _reference(recipe, args.base, args.out)
    results = args.out / "shapes"
    results.mkdir(parents=True, exist_ok=True)
    for shape in pending(shapes, results):
        print(f"[pareto] {shape.name}: blocks {shape.blocks}, hidden {shape.hidden_size}, MLP {shape.intermediate_size}")
        result = run_shape(shape, shape_recipe(recipe, shape, teacher_config), args.base, args.out, reference,
                           args.rounds)
        (results / f"{shape.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"[pareto] {shape.name}: share {_percent(result['share_of_teacher'])}, "
              f"speed {result['speed_ratio']:.2f}x the teacher's {QTYPE}")
    summary = summarize(args.recipe, reference, load_results(shapes, results))
    (args.out / "pareto.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = table_lines(summary)
    (args.out / "pareto.md").write_text("\n".join(lines) + "\n")
    write_plot(summary, args.out / "pareto.svg")
    print("\n".join(lines))
    print(f"plot: {args.out / 'pareto.svg'}")


if __name__ == "__main__":
    main()
