"""One benchmark of one ONNX export in ONNX Runtime (GenAI), in a process of its own; prints one JSON line.

    python -m edgedistill.bench.onnx_worker runs/sentiment/export_onnx/student-int4 --prompt-tokens 128 --gen-tokens 64
    python -m edgedistill.bench.onnx_worker runs/sentiment/export_onnx/student-int4 --device cuda

The same measurement as edgedistill.bench.worker makes of a GGUF in llama.cpp: a prompt of
`prompt_tokens` (a text's tokens repeated) prefilled at once, then `gen_tokens` greedy tokens one
at a time; one warm-up, then the median of `repetitions`. Builder exports run in onnxruntime-genai,
others in a plain onnxruntime session (edgedistill.runtimes.onnx), as `edgedistill chat` runs them.
Neither this module nor the runtime imports torch or transformers, so the peak RSS is the model's.
On "cuda" both run with ONNX Runtime's CUDA provider, and the row names the GPU and the provider.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgedistill.bench.worker import BENCH_TEXT, cuda_device_name, summarize
from edgedistill.runtimes.onnx import CUDA_PROVIDER, OnnxChatModel


def measure(folder: Path, prompt_tokens: int = 128, gen_tokens: int = 64, repetitions: int = 3,
            threads: int | None = None, device: str = "cpu") -> dict:
    """Prefill and greedy decode speed and peak RSS of an export (summarize's fields)."""
    chat = OnnxChatModel(folder, threads=threads, device=device)
    # GenAI on a GPU may return before its kernels finish; reading the next token waits for them
    on_gpu = device == "cuda"
    text = chat.encode(BENCH_TEXT)
    prompt = (text * (prompt_tokens // len(text) + 1))[:prompt_tokens]
    runs = []
    for _ in range(repetitions + 1):
        if chat.genai:
            params = chat.og.GeneratorParams(chat.model)
            params.set_search_options(do_sample=False, max_length=prompt_tokens + gen_tokens + 1)
            generator = chat.og.Generator(chat.model, params)
            started = time.perf_counter()
            generator.append_tokens(np.array([prompt], np.int32))
            if on_gpu:
                generator.get_next_tokens()
            prefilled = time.perf_counter()
            for _ in range(gen_tokens):
                generator.generate_next_token()
            if on_gpu:
                generator.get_next_tokens()
        else:
            steps = chat.decoder.steps(prompt)
            started = time.perf_counter()
            next(steps)
            prefilled = time.perf_counter()
            for _ in range(gen_tokens):
                next(steps)
        finished = time.perf_counter()
        runs.append({"prefill_s": prefilled - started, "decode_s": finished - prefilled})
    runtime = "onnxruntime-genai" if chat.genai else "onnxruntime"
    if device == "cpu":
        return summarize(runs[1:], runtime, prompt_tokens, gen_tokens, chat.threads)
    return {**summarize(runs[1:], runtime, prompt_tokens, gen_tokens, chat.threads, cuda_device_name()),
            "provider": CUDA_PROVIDER}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    print(json.dumps(measure(args.folder, args.prompt_tokens, args.gen_tokens, args.repetitions, args.threads,
                             args.device)))


if __name__ == "__main__":
    main()
