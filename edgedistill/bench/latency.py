"""Latency and memory of GGUF files in llama.cpp, ONNX exports in ONNX Runtime (GenAI) and HF folders
in PyTorch: the bench stage and `edgedistill bench`.

    edgedistill bench runs/sentiment/export/student-q4_k_m.gguf student-int4/ --json bench.json
    edgedistill bench runs/sentiment/teacher --device cuda --dtype bf16
    edgedistill bench student-q4_k_m.gguf student-int4/ --device cuda   # llama.cpp / ONNX Runtime CUDA builds

Each artifact is measured in a fresh process (edgedistill.bench.worker for GGUF,
edgedistill.bench.onnx_worker for ONNX, edgedistill.bench.torch_worker for HF folders), one after the other, so artifacts never share a process's memory or compete for the
cores; all print the same JSON fields. `device` applies to every artifact (on "cuda": llama.cpp with
every layer offloaded, ONNX Runtime's CUDA provider, PyTorch; a GPU row's "device" names the GPU and,
for GGUF and ONNX, "provider" what ran it), `dtype` to HF folders. Every row also holds the decode
speed's memory-bandwidth bound: the device's read bandwidth (measured once per call,
edgedistill.bench.bandwidth) over the bytes the model reads per token (edgedistill.bench.model_bytes),
and the share of it the runtime reaches; a GPU's bandwidth is measured with torch, so without a CUDA
build of torch GPU rows carry no bound. The rows are
edgedistill.records.BenchRow, bench.json's; `format_bench_table` is what `edgedistill bench` prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from edgedistill import layout
from edgedistill.bench.bandwidth import measure_bandwidth
from edgedistill.bench.model_bytes import gguf_bytes_per_token, onnx_bytes_per_token
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import BenchConfig, Recipe, recipe_target
from edgedistill.records import BenchRow, EvalRow, TargetResult, bench_json, read_eval
from edgedistill.runtimes import artifact_kind, gguf_artifacts, require_device
from edgedistill.runtimes.llamacpp import check_gguf
from edgedistill.runtimes.onnx import check_onnx_folder, onnx_artifacts
from edgedistill.targets import Target, any_failed, check_target, format_target_checks


def _command(path: Path, kind: str, cfg: BenchConfig, threads: int, device: str, dtype: str) -> list[str]:
    common = ["--prompt-tokens", str(cfg.prompt_tokens), "--gen-tokens", str(cfg.gen_tokens),
              "--repetitions", str(cfg.repetitions), "--threads", str(threads)]
    if kind == "hf":
        return [sys.executable, "-m", "edgedistill.bench.torch_worker", str(path), *common, "--device", device,
                "--dtype", dtype]
    worker = "edgedistill.bench.worker" if kind == "gguf" else "edgedistill.bench.onnx_worker"
    return [sys.executable, "-m", worker, str(path), *common, *(["--device", device] if device != "cpu" else [])]


def with_bound(result: dict, bandwidth: dict, bytes_per_token: int) -> dict:
    """`result` with the bandwidth bound of its decode speed and the share of it reached (none for an
    empty `bandwidth`: not measurable here)."""
    if not bandwidth:
        return {**result, "bytes_per_token": bytes_per_token}
    bound = bandwidth["bandwidth_gb_s"] * 1e9 / bytes_per_token
    return {**result, **bandwidth, "bytes_per_token": bytes_per_token,
            "bandwidth_bound_tokens_per_s": round(bound, 1),
            "bandwidth_efficiency": round(result["decode_tokens_per_s"] / bound, 3)}


def device_bandwidth(device: str, threads: int) -> dict:
    """measure_bandwidth's result for `device`, or {} for a GPU that torch cannot measure (a CPU build
    of torch beside GPU builds of llama.cpp or ONNX Runtime): those rows then carry no bound."""
    if device == "cpu":
        return measure_bandwidth(device, threads=threads)
    try:
        return measure_bandwidth(device)
    except EdgedistillError as exc:
        why = exc.problem.strip().splitlines()[-1]  # the worker's last line, not its traceback
        print(f"bench: no bandwidth bound for the {device} rows ({why})", file=sys.stderr)
        return {}


def bench_artifact(path: Path, cfg: BenchConfig, *, device: str = "cpu", dtype: str = "fp32",
                   bandwidth: dict | None = None) -> BenchRow:
    """Speed and memory of one GGUF file, ONNX export folder or HF folder on `device`, measured in a
    process of its own, with its bandwidth bound (`bandwidth`: device_bandwidth's result, measured if None)."""
    kind = artifact_kind(path)
    if kind == "gguf":
        check_gguf(path)
        runtime, size, bytes_per_token = "llama.cpp", path.stat().st_size, gguf_bytes_per_token(path)
    elif kind == "onnx":
        check_onnx_folder(path)
        runtime, bytes_per_token = "ONNX Runtime", onnx_bytes_per_token(path)
        size = sum(p.stat().st_size for p in path.glob(f"{layout.ONNX_MODEL}*"))
    else:
        runtime, size, bytes_per_token = "PyTorch", sum(p.stat().st_size for p in path.glob("*.safetensors")), None
    require_device(path, device)
    threads = cfg.threads or os.cpu_count() or 1
    done = subprocess.run(_command(path, kind, cfg, threads, device, dtype), capture_output=True, text=True)
    if done.returncode != 0:
        raise EdgedistillError(f"{runtime} failed on {path} (exit {done.returncode}): {done.stderr.strip()[-800:]}",
                               "check that the model loads with `edgedistill chat MODEL`")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    bytes_per_token = result.pop("bytes_per_token", bytes_per_token)
    if bandwidth is None:
        bandwidth = device_bandwidth(device, threads)
    # a folder's name ends in "/", as in eval's results, so the report can join the two
    name = path.name + ("/" if kind != "gguf" else "")
    return BenchRow(artifact=name, path=str(path), file_mb=round(size / 1e6, 2),
                    **with_bound(result, bandwidth, bytes_per_token))


def bench_many(paths: list[Path], cfg: BenchConfig, *, device: str = "cpu", dtype: str = "fp32") -> list[BenchRow]:
    """Every artifact in turn on `device`, against one bandwidth measurement of it made first."""
    for path in paths:
        require_device(path, device)  # every artifact's runtime, before the first measurement
    bandwidth = device_bandwidth(device, cfg.threads or os.cpu_count() or 1)
    return [bench_artifact(path, cfg, device=device, dtype=dtype, bandwidth=bandwidth)
            for path in tqdm(paths, desc="bench", unit="model")]


def read_eval_rows(path: Path) -> dict[str, EvalRow]:
    """The artifact rows of an eval.json by artifact name, for a target's quality budget."""
    if not path.is_file():
        raise EdgedistillError(f"{path} does not exist", "pass the eval.json of `edgedistill eval --json`")
    return {row.artifact: row for row in read_eval(path).artifacts}


def check_rows(target: Target, rows: list[BenchRow], evals: dict[str, EvalRow] | None = None) -> str:
    """Sets each row's `target` to its checks against `target` (quality from `evals`, by artifact:
    without it the quality budget is not measured) and returns the checks' table."""
    for row in rows:
        row.target = TargetResult(name=target.name, checks=check_target(target, row, (evals or {}).get(row.artifact)))
    return format_target_checks(target, [(row.artifact, row.target.checks) for row in rows])


def failed_rows(rows: list[BenchRow]) -> list[str]:
    """The artifacts whose rows fail a budget of their target."""
    return [row.artifact for row in rows if row.target is not None and any_failed(row.target.checks)]


def format_bench_table(rows: list[BenchRow]) -> str:
    """What `edgedistill bench` prints: a line per artifact, then where the bandwidth bound comes from."""
    # decode ± its spread over the repetitions; "bound": what the memory bandwidth allows, "eff": the share reached
    lines = [f"{'artifact':<28} {'device':<6} {'MB':>7} {'prefill t/s':>11} {'decode t/s':>13} {'bound':>7} "
             f"{'eff':>4} {'TTFT ms':>8} {'RSS MB':>7} {'GPU MB':>7}"]
    for r in rows:
        decode = f"{r.decode_tokens_per_s:.1f}±{r.decode_tokens_per_s_spread:.1f}"
        gpu = f"{r.peak_gpu_mb:.0f}" if r.peak_gpu_mb is not None else "-"
        measured = r.bandwidth_bound_tokens_per_s is not None
        bound = f"{r.bandwidth_bound_tokens_per_s:>7.0f}" if measured else f"{'-':>7}"
        efficiency = f"{100 * r.bandwidth_efficiency:>3.0f}%" if measured else f"{'-':>4}"
        lines.append(f"{r.artifact:<28} {r.device.split(':')[0]:<6} {r.file_mb:>7.1f} "
                     f"{r.prefill_tokens_per_s:>11.1f} {decode:>13} {bound} "
                     f"{efficiency} {r.ttft_ms:>8.1f} {r.peak_rss_mb:>7.0f} {gpu:>7}")
    if rows and rows[0].bandwidth_gb_s is not None:
        lines.append(f"bound: {rows[0].bandwidth_gb_s} GB/s ({rows[0].bandwidth_method}) / bytes read per token")
    elif rows:
        lines.append("bound: not measured (a GPU's bandwidth is measured with a CUDA build of torch)")
    return "\n".join(lines)


def bench_stage(recipe: Recipe, out: Path, *, teacher_gguf: Path, export: Path, export_onnx: Path | None = None) -> dict:
    artifacts = gguf_artifacts(teacher_gguf, export) + (onnx_artifacts(export_onnx) if export_onnx else [])
    target = recipe_target(recipe)
    rows = bench_many(artifacts, recipe.bench)
    if target is not None:
        # as `edgedistill bench --target` writes it; quality is checked in the report, after eval
        print(check_rows(target, rows))
    (out / layout.BENCH_JSON).write_text(bench_json(rows))
    return {"artifacts": len(rows), **({"target": target.name, "target_failed": failed_rows(rows)} if target else {})}
