"""Does `edgedistill run` train on CUDA? Runs tools/gpu/tiny-cuda.yaml up to distill on the GPU, then the
same distill stage on the CPU (CUDA hidden, same teacher/generate/logits/student folders), and
writes one JSON comparing the two.

    PYTHONPATH=. python3 tools/gpu/check_cuda.py --runs /tmp/cuda-check-runs    # prints the JSON

Without a GPU it still runs both (twice on the CPU) and reports "cuda_available": false, "ok": false.
Exit status: 0 when the distill stage trained on CUDA and the CPU run did not, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RECIPE = Path(__file__).resolve().parent / "tiny-cuda.yaml"
PACKAGES = ("torch", "transformers", "tokenizers", "huggingface-hub", "accelerate", "peft", "pydantic",
            "safetensors", "gguf", "numpy")


def _versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _distill_summary(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "distill" / "manifest.json").read_text())
    result = manifest.get("result", {})
    return {"distill_seconds": manifest["seconds"], "epochs": result.get("epochs"),
            "steps": result.get("steps"), "train_examples": result.get("train_examples")}


def _pipeline(recipe_path: Path, run_dir: Path):
    from edgedistill.pipeline import Pipeline
    from edgedistill.recipe import load_recipe
    from edgedistill.stages import stages_for

    recipe = load_recipe(recipe_path)
    return Pipeline(stages_for(recipe), recipe, run_dir)


def run_here(recipe_path: Path, run_dir: Path) -> dict:
    """Runs up to student, then distill alone with the CUDA peak-memory counter reset in between."""
    import torch

    cuda = torch.cuda.is_available()
    pipeline = _pipeline(recipe_path, run_dir)
    pipeline.run(to_stage="student")
    peak_before_distill = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ran = [r.name for r in pipeline.run(to_stage="distill") if not r.cached]
    peak_distill = torch.cuda.max_memory_allocated() if cuda else 0
    return {
        "cuda_available": cuda,
        "stages_run_for_distill": ran,
        # Only training moves tensors to the GPU; earlier stages should leave this at 0.
        "cuda_peak_bytes_before_distill": peak_before_distill,
        "cuda_peak_bytes_distill": peak_distill,
        "distill_on_cuda": cuda and peak_distill > 0,
        **_distill_summary(run_dir),
    }


def run_cpu_copy(recipe_path: Path, cuda_run: Path, cpu_run: Path) -> dict:
    """The same distill stage in a child process that cannot see the GPU, on copies of the inputs."""
    if cpu_run.exists():
        shutil.rmtree(cpu_run)
    shutil.copytree(cuda_run, cpu_run, ignore=shutil.ignore_patterns("distill", ".partial", "report.md"))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, "--child", "--recipe", str(recipe_path), "--runs", str(cpu_run)],
                           env=env, stdout=subprocess.PIPE, text=True)
    if child.returncode != 0:
        return {"error": f"CPU child exited with {child.returncode}", "wall_seconds": round(time.perf_counter() - started, 1)}
    return {**json.loads(child.stdout.strip().splitlines()[-1]), "wall_seconds": round(time.perf_counter() - started, 1)}


def _max_loss_gap(a: list[dict] | None, b: list[dict] | None) -> float | None:
    if not a or not b or len(a) != len(b):
        return None
    return round(max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("loss", "ce", "kl")), 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/cuda-check-runs"), help="folder for the run folders")
    parser.add_argument("--json", type=Path, help="write the JSON here instead of printing it")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        # stdout carries only the JSON line; the pipeline's log goes to stderr.
        sys.stdout, real_stdout = sys.stderr, sys.stdout
        summary = run_here(args.recipe, args.runs)
        print(json.dumps(summary), file=real_stdout, flush=True)
        return 0

    started = time.perf_counter()
    import torch

    report: dict = {
        "versions": _versions(),
        "python": sys.version.split()[0],
        "cuda_available": torch.cuda.is_available(),
        "cuda_device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_cuda_build": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    if not report["cuda_available"]:
        report["note"] = "torch sees no CUDA device: both runs below are CPU runs"
    if args.runs.exists():
        shutil.rmtree(args.runs)
    cuda_run, cpu_run = args.runs / "cuda", args.runs / "cpu"
    try:
        report["cuda_run"] = run_here(args.recipe, cuda_run)
    except Exception as error:  # the JSON should still say how far it got
        report["cuda_run"] = {"error": f"{type(error).__name__}: {error}"}
    if "error" not in report["cuda_run"]:
        report["cpu_run"] = run_cpu_copy(args.recipe, cuda_run, cpu_run)
        report["max_epoch_loss_gap_cuda_vs_cpu"] = _max_loss_gap(report["cuda_run"].get("epochs"),
                                                                  report["cpu_run"].get("epochs"))
    cpu = report.get("cpu_run", {})
    report["ok"] = bool(report["cuda_run"].get("distill_on_cuda") and "error" not in cpu
                        and cpu.get("stages_run_for_distill") == ["distill"] and not cpu.get("cuda_available"))
    report["total_seconds"] = round(time.perf_counter() - started, 1)

    return emit(report, args.json)


def emit(report: dict, json_path: Path | None) -> int:
    """Print the report (or write it to `json_path`) as JSON; the exit status says whether it is ok."""
    text = json.dumps(report, indent=2)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    else:
        print(text, flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
