"""Does `edgedistill bench` measure llama.cpp, or itself? Its decode speed next to a bare
llama-cpp-python loop on the same GGUF, and how much repeated bench runs of one file differ.

    .venv/bin/python tools/bench_overhead.py                         # the teacher's Q4_K_M (made once)
    .venv/bin/python tools/bench_overhead.py --model model.gguf --rounds 3 --out /tmp/overhead.json

Each round runs, in fresh processes one after the other, edgedistill's bench of the file
(edgedistill.bench.latency.bench_artifact: its llama.cpp worker) and the bare loop below (this
file run with --bare: Llama.eval of the prompt, then one token at a time, greedy from the
context's last logits; no edgedistill code), alternating which goes first, with the same prompt and
generation lengths, repetitions and threads. Writes the medians over the rounds, the ratio
bench / bare (the issue's target: within 5%), the spread of the bench's rounds ((max - min) /
median; target: within 10%) and every round to `--out` (JSON). Speeds are only comparable on a
quiet machine: the load average before and after is recorded, and `--note` says what else ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the targets
TARGET_BENCH_VS_BARE = 0.95
TARGET_REPEAT_SPREAD = 0.10
# the same text edgedistill.bench.worker repeats into its prompt
BENCH_TEXT = b"The quick brown fox jumps over the lazy dog while the sun sets. "


def bare(model: str, prompt_tokens: int, gen_tokens: int, repetitions: int, threads: int) -> dict:
    """The bare loop: llama-cpp-python as a user would write it, one warm-up, median of `repetitions`."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=prompt_tokens + gen_tokens + 8, n_batch=max(prompt_tokens, 8),
                n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False)
    text = llm.tokenize(BENCH_TEXT, add_bos=False)
    prompt = (text * (prompt_tokens // len(text) + 1))[:prompt_tokens]
    n_vocab = llm.n_vocab()
    decode_s = []
    for _ in range(repetitions + 1):
        llm.reset()
        llm.eval(prompt)
        started = time.perf_counter()
        for _ in range(gen_tokens):
            # Llama.scores holds logits only with logits_all=True (0.3.x): read the last ones from the context
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        decode_s.append(time.perf_counter() - started)
    return {"decode_tokens_per_s": round(gen_tokens / statistics.median(decode_s[1:]), 2)}


def _run_bare(model: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--bare", "--model", str(model), "--prompt-tokens", str(args.prompt_tokens),
               "--gen-tokens", str(args.gen_tokens), "--repetitions", str(args.repetitions),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize_rounds(rounds: list[dict]) -> dict:
    """Medians of bench and bare decode tokens/s over the rounds, their ratio, the bench's spread,
    and whether each target is met."""
    bench = [r["bench_decode_tokens_per_s"] for r in rounds]
    bare_rates = [r["bare_decode_tokens_per_s"] for r in rounds]
    bench_median, bare_median = statistics.median(bench), statistics.median(bare_rates)
    ratio = bench_median / bare_median
    spread = (max(bench) - min(bench)) / bench_median
    return {"bench_decode_tokens_per_s": round(bench_median, 2), "bare_decode_tokens_per_s": round(bare_median, 2),
            "bench_vs_bare": round(ratio, 3), "bench_repeat_spread": round(spread, 3),
            "bare_repeat_spread": round((max(bare_rates) - min(bare_rates)) / bare_median, 3),
            "targets": {"bench_within_5_percent_of_bare": ratio >= TARGET_BENCH_VS_BARE,
                        "bench_repeats_within_10_percent": spread <= TARGET_REPEAT_SPREAD}}


def default_model(teacher: Path, work: Path) -> Path:
    """The teacher's Q4_K_M GGUF in `work`, written (F16, then quantized) when it is not there yet."""
    from edgedistill.export.gguf import quantize_gguf, write_gguf

    model = work / "teacher-q4_k_m.gguf"
    if not model.is_file():
        if not (teacher / "config.json").is_file():
            sys.exit(f"{teacher} is not an HF model folder: make it with `.venv/bin/edgedistill run --to teacher` "
                     "(it writes runs/sentiment/teacher), or pass --model FILE.gguf")
        work.mkdir(parents=True, exist_ok=True)
        f16 = write_gguf(teacher, work / "teacher-f16.gguf", overwrite=True)
        quantize_gguf(f16, model, "Q4_K_M")
        f16.unlink()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the teacher's Q4_K_M, made in --work)")
    parser.add_argument("--teacher", type=Path, default=Path("runs/sentiment/teacher"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench/overhead"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/overhead.json"))
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        print(json.dumps(bare(str(args.model), args.prompt_tokens, args.gen_tokens, args.repetitions, args.threads)))
        return

    from edgedistill.bench.bandwidth import measure_bandwidth
    from edgedistill.bench.latency import bench_artifact
    from edgedistill.recipe import BenchConfig

    model = args.model or default_model(args.teacher, args.work)
    cfg = BenchConfig(prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, repetitions=args.repetitions,
                      threads=args.threads)
    load_before = os.getloadavg()
    bandwidth = measure_bandwidth("cpu", threads=args.threads)
    rounds = []
    for i in range(args.rounds):
        row = {}
        for which in (("bench", "bare") if i % 2 == 0 else ("bare", "bench")):
            if which == "bench":
                row["bench_decode_tokens_per_s"] = bench_artifact(model, cfg, bandwidth=bandwidth).decode_tokens_per_s
            else:
                row["bare_decode_tokens_per_s"] = _run_bare(model, args)["decode_tokens_per_s"]
        rounds.append(row)
        print(f"round {i + 1}/{args.rounds}: bench {row['bench_decode_tokens_per_s']:.1f}, "
              f"bare {row['bare_decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    report = {"model": str(model), "bench": {**cfg.model_dump(), "rounds": args.rounds}, **bandwidth,
              "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "note": args.note, **summarize_rounds(rounds), "rounds": rounds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"bench {report['bench_decode_tokens_per_s']} vs bare {report['bare_decode_tokens_per_s']} decode tokens/s: "
          f"ratio {report['bench_vs_bare']} (target >= {TARGET_BENCH_VS_BARE}); bench repeat spread "
          f"{100 * report['bench_repeat_spread']:.1f}% (target <= {100 * TARGET_REPEAT_SPREAD:.0f}%)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
