"""Does `edgedistill bench` measure HF folders on CUDA, and how much faster is torch_decode's static
cache + CUDA graph than plain `generate` at batch 1? One JSON.

    PYTHONPATH=. python3 tools/gpu/check_bench.py --json /tmp/bench_check.json     # on the GPU machine
    .venv/bin/python tools/gpu/check_bench.py --device cpu --layers 2 --gen-tokens 8  # its CPU-safe parts, here

Builds a random-weight model of SmolLM2-135M's shape (30 layers, width 576, 9 heads, 3 KV heads,
MLP 1536, tied embeddings) with the SmolLM2 tokenizer from tools/gpu/tokenizer, measures the GPU's
memory bandwidth once, then runs edgedistill.bench.torch_worker with --compare-generate in a fresh
process per dtype (fp32, fp16, bf16): prefill and decode tokens/s, peak GPU memory, the decode
mode (cuda_graph, or eager with the capture's error), plain generate's decode tokens/s on the
same model and prompt in the same process, the speed-up (the issue's target: at least 5x) and
how many greedy tokens the two agree on. Each row also gets its bandwidth bound.
Without CUDA and --device cuda it writes {"cuda_available": false, "ok": false, ...} and exits 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from check_cuda import emit  # the same JSON report and exit status as the other GPU checks

TOKENIZER = Path(__file__).resolve().parent / "tokenizer"
TARGET_SPEEDUP = 5.0
SMOLLM2_SHAPE = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                     max_position_embeddings=2048, tie_word_embeddings=True)


def build_model(out: Path, layers: int) -> Path:
    from transformers import AutoTokenizer

    from edgedistill.recipe import RandomModelConfig
    from edgedistill.sources.random_model import build_random_model

    if not (TOKENIZER / "tokenizer.json").is_file():
        sys.exit(f"{TOKENIZER} is missing: make it with tools/gpu/make_tokenizer.py (tools/gpu/prepare.sh does)")
    config = RandomModelConfig(num_hidden_layers=layers, **SMOLLM2_SHAPE)
    return build_random_model(config, AutoTokenizer.from_pretrained(TOKENIZER), out, seed=0)


def run_worker(model: Path, args: argparse.Namespace, dtype: str) -> dict:
    command = [sys.executable, "-m", "edgedistill.bench.torch_worker", str(model), "--device", args.device,
               "--dtype", dtype, "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
               "--repetitions", str(args.repetitions), "--compare-generate"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.worker_timeout)
    if done.returncode != 0:
        return {"dtype": dtype, "error": f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - started, 1)}


def check_scoring(model: Path, device: str, dtypes: list[str]) -> list[dict]:
    """eval's PyTorch path on `device`: each dtype's log-probs on a fixed prompt against fp32 on the CPU
    (KL, top-1 agreement) and its greedy answer against the CPU's."""
    from edgedistill.export.verify import Agreement
    from edgedistill.runtimes import open_runtime

    chat = [{"role": "user", "content": "Read the review and say whether it is positive or negative: a warm, "
                                        "funny film with a terrible ending."}]
    cpu = open_runtime(model)
    ids = cpu.prompt_ids(chat)
    reference, [(cpu_answer, _)] = cpu.score(ids), cpu.generate([chat], 16)
    rows = []
    for dtype in dtypes:
        runtime = open_runtime(model, device=device, dtype=dtype)
        agreement = Agreement()
        agreement.add(reference, runtime.score(ids))
        [(answer, _)] = runtime.generate([chat], 16)
        rows.append({"dtype": dtype, "positions": agreement.positions, "mean_kl": agreement.mean_kl,
                     "top1_agreement": agreement.top1_agreement, "greedy_same_as_cpu": answer == cpu_answer})
        del runtime
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--worker-timeout", type=float, default=150)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-check-model"))
    parser.add_argument("--json", type=Path, help="write the JSON here instead of printing it")
    args = parser.parse_args()

    import torch

    from edgedistill.bench.bandwidth import measure_bandwidth
    from edgedistill.bench.latency import with_bound
    from edgedistill.errors import EdgedistillError

    started = time.perf_counter()
    report: dict = {"device": args.device, "cuda_available": torch.cuda.is_available(),
                    "cuda_device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "python": sys.version.split()[0],
                    "shape": {**SMOLLM2_SHAPE, "num_hidden_layers": args.layers},
                    "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                    "repetitions": args.repetitions, "target_speedup_vs_generate": TARGET_SPEEDUP}
    try:
        import transformers

        report["transformers"] = transformers.__version__
        if args.device == "cuda" and not torch.cuda.is_available():
            raise EdgedistillError("torch sees no CUDA device", "run this on the GPU machine, or pass --device cpu")
        model = build_model(args.model_dir, args.layers)
        bandwidth = measure_bandwidth(args.device)
        report.update(bandwidth)
        rows = []
        for dtype in args.dtypes:
            row = run_worker(model, args, dtype)
            rows.append(row if "error" in row else with_bound(row, bandwidth, row.pop("bytes_per_token")))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        report["rows"] = rows
        report["scoring"] = check_scoring(model, args.device, args.dtypes)
    except Exception as error:  # the JSON should still say how far it got
        report["error"] = f"{type(error).__name__}: {error}"
    rows = report.get("rows", [])
    report["ok"] = bool(rows) and "error" not in report and all(
        "error" not in r and (args.device == "cpu" or (r["decode_mode"] == "cuda_graph" and "peak_gpu_mb" in r))
        for r in rows)
    report["speedup_target_met"] = {r["dtype"]: r["speedup_vs_generate"] >= TARGET_SPEEDUP
                                    for r in rows if "speedup_vs_generate" in r}
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    return emit(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
