"""GGUF export time and peak RSS against model size, next to a plain read-and-write baseline.

    .venv/bin/python tools/bench_export.py                                   # 0.5 GB and 2 GB of F32 weights
    .venv/bin/python tools/bench_export.py --small-gb 0.05 --large-gb 0.2 --hidden 256 --repeats 1   # a quick check

Builds two random-weight LlamaForCausalLM folders (float32 safetensors, the embedded SmolLM2 tokenizer)
with the same width and vocabulary and different depths, so the largest tensor (the tied embedding)
is the same in both and only the number of layers grows. Each measurement runs in a fresh process:
  export    write_gguf(model, out, overwrite=True), timed around the call
  baseline  read every safetensors byte (streamed) and write as many bytes as the GGUF has, the least
            I/O any exporter needs; no fsync, like write_gguf (GGUFWriter does not sync either)
  imports   import the writer's modules and nothing else: the runtime's RSS floor
Peak RSS is the process's VmHWM. The models are read once before timing so that every timed run
finds them in the page cache, and dirty pages are synced before every run so that none pays for
another's write-back. Each size is measured --repeats times, baseline and export alternating, and
medians are reported; CPU seconds too, which vary less than wall time on a busy machine. Targets
(issue 4): export at most 3x the baseline's time, and the large model's peak RSS at most 1.25x the
small one's (memory holds a tensor, not the model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Workers import only what their measurement needs, so this module's top level stays stdlib-only.
TIME_RATIO_TARGET = 3.0
RSS_RATIO_TARGET = 1.25
CHUNK_BYTES = 64 << 20


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    from edgedistill.bench.worker import peak_rss_kb

    return round(peak_rss_kb() / 1024, 1)


def build_model(out: Path, *, target_bytes: int, hidden: int) -> dict:
    """A random float32 llama folder of about `target_bytes` of weights, written tensor by tensor.

    The safetensors file is written by hand (8-byte header length, JSON header, raw data) so that
    only one tensor is ever in memory; save_pretrained would hold the whole model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgedistill.sources import tokenizer_source

    tokenizer = tokenizer_source("smollm2-135m-instruct")
    heads = max(1, hidden // 64)

    def config(layers: int) -> LlamaConfig:
        return LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=len(tokenizer), hidden_size=hidden,
                           intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=max(1, heads // 4), tie_word_embeddings=True,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)

    def shapes(layers: int) -> dict[str, tuple[int, ...]]:
        # The meta device gives transformers' own names and shapes without allocating; named_parameters
        # lists a tied lm_head once, as the embedding, like save_pretrained.
        with torch.device("meta"):
            return {name: tuple(p.shape) for name, p in LlamaForCausalLM(config(layers)).named_parameters()}

    one, two = (sum(4 * torch.Size(s).numel() for s in shapes(n).values()) for n in (1, 2))
    layers = max(1, round((target_bytes - (2 * one - two)) / (two - one)))
    plan = shapes(layers)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in plan.items():
        nbytes = 4 * torch.Size(shape).numel()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data to 8 bytes

    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for name, shape in plan.items():
            tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
            tensor.numpy().tofile(f)
    config(layers).save_pretrained(out)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    return {"layers": layers, "hidden": hidden, "vocab": len(tokenizer), "model_bytes": offset,
            "largest_tensor_bytes": max(4 * torch.Size(s).numel() for s in plan.values())}


def run_export(model: Path, gguf_file: Path) -> dict:
    from edgedistill.export.gguf import write_gguf

    started, cpu_started = time.perf_counter(), _cpu_s()
    write_gguf(model, gguf_file, overwrite=True)
    seconds, cpu_s = time.perf_counter() - started, _cpu_s() - cpu_started
    gguf_bytes = gguf_file.stat().st_size
    # removed here, untimed: replacing an existing file would time the deletion of the old one too
    gguf_file.unlink()
    return {"seconds": seconds, "cpu_s": cpu_s, "peak_rss_mb": _peak_rss_mb(), "gguf_bytes": gguf_bytes}


def run_baseline(model: Path, out_file: Path, out_bytes: int) -> dict:
    """Stream every safetensors byte in and write `out_bytes` out, in proportion as the input is read."""
    in_files = sorted(model.glob("*.safetensors"))
    in_bytes = sum(p.stat().st_size for p in in_files)
    buffer = bytearray(CHUNK_BYTES)
    read = written = 0
    started, cpu_started = time.perf_counter(), _cpu_s()
    with open(out_file, "wb") as out:
        for path in in_files:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    read += n
                    due = out_bytes * read // in_bytes
                    out.write(memoryview(buffer)[: due - written])
                    written = due
    seconds, cpu_s = time.perf_counter() - started, _cpu_s() - cpu_started
    out_file.unlink()
    return {"seconds": seconds, "cpu_s": cpu_s, "peak_rss_mb": _peak_rss_mb(), "bytes_read": read,
            "bytes_written": written}


def run_imports() -> dict:
    import edgedistill.export.gguf.writer  # noqa: F401  (the import is the measurement)

    return {"peak_rss_mb": _peak_rss_mb()}


def _worker(*args: str) -> dict:
    # Flush other runs' dirty pages first, so that no measurement pays for an earlier one's write-back.
    os.sync()
    done = subprocess.run([sys.executable, __file__, "--worker", *args], stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"[bench] worker {args[0]} failed with exit status {done.returncode} (its error is above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_size(label: str, model: Path, info: dict, work: Path, repeats: int) -> dict:
    gguf_file = work / f"{label}.gguf"
    exports, baselines = [], []
    # Untimed: reads the model into the page cache and learns the GGUF's size for the baseline.
    gguf_bytes = _worker("export", str(model), str(gguf_file))["gguf_bytes"]
    for i in range(repeats):
        print(f"[bench] {label}: repeat {i + 1}/{repeats}", file=sys.stderr)
        baselines.append(_worker("baseline", str(model), str(work / f"{label}.copy"), str(gguf_bytes)))
        exports.append(_worker("export", str(model), str(gguf_file)))
    export_s = statistics.median(r["seconds"] for r in exports)
    baseline_s = statistics.median(r["seconds"] for r in baselines)
    return {"label": label, **info, "gguf_bytes": gguf_bytes,
            "export_s": [round(r["seconds"], 3) for r in exports], "export_s_median": round(export_s, 3),
            "baseline_s": [round(r["seconds"], 3) for r in baselines], "baseline_s_median": round(baseline_s, 3),
            "export_over_baseline": round(export_s / baseline_s, 2),
            # CPU seconds (this process's threads) are less disturbed by other work on the machine
            "export_cpu_s_median": round(statistics.median(r["cpu_s"] for r in exports), 3),
            "baseline_cpu_s_median": round(statistics.median(r["cpu_s"] for r in baselines), 3),
            "export_peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in exports), 1),
            "baseline_peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in baselines), 1)}


def print_table(report: dict) -> None:
    print("| model | layers | F32 weights MB | largest tensor MB | export s | baseline s | export/baseline "
          "| export CPU s | baseline CPU s | export peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["sizes"]:
        print(f"| {r['label']} | {r['layers']} | {r['model_bytes'] / 1e6:.0f} | {r['largest_tensor_bytes'] / 1e6:.0f} "
              f"| {r['export_s_median']:.2f} | {r['baseline_s_median']:.2f} | {r['export_over_baseline']:.2f} "
              f"| {r['export_cpu_s_median']:.2f} | {r['baseline_cpu_s_median']:.2f} | {r['export_peak_rss_mb']:.0f} |")
    print(f"\nimports alone: {report['imports_peak_rss_mb']:.0f} MB peak RSS; load average (1 min) "
          f"{report['load_average_1m'][0]:.1f} at start, {report['load_average_1m'][1]:.1f} at end on "
          f"{report['cpu_count']} cores")
    for name, target in report["targets"].items():
        print(f"{name}: {target['value']} (target {target['rule']}) {'pass' if target['met'] else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-gb", type=float, default=0.5, help="F32 weight bytes of the small model, in GB")
    parser.add_argument("--large-gb", type=float, default=2.0, help="F32 weight bytes of the large model, in GB")
    parser.add_argument("--hidden", type=int, default=1024,
                        help="hidden size of both models (MLP 4x, 64-wide heads, 4 query heads per KV head)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs/bench"),
                        help="a temporary folder for the models and files is made in it and removed")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/export.json"))
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        runs = {"export": lambda m, g: run_export(Path(m), Path(g)),
                "baseline": lambda m, o, n: run_baseline(Path(m), Path(o), int(n)),
                "imports": run_imports}
        print(json.dumps(runs[kind](*rest)))
        return

    load_before = os.getloadavg()[0]
    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="export-bench-", dir=args.work))
    try:
        sizes = []
        for label, gb in (("small", args.small_gb), ("large", args.large_gb)):
            print(f"[bench] building the {label} model ({gb} GB of F32 weights) in {work}", file=sys.stderr)
            info = build_model(work / label, target_bytes=int(gb * 1e9), hidden=args.hidden)
            sizes.append(measure_size(label, work / label, info, work, args.repeats))
            shutil.rmtree(work / label)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = sizes
    time_ratio = max(r["export_over_baseline"] for r in sizes)
    rss_ratio = round(large["export_peak_rss_mb"] / small["export_peak_rss_mb"], 3)
    report = {
        # a load above the core count means other work shared the cores: times are then high and noisy
        "cpu_count": os.cpu_count(), "load_average_1m": [load_before, os.getloadavg()[0]],
        "repeats": args.repeats, "sizes": sizes, "imports_peak_rss_mb": _worker("imports")["peak_rss_mb"],
        "peak_rss_large_over_small": rss_ratio,
        "targets": {
            "export time / baseline time (worse size)": {"value": time_ratio, "rule": f"<= {TIME_RATIO_TARGET}",
                                                          "met": time_ratio <= TIME_RATIO_TARGET},
            "peak RSS large / small": {"value": rss_ratio, "rule": f"<= {RSS_RATIO_TARGET}",
                                       "met": rss_ratio <= RSS_RATIO_TARGET},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
