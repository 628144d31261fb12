"""Latency and memory of GGUF files in llama.cpp and ONNX exports in ONNX Runtime GenAI: the bench
stage and `edgedistill bench`.

    edgedistill bench runs/sentiment/export/student-q4_k_m.gguf student-int4/ --json bench.json

Each artifact is measured in a fresh process (edgedistill.bench.worker for GGUF,
`python -m edgedistill.runtimes.onnx FOLDER --bench` for ONNX), one after the other, so artifacts
never share a process's memory or compete for the cores; both print the same JSON fields.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from edgedistill.errors import EdgedistillError
from edgedistill.recipe import BenchConfig, Recipe
from edgedistill.runtimes import artifact_kind, gguf_artifacts
from edgedistill.runtimes.llamacpp import check_gguf
from edgedistill.runtimes.onnx import check_onnx_folder, onnx_artifacts


def bench_artifact(path: Path, cfg: BenchConfig) -> dict:
    """Speed and memory of one GGUF file or ONNX export folder, measured in a process of its own."""
    kind = artifact_kind(path)
    if kind == "gguf":
        check_gguf(path)
        module, runtime, size = ["edgedistill.bench.worker"], "llama.cpp", path.stat().st_size
    elif kind == "onnx":
        check_onnx_folder(path)
        module, runtime = ["edgedistill.runtimes.onnx"], "ONNX Runtime"
        size = sum(p.stat().st_size for p in path.glob("model.onnx*"))
    else:
        raise EdgedistillError(f"{path} is an HF folder", "bench measures GGUF files and ONNX export folders")
    threads = cfg.threads or os.cpu_count() or 1
    command = [sys.executable, "-m", *module, str(path), *(["--bench"] if kind == "onnx" else []),
               "--prompt-tokens", str(cfg.prompt_tokens), "--gen-tokens", str(cfg.gen_tokens),
               "--repetitions", str(cfg.repetitions), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise EdgedistillError(f"{runtime} failed on {path} (exit {done.returncode}): {done.stderr.strip()[-800:]}",
                               "check that the model loads with `edgedistill chat MODEL`")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # a folder's name ends in "/", as in eval's results, so the report can join the two
    name = path.name + ("/" if kind == "onnx" else "")
    return {"artifact": name, "path": str(path), "file_mb": round(size / 1e6, 2), **result}


def bench_many(paths: list[Path], cfg: BenchConfig) -> list[dict]:
    return [bench_artifact(path, cfg) for path in tqdm(paths, desc="bench", unit="model")]


def bench_stage(recipe: Recipe, out: Path, *, teacher_gguf: Path, export: Path, export_onnx: Path | None = None) -> dict:
    artifacts = gguf_artifacts(teacher_gguf, export) + (onnx_artifacts(export_onnx) if export_onnx else [])
    results = bench_many(artifacts, recipe.bench)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    return {"artifacts": len(results)}
