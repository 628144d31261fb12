"""One benchmark of one HF folder in PyTorch, in a process of its own; prints one JSON line.

    python -m edgedistill.bench.torch_worker runs/sentiment/teacher --device cpu --dtype fp32
    python -m edgedistill.bench.torch_worker runs/sentiment/teacher --device cuda --dtype bf16 --compare-generate

The same measurement as edgedistill.bench.worker makes of a GGUF: a prompt of `prompt_tokens`
(a text's tokens repeated) prefilled in one forward pass, then `gen_tokens` greedy tokens one at a
time, one warm-up and the median of `repetitions`. Decoding is edgedistill.runtimes.torch_decode's
(static KV cache; on CUDA one CUDA graph per token), which is what the fields measure; with
`--compare-generate` plain `model.generate` is timed on the same prompt too, for the speed-up.
On CUDA the row also holds the peak GPU memory torch allocated (weights, cache, activations).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from edgedistill.bench.worker import BENCH_TEXT, summarize


def measure(folder: Path, prompt_tokens: int, gen_tokens: int, repetitions: int, threads: int,
            device: str = "cpu", dtype: str = "fp32", compare_generate: bool = False) -> dict:
    import torch
    from transformers import AutoTokenizer

    from edgedistill.bench.model_bytes import torch_bytes_per_token
    from edgedistill.runtimes.pytorch import load_model
    from edgedistill.runtimes.torch_decode import (DTYPES, StaticDecoder, device_name, require_device, synchronize,
                                                   time_generate)

    require_device(device)
    torch.set_num_threads(threads)
    model = load_model(folder, dtype=DTYPES[dtype]).to(device)
    text = AutoTokenizer.from_pretrained(folder)(BENCH_TEXT, add_special_tokens=False)["input_ids"]
    prompt = (text * (prompt_tokens // len(text) + 1))[:prompt_tokens]
    decoder = StaticDecoder(model, prompt_tokens + gen_tokens + 1)
    runs = []
    for _ in range(repetitions + 1):  # the first is the warm-up (and, on CUDA, the graph's capture)
        synchronize(device)
        started = time.perf_counter()
        decoder.prefill(prompt)
        synchronize(device)
        prefilled = time.perf_counter()
        decoder.decode(gen_tokens)
        synchronize(device)
        runs.append({"prefill_s": prefilled - started, "decode_s": time.perf_counter() - prefilled})
    runtime = f"PyTorch {dtype}"
    result = summarize(runs[1:], runtime, prompt_tokens, gen_tokens, torch.get_num_threads(), device_name(device))
    result.update(dtype=dtype, decode_mode=decoder.mode, bytes_per_token=torch_bytes_per_token(model))
    if decoder.graph_error:
        result["cuda_graph_error"] = decoder.graph_error
    if compare_generate:
        plain = [time_generate(model, prompt, gen_tokens, device) for _ in range(repetitions + 1)]
        result["generate_decode_tokens_per_s"] = round(gen_tokens / statistics.median(p["decode_s"] for p in plain[1:]), 2)
        result["speedup_vs_generate"] = round(result["decode_tokens_per_s"] / result["generate_decode_tokens_per_s"], 2)
        # how far the two greedy sequences agree (low precision can make near-ties differ late)
        ours, theirs = decoder.tokens()[prompt_tokens:], plain[-1]["tokens"]
        result["tokens_matching_generate"] = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                                                  min(len(ours), len(theirs)))
        result["tokens_compared"] = min(len(ours), len(theirs))
    if device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--compare-generate", action="store_true", help="also time plain model.generate")
    args = parser.parse_args()
    print(json.dumps(measure(args.folder, args.prompt_tokens, args.gen_tokens, args.repetitions, args.threads,
                             args.device, args.dtype, args.compare_generate)))


if __name__ == "__main__":
    main()
