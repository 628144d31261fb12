"""One benchmark of one GGUF in llama.cpp, in a process of its own; prints one JSON line.

    python -m edgedistill.bench.worker model.gguf --prompt-tokens 128 --gen-tokens 64 --repetitions 3
    python -m edgedistill.bench.worker model.gguf --device cuda     # every layer offloaded to the GPU

A separate process makes the peak RSS the model's own (this module imports neither torch nor
transformers) and keeps a crash in llama.cpp from taking the caller down. Like llama-bench's
pp/tg tests, prefill is one batch of `prompt_tokens` tokens and decode is `gen_tokens` tokens one
at a time after it; one warm-up, then the median of `repetitions`. On "cuda" (a llama-cpp-python
built with CUDA, edgedistill.runtimes.llamacpp.gpu_layers) the row also names the GPU and the provider.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import time

# the prompt every worker measures: this text's tokens, repeated to the wanted length
BENCH_TEXT = "The quick brown fox jumps over the lazy dog while the sun sets. "


def peak_rss_kb() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a worker started
    # from a big parent would report the parent's peak.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cuda_device_name() -> str:
    """"cuda:<the first visible GPU's name>" as the NVIDIA driver reports it (the name torch gives the
    PyTorch rows), read through libcuda so that no worker imports torch; "cuda" when it cannot say."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "cuda"
    name, device = ctypes.create_string_buffer(256), ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), 0) or cuda.cuDeviceGetName(name, 256, device):
        return "cuda"
    return f"cuda:{name.value.decode(errors='replace')}"


def measure(path: str, prompt_tokens: int, gen_tokens: int, repetitions: int, threads: int,
            device: str = "cpu") -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    n_gpu_layers = 0
    if device != "cpu":
        # imported for the GPU only: the CPU worker loads nothing of edgedistill's besides this module
        from edgedistill.runtimes.llamacpp import gpu_layers
        n_gpu_layers = gpu_layers(device)
    llm = Llama(model_path=path, n_ctx=prompt_tokens + gen_tokens + 8, n_batch=max(prompt_tokens, 8),
                n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers, verbose=False)
    n_vocab = llm.n_vocab()
    text = llm.tokenize(BENCH_TEXT.encode(), add_bos=False)
    prompt = (text * (prompt_tokens // len(text) + 1))[:prompt_tokens]
    runs = []
    for _ in range(repetitions + 1):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        llama_cpp.llama_synchronize(llm.ctx)  # a GPU backend's llama_decode returns before its work is done
        prefilled = time.perf_counter()
        for _ in range(gen_tokens):
            # Greedy: the next token is the argmax of the last position's logits.
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        llama_cpp.llama_synchronize(llm.ctx)
        finished = time.perf_counter()
        runs.append({"prefill_s": prefilled - started, "decode_s": finished - prefilled})
    if device == "cpu":
        return summarize(runs[1:], "llama.cpp", prompt_tokens, gen_tokens, threads)
    return {**summarize(runs[1:], "llama.cpp", prompt_tokens, gen_tokens, threads, cuda_device_name()),
            "provider": "llama.cpp CUDA backend, every layer offloaded (n_gpu_layers=-1)"}


def summarize(runs: list[dict], runtime: str, prompt_tokens: int, gen_tokens: int, threads: int,
              device: str = "cpu") -> dict:
    """The JSON line of a measurement from its timed runs ({"prefill_s", "decode_s"} each, warm-up
    excluded): medians, their spreads (max - min of the runs' rates), time to first token and this
    process's peak RSS; any runtime's worker uses it. `device`: "cpu" or "cuda:<GPU name>"."""
    prefill_s = statistics.median(r["prefill_s"] for r in runs)
    decode_s = statistics.median(r["decode_s"] for r in runs)
    prefill_rates = [prompt_tokens / r["prefill_s"] for r in runs]
    decode_rates = [gen_tokens / r["decode_s"] for r in runs]
    return {
        "runtime": runtime,
        "device": device,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repetitions": len(runs),
        "threads": threads,
        # Time to first token: the prompt's prefill plus the first decode step.
        "ttft_ms": round(1000 * (prefill_s + decode_s / gen_tokens), 2),
        "prefill_tokens_per_s": round(prompt_tokens / prefill_s, 2),
        "prefill_tokens_per_s_spread": round(max(prefill_rates) - min(prefill_rates), 2),
        "decode_tokens_per_s": round(gen_tokens / decode_s, 2),
        "decode_tokens_per_s_spread": round(max(decode_rates) - min(decode_rates), 2),
        "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.prompt_tokens, args.gen_tokens, args.repetitions, args.threads,
                             args.device)))


if __name__ == "__main__":
    main()
