"""Latency and memory of GGUF files in llama.cpp, ONNX exports in ONNX Runtime (GenAI) and HF folders
in PyTorch: the bench stage and `edgedistill bench`.

    edgedistill bench runs/sentiment/export/student-q4_k_m.gguf student-int4/ --json bench.json
    edgedistill bench runs/sentiment/teacher --device cuda --dtype bf16

Each artifact is measured in a fresh process (edgedistill.bench.worker for GGUF,
`python -m edgedistill.runtimes.onnx FOLDER --bench` for ONNX, edgedistill.bench.torch_worker for HF
folders), one after the other, so artifacts never share a process's memory or compete for the
cores; all print the same JSON fields. GGUF and ONNX run on the CPU; `device` and `dtype` apply to
HF folders. Every row also holds the decode speed's memory-bandwidth bound: the device's read
bandwidth (measured once per call, edgedistill.bench.bandwidth) over the bytes the model reads per
token (edgedistill.bench.model_bytes), and the share of it the runtime reaches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from edgedistill.bench.bandwidth import measure_bandwidth
from edgedistill.bench.model_bytes import gguf_bytes_per_token, onnx_bytes_per_token
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import BenchConfig, Recipe
from edgedistill.runtimes import artifact_kind, gguf_artifacts
from edgedistill.runtimes.llamacpp import check_gguf
from edgedistill.runtimes.onnx import check_onnx_folder, onnx_artifacts
from edgedistill.targets import any_failed, check_target, format_target_checks, recipe_target


def _command(path: Path, kind: str, cfg: BenchConfig, threads: int, device: str, dtype: str) -> list[str]:
    common = ["--prompt-tokens", str(cfg.prompt_tokens), "--gen-tokens", str(cfg.gen_tokens),
              "--repetitions", str(cfg.repetitions), "--threads", str(threads)]
    if kind == "gguf":
        return [sys.executable, "-m", "edgedistill.bench.worker", str(path), *common]
    if kind == "onnx":
        return [sys.executable, "-m", "edgedistill.runtimes.onnx", str(path), "--bench", *common]
    return [sys.executable, "-m", "edgedistill.bench.torch_worker", str(path), *common, "--device", device,
            "--dtype", dtype]


def with_bound(result: dict, bandwidth: dict, bytes_per_token: int) -> dict:
    """`result` with the bandwidth bound of its decode speed and the share of it reached."""
    bound = bandwidth["bandwidth_gb_s"] * 1e9 / bytes_per_token
    return {**result, **bandwidth, "bytes_per_token": bytes_per_token,
            "bandwidth_bound_tokens_per_s": round(bound, 1),
            "bandwidth_efficiency": round(result["decode_tokens_per_s"] / bound, 3)}


def bench_artifact(path: Path, cfg: BenchConfig, *, device: str = "cpu", dtype: str = "fp32",
                   bandwidth: dict | None = None) -> dict:
    """Speed and memory of one GGUF file, ONNX export folder or HF folder, measured in a process of
    its own, with its bandwidth bound (`bandwidth`: measure_bandwidth's result, measured if None)."""
    kind = artifact_kind(path)
    if kind == "gguf":
        check_gguf(path)
        runtime, size, bytes_per_token = "llama.cpp", path.stat().st_size, gguf_bytes_per_token(path)
    elif kind == "onnx":
        check_onnx_folder(path)
        runtime, bytes_per_token = "ONNX Runtime", onnx_bytes_per_token(path)
        size = sum(p.stat().st_size for p in path.glob("model.onnx*"))
    else:
        runtime, size, bytes_per_token = "PyTorch", sum(p.stat().st_size for p in path.glob("*.safetensors")), None
    if kind != "hf" and device != "cpu":
        raise EdgedistillError(f"{path} is measured on the CPU only ({runtime} here runs on the CPU)",
                               "bench GGUF files and ONNX exports without --device cuda; --device applies to HF folders")
    threads = cfg.threads or os.cpu_count() or 1
    done = subprocess.run(_command(path, kind, cfg, threads, device, dtype), capture_output=True, text=True)
    if done.returncode != 0:
        raise EdgedistillError(f"{runtime} failed on {path} (exit {done.returncode}): {done.stderr.strip()[-800:]}",
                               "check that the model loads with `edgedistill chat MODEL`")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    bytes_per_token = result.pop("bytes_per_token", bytes_per_token)
    bandwidth = bandwidth or measure_bandwidth(device, threads=threads)
    # a folder's name ends in "/", as in eval's results, so the report can join the two
    name = path.name + ("/" if kind != "gguf" else "")
    return {"artifact": name, "path": str(path), "file_mb": round(size / 1e6, 2),
            **with_bound(result, bandwidth, bytes_per_token)}


def bench_many(paths: list[Path], cfg: BenchConfig, *, device: str = "cpu", dtype: str = "fp32") -> list[dict]:
    """Every artifact in turn, against one bandwidth measurement of `device` made first."""
    if device != "cpu":
        from edgedistill.runtimes.torch_decode import require_device

        require_device(device)
        on_cpu = [str(p) for p in paths if artifact_kind(p) != "hf"]
        if on_cpu:
            raise EdgedistillError(f"--device {device} applies to HF folders; {', '.join(on_cpu)} run on the CPU only",
                                   "bench GGUF files and ONNX exports in a separate call without --device")
    bandwidth = measure_bandwidth(device, threads=cfg.threads or os.cpu_count() or 1)
    return [bench_artifact(path, cfg, device=device, dtype=dtype, bandwidth=bandwidth)
            for path in tqdm(paths, desc="bench", unit="model")]


def bench_stage(recipe: Recipe, out: Path, *, teacher_gguf: Path, export: Path, export_onnx: Path | None = None) -> dict:
    artifacts = gguf_artifacts(teacher_gguf, export) + (onnx_artifacts(export_onnx) if export_onnx else [])
    target = recipe_target(recipe)
    results = bench_many(artifacts, recipe.bench)
    if target is not None:
        # as `edgedistill bench --target` writes it; quality is checked in the report, after eval
        for row in results:
            row["target"] = {"name": target.name, "checks": check_target(target, row)}
        print(format_target_checks(target, [(r["artifact"], r["target"]["checks"]) for r in results]))
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    failed = [r["artifact"] for r in results if target is not None and any_failed(r["target"]["checks"])]
    return {"artifacts": len(results), **({"target": target.name, "target_failed": failed} if target else {})}
