"""Soft labels from a loopback llama.cpp server against the local top-k path, in tokens per second. One JSON.

    .venv/bin/python tools/bench_endpoint_soft_labels.py --json runs/endpoint-soft-labels.json

Serves the embedded teacher's GGUF with llama-cpp-python's server on loopback and asks it for
greedy answers to N review prompts with `top_logprobs: 20` (what the generate stage of an endpoint
teacher does), then runs the local logits path (the teacher's HF folder in PyTorch fp32, one
forward pass per example, top-20 of every position) on the same prompts and answers. Reports
answer tokens with soft labels per second for each, their ratio, and the machine's load: a figure
taken beside other work is not one.

The server's tokens/s include generating the answer (the local path only scores it), which is
the fair comparison: an endpoint teacher has to generate the answers anyway, the local path runs
after a generate stage that did.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from edgedistill.data import remote
from edgedistill.data.endpoint_labels import ENDPOINT_TOPK, TokenTable, align_answer
from edgedistill.data.prompts import read_jsonl
from edgedistill.recipe import EndpointConfig
from edgedistill.runtimes.pytorch import load_model, load_tokenizer
from edgedistill.sources import materialize, resolve_source

ROOT = Path(__file__).resolve().parent.parent


def start_server(gguf: Path, port: int, threads: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                                "--host", "127.0.0.1", "--n_ctx", "1024", "--n_threads", str(threads)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("llama_cpp.server did not start in 120 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--json", type=Path, default=Path("runs/endpoint-soft-labels.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = list(read_jsonl(ROOT / "recipes" / "data" / "sentiment.jsonl"))[: args.examples]
    prompts = [[{"role": "user", "content": "Is this review positive or negative? Explain briefly.\n\nReview: "
                 + row["text"]}] for row in rows]
    source = resolve_source("smollm2-135m-instruct")
    load_before = os.getloadavg()
    server = start_server(source.path, args.port, args.threads)
    endpoint = EndpointConfig(url=f"http://127.0.0.1:{args.port}/v1", timeout_s=600, retries=0)
    try:
        started = time.perf_counter()
        completions = [remote.request_once(endpoint, remote.Request((i, 0), messages, 0),
                                           max_new_tokens=args.max_new_tokens, temperature=0.0,
                                           top_logprobs=ENDPOINT_TOPK) for i, messages in enumerate(prompts)]
        server_s = time.perf_counter() - started
    finally:
        server.kill()
        server.wait()
    server_tokens = sum(len(c.tokens) for c in completions)
    with tempfile.TemporaryDirectory() as folder:
        teacher = Path(folder) / "teacher"
        teacher.mkdir()
        materialize(source, teacher)
        tokenizer, model = load_tokenizer(teacher), load_model(teacher)
        table = TokenTable(tokenizer)
        sequences, aligned = [], 0
        for messages, completion in zip(prompts, completions):
            found = align_answer(completion.tokens, completion.text, table)
            aligned += found is not None
            answer = found[0] if found else tokenizer.encode(completion.text, add_special_tokens=False)
            sequences.append((tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True),
                              answer))
        started = time.perf_counter()
        with torch.inference_mode():
            for prompt, answer in sequences:
                logprobs = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].float(), -1)
                logprobs.topk(ENDPOINT_TOPK, dim=-1)
        local_s = time.perf_counter() - started
    local_tokens = sum(len(answer) for _, answer in sequences)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "load_before": load_before, "load_after": os.getloadavg()},
        "teacher": "smollm2-135m-instruct (server: its Q4_1 GGUF in llama-cpp-python; local: fp32 PyTorch)",
        "examples": len(prompts), "top_logprobs": ENDPOINT_TOPK,
        "server": {"answer_tokens": server_tokens, "seconds": round(server_s, 2),
                   "tokens_per_s": round(server_tokens / server_s, 1), "answers_aligned": aligned},
        "local_topk": {"answer_tokens": local_tokens, "seconds": round(local_s, 2),
                       "tokens_per_s": round(local_tokens / local_s, 1),
                       "note": "scores the answers only; the server also generated them"},
    }
    result["server_vs_local"] = round(result["server"]["tokens_per_s"] / result["local_topk"]["tokens_per_s"], 3)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
