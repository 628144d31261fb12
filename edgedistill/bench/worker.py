"""One benchmark of one GGUF in llama.cpp, in a process of its own; prints one JSON line.

    python -m edgedistill.bench.worker model.gguf --prompt-tokens 128 --gen-tokens 64 --repetitions 3

A separate process makes the peak RSS the model's own (this module imports neither torch nor
transformers) and keeps a crash in llama.cpp from taking the caller down. Like llama-bench's
pp/tg tests, prefill is one batch of `prompt_tokens` tokens and decode is `gen_tokens` tokens one
at a time after it; one warm-up, then the median of `repetitions`.
"""

from __future__ import annotations

import argparse
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


def measure(path: str, prompt_tokens: int, gen_tokens: int, repetitions: int, threads: int) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=prompt_tokens + gen_tokens + 8, n_batch=max(prompt_tokens, 8),
                n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False)
    n_vocab = llm.n_vocab()
    text = llm.tokenize(BENCH_TEXT.encode(), add_bos=False)
    prompt = (text * (prompt_tokens // len(text) + 1))[:prompt_tokens]
    runs = []
    for _ in range(repetitions + 1):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefilled = time.perf_counter()
        for _ in range(gen_tokens):
            # Greedy: the next token is the argmax of the last position's logits.
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        finished = time.perf_counter()
        runs.append({"prefill_s": prefilled - started, "decode_s": finished - prefilled})
    return summarize(runs[1:], "llama.cpp", prompt_tokens, gen_tokens, threads)


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
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.prompt_tokens, args.gen_tokens, args.repetitions, args.threads)))


if __name__ == "__main__":
    main()
