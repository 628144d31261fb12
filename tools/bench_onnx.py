"""ONNX Runtime next to llama.cpp on one model: speed, memory, size and quality per precision.

    .venv/bin/python tools/bench_onnx.py --calibration runs/sentiment/generate/train.jsonl   # the embedded teacher
    .venv/bin/python tools/bench_onnx.py --model runs/sentiment/distill --out runs/bench/onnx-student.json \
        --calibration runs/sentiment/generate/train.jsonl --task-text runs/sentiment/generate/heldout.jsonl

Exports the HF folder as fp32, int8 and int4 ONNX (edgedistill.export.onnx, verified against
PyTorch, timed; with `--calibration`, int4 twice: rounded to nearest as onnx-int4-rtn, and rounded
by importance on that text as onnx-int4) and as Q8_0 and Q4_K_M GGUF (edgedistill.export.gguf, checked by its own
verify_ggufs on the same texts), then measures every artifact in a fresh process of its own, one
after the other, in `--rounds` interleaved rounds (so a burst of load on the machine hits all of
them): prefill tokens/s of a `--prompt-tokens` prompt, greedy decode tokens/s of `--gen-tokens`
tokens after it, and the process's peak RSS. GGUF runs in edgedistill.bench.worker (llama.cpp),
ONNX in edgedistill.bench.onnx_worker (onnxruntime-genai, as a user of the export runs it). Writes
medians, the ratios the ONNX issue sets targets for, and every raw run to `--out` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ONNX_PRECISIONS = ("fp32", "int8", "int4")
GGUF_TYPES = ("Q8_0", "Q4_K_M")
# the targets
TARGET_INT4_DECODE_VS_Q4_K_M = 0.9
TARGET_INT4_PPL_RATIO = 1.08
TARGET_TEACHER_EXPORT_S = 60.0


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.name.startswith("model.onnx")]
    return round(sum(p.stat().st_size for p in files) / 1e6, 1)


def _median_of(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def score_task_text(artifacts: dict[str, dict], model: Path, heldout: Path, records: int = 64) -> None:
    """Each quantized artifact's perplexity ratio, KL and top-1 against `model` on in-domain text,
    as "task_text_quality"; the fixed prose and code texts say little about a task-specialized student."""
    from transformers import AutoTokenizer

    from edgedistill.export.gguf.verify import verify_ggufs
    from edgedistill.export.onnx import verify_onnx

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()][:records]
    texts = [tokenizer.apply_chat_template([*row["messages"], {"role": "assistant", "content": row["label"]}],
                                           tokenize=False) for row in rows]
    keys = ("perplexity_ratio", "mean_kl", "top1_agreement")
    for name, artifact in artifacts.items():
        if artifact["precision"] == "fp32":
            continue
        path = Path(artifact["path"])
        check = (verify_onnx(path, model, texts=texts, raise_on_failure=False) if artifact["format"] == "onnx"
                 else verify_ggufs([path], model, texts=texts, raise_on_failure=False)[0])
        artifact["task_text_quality"] = {**{k: check[k] for k in keys}, "texts": len(texts)}
        print(f"{name:<14} task text: PPL ratio {check['perplexity_ratio']:.4f}, KL {check['mean_kl']:.4f}, "
              f"top-1 {check['top1_agreement']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/sentiment/teacher"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/onnx.json"))
    parser.add_argument("--work", type=Path, default=None, help="where exports go (default: beside --out)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reuse", action="store_true", help="keep exports already in --work")
    parser.add_argument("--calibration", type=Path, help="task text for int4's importance-weighted rounding")
    parser.add_argument("--task-text", type=Path, metavar="HELDOUT_JSONL",
                        help="also score every quantized artifact on in-domain text: the first 64 held-out "
                             "prompts of this file with their label as the answer, in the model's chat template")
    args = parser.parse_args()

    from edgedistill.bench.bandwidth import measure_bandwidth
    from edgedistill.bench.latency import bench_artifact
    from edgedistill.export.gguf import quantize_gguf, write_gguf
    from edgedistill.export.gguf.verify import verify_ggufs
    from edgedistill.export.onnx import MANIFEST, OnnxExportOptions, export_onnx, format_verification, reference_for
    from edgedistill.recipe import BenchConfig

    work = args.work or args.out.parent / f"onnx-{args.model.resolve().name}"
    work.mkdir(parents=True, exist_ok=True)
    reference = reference_for(args.model)
    artifacts: dict[str, dict] = {}
    variants = [(p, p, None) for p in ONNX_PRECISIONS]
    if args.calibration is not None:
        variants = [("fp32", "fp32", None), ("int8", "int8", None), ("int4-rtn", "int4", None),
                    ("int4", "int4", args.calibration)]
    for name, precision, calibration in variants:
        folder = work / f"onnx-{name}"
        if not (args.reuse and (folder / MANIFEST).is_file()):
            started = time.perf_counter()
            export_onnx(args.model, folder, OnnxExportOptions(precision, overwrite=True, reference=reference,
                                                              threads=args.threads, calibration=calibration))
            print(f"exported {folder} in {time.perf_counter() - started:.1f} s", flush=True)
        manifest = json.loads((folder / MANIFEST).read_text())
        check = manifest["verification"]
        artifacts[f"onnx-{name}"] = {
            "format": "onnx", "precision": precision, "path": str(folder), "size_mb": _size_mb(folder),
            "export_s": manifest["seconds"], "quantization": manifest["quantization"],
            "quality": {k: check[k] for k in ("perplexity_ratio", "mean_kl", "top1_agreement", "greedy_verdict")}}
        print(format_verification([{**check, "file": str(folder)}]), flush=True)

    f16 = work / "model-f16.gguf"
    if not (args.reuse and f16.is_file()):
        write_gguf(args.model, f16, overwrite=True)
    ggufs = {}
    for qtype in GGUF_TYPES:
        ggufs[qtype] = work / f"model-{qtype.lower()}.gguf"
        if not (args.reuse and ggufs[qtype].is_file()):
            quantize_gguf(f16, ggufs[qtype], qtype, overwrite=True)
    for qtype, check in zip(GGUF_TYPES, verify_ggufs(list(ggufs.values()), args.model, raise_on_failure=False)):
        artifacts[f"gguf-{qtype.lower()}"] = {
            "format": "gguf", "precision": qtype, "path": str(ggufs[qtype]), "size_mb": _size_mb(ggufs[qtype]),
            "quality": {k: check[k] for k in ("perplexity_ratio", "mean_kl", "top1_agreement", "greedy_verdict")}}
    if args.task_text is not None:
        score_task_text(artifacts, args.model, args.task_text)

    config = BenchConfig(prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                         repetitions=args.repetitions, threads=args.threads)
    bandwidth = measure_bandwidth("cpu", threads=args.threads)  # once: it is the machine's, not an artifact's
    runs: dict[str, list[dict]] = {name: [] for name in artifacts}
    for round_index in range(args.rounds):
        for name, artifact in artifacts.items():
            path = Path(artifact["path"])
            run = bench_artifact(path, config, bandwidth=bandwidth).to_dict()  # each in a process of its own, GGUF or ONNX
            runs[name].append(run)
            print(f"round {round_index + 1}: {name:<14} decode {run['decode_tokens_per_s']:7.1f} tok/s, prefill "
                  f"{run['prefill_tokens_per_s']:7.1f} tok/s, peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
    for name, artifact in artifacts.items():
        artifact.update({key: _median_of(runs[name], key)
                         for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_mb")}, runs=runs[name])

    def ratio(a: str, b: str, key: str = "decode_tokens_per_s") -> float:
        return round(artifacts[a][key] / artifacts[b][key], 3)

    int4_ppl_ratio = artifacts["onnx-int4"]["quality"]["perplexity_ratio"]
    teacher_export_s = sum(artifacts["onnx-int4"]["export_s"].values())
    summary = {
        "int4_decode_vs_q4_k_m": ratio("onnx-int4", "gguf-q4_k_m"),
        "int8_decode_vs_q8_0": ratio("onnx-int8", "gguf-q8_0"),
        "int4_prefill_vs_q4_k_m": ratio("onnx-int4", "gguf-q4_k_m", "prefill_tokens_per_s"),
        "int4_perplexity_ratio_vs_fp32": int4_ppl_ratio,
        "int4_export_s_with_verification": round(teacher_export_s, 1),
        "int4_export_s_without_verification": round(teacher_export_s - artifacts["onnx-int4"]["export_s"].get("verify", 0), 1),
        "targets": {
            f"int4 decode >= {TARGET_INT4_DECODE_VS_Q4_K_M}x Q4_K_M":
                ratio("onnx-int4", "gguf-q4_k_m") >= TARGET_INT4_DECODE_VS_Q4_K_M,
            f"int4 perplexity within {TARGET_INT4_PPL_RATIO - 1:.0%} of fp32": int4_ppl_ratio <= TARGET_INT4_PPL_RATIO,
            f"export under {TARGET_TEACHER_EXPORT_S:.0f} s (int4, verification included)":
                teacher_export_s < TARGET_TEACHER_EXPORT_S,
        },
    }
    result = {"model": str(args.model), "threads": args.threads, "rounds": args.rounds,
              "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repetitions": args.repetitions,
              "load_average_at_end": os.getloadavg(), "summary": summary, "artifacts": artifacts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'artifact':<14} {'MB':>7} {'decode/s':>9} {'prefill/s':>10} {'RSS MB':>7} {'PPL ratio':>9} {'KL':>7}")
    for name, a in artifacts.items():
        print(f"{name:<14} {a['size_mb']:>7.1f} {a['decode_tokens_per_s']:>9.1f} {a['prefill_tokens_per_s']:>10.1f} "
              f"{a['peak_rss_mb']:>7.0f} {a['quality']['perplexity_ratio']:>9.4f} {a['quality']['mean_kl']:>7.4f}")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
