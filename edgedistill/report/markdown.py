"""The report stage: `report.md`, one table of size, speed and quality per artifact, and stage times.

    edgedistill run recipes/tiny.yaml --out runs/tiny && cat runs/tiny/report.md

Every number comes from a JSON file of the run (bench/bench.json, eval/eval.json, the stages'
manifest.json), named under each table, so it can be traced and re-measured with
`edgedistill bench` and `edgedistill eval`.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgedistill.recipe import Recipe


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_report(recipe: Recipe, stages: dict[str, Path]) -> str:
    bench = {row["artifact"]: row for row in json.loads((stages["bench"] / "bench.json").read_text())}
    evaluation = json.loads((stages["eval"] / "eval.json").read_text())
    manifests = {name: json.loads((path / "manifest.json").read_text()) for name, path in stages.items()}
    student = manifests["student"].get("result", {})
    reference = evaluation["reference"]

    lines = [f"# edgedistill report: {recipe.name}", ""]
    lines += [f"Teacher `{recipe.teacher.source}`: {student.get('teacher_parameters', 0) / 1e6:.1f} M parameters; "
              f"student ({student.get('method')}): {student.get('student_parameters', 0) / 1e6:.1f} M parameters "
              f"({100 * student.get('parameter_ratio', 0):.0f}% of the teacher).", ""]
    lines += [f"Held-out task score of the teacher (PyTorch fp32, reference): **{reference['task_score']:.3f}** "
              f"({reference['correct']}/{reference['examples']}).", ""]

    rows = []
    for result in evaluation["artifacts"]:
        speed = bench.get(result["artifact"], {})
        rows.append([f"`{result['artifact']}`", _fmt(speed.get("file_mb")), _fmt(speed.get("decode_tokens_per_s")),
                     _fmt(speed.get("prefill_tokens_per_s")), _fmt(speed.get("ttft_ms")), _fmt(speed.get("peak_rss_mb")),
                     f"{result['task_score']:.3f}", _fmt(100 * result["share_of_reference"]
                                                        if result.get("share_of_reference") is not None else None)])
    lines += ["## Artifacts", ""]
    lines += _table(["artifact", "file MB", "decode tok/s", "prefill tok/s", "TTFT ms", "peak RSS MB",
                     "task score", "% of teacher"], rows)
    any_bench = next(iter(bench.values()), {})
    runtimes = "llama.cpp" + (" (GGUF) and ONNX Runtime GenAI (ONNX folders)"
                              if any(r.get("runtime", "llama.cpp") != "llama.cpp" for r in bench.values()) else "")
    lines += ["", f"Speed: {runtimes}, {any_bench.get('threads')} threads, prompt {any_bench.get('prompt_tokens')} "
              f"tokens, {any_bench.get('gen_tokens')} generated, median of {any_bench.get('repetitions')} "
              f"(from `bench/bench.json`). Quality: greedy answers on {reference['examples']} held-out prompts "
              f"(from `eval/eval.json`).", ""]

    for stage, title in (("distill", "Distillation"), ("lora", "LoRA adapter")):
        history = manifests.get(stage, {}).get("result", {}).get("epochs", [])
        if history:
            lines += [f"## {title}", ""]
            lines += _table(["epoch", "loss", "cross-entropy", "divergence"],
                            [[str(h["epoch"]), _fmt(h["loss"], 4), _fmt(h["ce"], 4), _fmt(h["kl"], 4)] for h in history])
            lines += [""]
    if "merge" in manifests:
        merge = manifests["merge"].get("result", {})
        lines += [f"The adapter was merged into the float32 student; merged vs base + adapter logits differ by at "
                  f"most {merge.get('max_abs_logit_difference', 0):.1e} (tolerance {merge.get('tolerance')}).", ""]

    lines += ["## Stage times", ""]
    lines += _table(["stage", "seconds"], [[name, _fmt(m["seconds"])] for name, m in manifests.items()])
    lines += ["", "Seconds of the run that produced each stage folder (from each `manifest.json`).", ""]
    return "\n".join(lines)


def report_stage(recipe: Recipe, out: Path, **stages: Path) -> dict:
    (out / "report.md").write_text(render_report(recipe, stages))
    return {}
