"""What quantization-aware distillation costs per training step: the rounding of every weight to a
grid (edgedistill.distill.quant_aware), beside a plain training step of the same student.

    .venv/bin/python tools/bench_quant_aware.py --student runs/sentiment/student --json runs/bench/quant_aware.json
    .venv/bin/python tools/bench_quant_aware.py --student runs/sentiment/student --threads 1 --repetitions 2

For each grid of the default recipe (Q8_0, Q4_K_M, onnx-int4): the median time of the rounding a
fake-quantized step adds (ggml's or onnxruntime's quantize and dequantize of every weight, in
threads), and of one plain training step (forward, backward, AdamW) on a batch of `--batch`
sequences of `--tokens` tokens. One JSON with the load average, since a busy machine's figures are
not figures (FACTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from edgedistill.export.quant_grids import build_quant_aware
from edgedistill.recipe import DistillConfig, ExportConfig, QuantAwareConfig
from edgedistill.runtimes.pytorch import load_model

GRIDS = ["Q8_0", "Q4_K_M", "onnx-int4"]


def _median_seconds(fn, repetitions: int) -> float:
    times = []
    for _ in range(repetitions):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, required=True, help="an HF folder (with tokenizer), e.g. runs/sentiment/student")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.student)
    distill = DistillConfig(quant_aware=QuantAwareConfig(grids=GRIDS))
    quant_aware = build_quant_aware(model, args.student, distill, ExportConfig(onnx=["int4"]), first_epoch=0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()

    def step(grid=None):
        logits = (quant_aware.forward(model, grid, input_ids=ids) if grid else model(input_ids=ids)).logits
        logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows = {"plain_step_s": round(_median_seconds(step, args.repetitions), 3)}
    for grid in quant_aware.grids:
        rounding = _median_seconds(lambda: quant_aware.rounded(model, grid), args.repetitions)
        rows[grid.name] = {"rounding_ms_per_step": round(1000 * rounding, 1),
                           "fake_quantized_step_s": round(_median_seconds(lambda: step(grid), args.repetitions), 3),
                           "types": grid.summary()}
    result = {"student": str(args.student), "parameters": sum(p.numel() for p in model.parameters()),
              "batch": args.batch, "tokens": args.tokens, "threads": torch.get_num_threads(),
              "load_average": os.getloadavg(), **rows}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
