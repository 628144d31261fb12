"""Latency and memory of GGUF artifacts in llama.cpp: the bench stage and `edgedistill bench`.

    edgedistill bench runs/sentiment/export/student-q4_k_m.gguf --json bench.json

Each artifact is measured by edgedistill.bench.worker in a fresh process, one after the other,
so artifacts never share a process's memory or compete for the cores.
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
from edgedistill.runtimes import gguf_artifacts
from edgedistill.runtimes.llamacpp import check_gguf


def bench_gguf(path: Path, cfg: BenchConfig) -> dict:
    check_gguf(path)
    threads = cfg.threads or os.cpu_count() or 1
    command = [sys.executable, "-m", "edgedistill.bench.worker", str(path), "--prompt-tokens", str(cfg.prompt_tokens),
               "--gen-tokens", str(cfg.gen_tokens), "--repetitions", str(cfg.repetitions), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise EdgedistillError(f"llama.cpp failed on {path} (exit {done.returncode}): {done.stderr.strip()[-800:]}",
                               "check that the file loads with `edgedistill chat FILE`")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"artifact": path.name, "path": str(path), "file_mb": round(path.stat().st_size / 1e6, 2), **result}


def bench_many(paths: list[Path], cfg: BenchConfig) -> list[dict]:
    return [bench_gguf(path, cfg) for path in tqdm(paths, desc="bench", unit="model")]


def bench_stage(recipe: Recipe, out: Path, *, teacher_gguf: Path, export: Path) -> dict:
    results = bench_many(gguf_artifacts(teacher_gguf, export), recipe.bench)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    return {"artifacts": len(results)}
