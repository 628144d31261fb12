"""Quantization-aware distillation: the student trains through the weights its exported files will hold.

    edgedistill run recipes/my-task.yaml --out runs/my-task     # a recipe with distill.quant_aware
    .venv/bin/python -m pytest -q tests/test_quant_aware.py     # exactness against the real files
    .venv/bin/python tools/bench_quant_aware.py                 # the rounding's cost per step

With distill.quant_aware, the last `epochs` of the distill stage (and every epoch of an on_policy
stage) run the student's forward pass on fake-quantized weights: each weight the exporter rounds
is replaced by `q(w) + (w - w.detach())` (the straight-through estimator, written so that its
value is q(w) exactly), so the loss (the teacher's soft labels, as distill has
them) sees q(w) and the gradient passes straight through to the float weight w. What is saved
is the float w; the export stages then quantize it as they always do, so the files shipped are the
exporters' own output from the trained weights, and q(w) is what they hold.

q is the exporters' own rounding, bit for bit (the grids are built by
edgedistill.export.quant_grids, with the exporters' own code):
- GGUF types: llama.cpp decides per tensor what a type means (Q4_K_M keeps some tensors in Q6_K;
  rows that are not a multiple of 256 fall back to legacy types), so the student's F16 GGUF is
  written and quantized once by the exporter's own functions and each tensor's type is read back
  from the file; the HF names come from the GGUF writer's own plan (plan_tensors). Each step, every
  weight is rounded to float16 (the F16 file), then quantized and dequantized by ggml's own
  ggml_quantize_chunk and to_float (edgedistill.export.gguf.ggml_quants.round_trip). No importance
  matrix: the recipe refuses export.imatrix with quant_aware.
- onnx-int4 / onnx-int8: onnxruntime's MatMulNBits quantizer as the exporter calls it
  (DefaultWeightOnlyQuantizer.qbits_block_quant with export.onnx_options' block size and symmetry),
  read back with edgedistill.export.onnx.rounding.dequantize. The lm_head gets max(bits,
  lm_head_bits) (float when lm_head_bits is None); a tied embedding table shares the lm_head's
  rounding where the exporter shares it (symmetric, width a multiple of the block), else stays
  float, or with quantize_embeddings: true gets onnxruntime's int4 Gather quantizer; an untied
  table likewise. Not with onnx_options.calibrate (refused).

The fake-quantized steps learn the teacher's soft labels, or with quant_aware.soft_labels
float_student the float student's own, as it stands when they begin (saved in
distill/float_student: edgedistill.distill.train.float_student): the float model teaches its
rounded self, as NVIDIA's quantization-aware distillation does (the divergence from it alone, at
temperature 1), so the files are trained to be that model rather than to come nearer the
teacher than it did.

Several grids take turns, one per step (step i uses grids[i % n]): each artifact's error is in
the loss as often as the others', at the cost of one forward pass per step (averaging the grids'
losses would cost n). On-policy epochs use the grid of their step for sampling too, so the
student samples as the file it becomes would.

torchao (checked against its 0.13/0.18 source and docs, not installed): IntxFakeQuantizeConfig /
Int4WeightOnlyQATQuantizer with symmetric int4 groups of 32 use scale = max|w| / 7.5 (levels -8..7,
zero point 0), while onnxruntime's MLAS puts each block's signed extreme on level -8 (scale =
extreme / -8), so the grids differ; Int4WeightOnlyQATQuantizer's default is asymmetric bf16
tinygemm groups; and nothing in torchao reproduces ggml's K-quants (256-weight super-blocks with
6-bit sub-block scales and mins found by search) or llama.cpp's per-tensor type choice. So torchao
is not a dependency: the few lines below call the exporters' own quantizers instead.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.func import functional_call



class Rounding(Protocol):
    """One weight's rounding: [out, in] float32 in, the values the file holds out (picklable, so
    that data-parallel workers get it); `label` names the type ("Q4_K", "int4")."""

    label: str

    def __call__(self, weight: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Grid:
    """One export's rounding: HF parameter name (every name of a tied parameter) -> its rounding."""

    name: str
    weights: dict[str, Rounding]

    def summary(self) -> dict[str, int]:
        """How many parameter names (a tied table counts under each name) are rounded to each type."""
        counts: dict[str, int] = {}
        for rounding in self.weights.values():
            counts[rounding.label] = counts.get(rounding.label, 0) + 1
        return dict(sorted(counts.items()))


@dataclass
class QuantAware:
    """The grids a stage trains against and from which epoch; times the rounding it does."""

    grids: list[Grid]
    first_epoch: int = 0
    # distill.quant_aware.soft_labels: "teacher", or "float_student" (the float student as the
    # fake-quantized epochs begin gives their soft labels; edgedistill.distill.train)
    soft_labels: str = "teacher"
    # distill.quant_aware.learning_rate: the fake-quantized epochs' constant rate (None: the schedule's)
    learning_rate: float | None = None
    rounding_seconds: float = 0.0

    def grid_at(self, epoch: int, step: int) -> Grid | None:
        """The grid of global step `step` (counted from 0 over the whole stage) in `epoch`, or None
        before the fake-quantized epochs."""
        return self.grids[step % len(self.grids)] if epoch >= self.first_epoch else None

    def rounded(self, model, grid: Grid, *, straight_through: bool = True) -> dict[str, torch.Tensor]:
        """Parameter name -> the rounded weight with a straight-through gradient (q(w) alone when not
        `straight_through`), for functional_call. Weights are rounded in parallel threads (ggml
        and onnxruntime release the GIL)."""
        started = time.perf_counter()
        params = dict(model.named_parameters(remove_duplicate=False))
        # one rounding per distinct (parameter, rounding): a shared table is rounded once
        jobs: dict[tuple[int, Rounding], list[str]] = {}
        for name, rounding in grid.weights.items():
            jobs.setdefault((id(params[name]), rounding), []).append(name)
        keys = list(jobs)

        def run(key):
            param = params[jobs[key][0]]
            return key[1](param.detach().float().cpu().numpy())

        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            results = list(pool.map(run, keys))
        out = {}
        for key, values in zip(keys, results):
            weight = params[jobs[key][0]]
            quantized = torch.from_numpy(values).to(device=weight.device, dtype=weight.dtype)
            # q + (w - w.detach()): the value is q(w) bit for bit (w + (q - w).detach() rounds twice
            # in float arithmetic and misses q by an ulp here and there), the gradient the identity
            value = quantized + (weight - weight.detach()) if straight_through else quantized
            for name in jobs[key]:
                out[name] = value
        self.rounding_seconds += time.perf_counter() - started
        return out

    def forward(self, model, grid: Grid, **inputs):
        """`model(**inputs)` with `grid`'s rounded weights. `model` may be a DDP/Accelerate wrapper:
        the names then carry its `module.` prefix."""
        inner = getattr(model, "module", model)
        prefix = "module." if inner is not model else ""
        params = {prefix + name: value for name, value in self.rounded(inner, grid).items()}
        return functional_call(model, params, args=(), kwargs=inputs, tie_weights=False, strict=False)

    def record(self, history_entry: dict, epoch: int, steps: int, rounding_before: float) -> None:
        """Notes in an epoch's history entry its fake-quantized steps and rounding time per step: the
        history is checkpointed, so a resumed or data-parallel run still reports them."""
        if epoch >= self.first_epoch and steps:
            history_entry.update({"fake_quantized_steps": steps, "rounding_ms_per_step":
                                  round(1000 * (self.rounding_seconds - rounding_before) / steps, 1)})

    def summary(self, history: list[dict]) -> dict:
        """The grids (parameter names per type), the order they take turns in, the fake-quantized
        epochs' steps and mean rounding time per step, and whose soft labels they learnt, for a
        stage's result."""
        epochs = [entry for entry in history if "fake_quantized_steps" in entry]
        steps = sum(entry["fake_quantized_steps"] for entry in epochs)
        total_ms = sum(entry["rounding_ms_per_step"] * entry["fake_quantized_steps"] for entry in epochs)
        return {"grids": {grid.name: grid.summary() for grid in self.grids},
                "one_grid_per_step": [grid.name for grid in self.grids],
                "epochs": [entry["epoch"] for entry in epochs], "fake_quantized_steps": steps,
                "rounding_ms_per_step": round(total_ms / steps, 1) if steps else None,
                "soft_labels": self.soft_labels}


class _Generate(torch.nn.Module):
    """model.generate as a forward, so functional_call can sample with rounded weights."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model.generate(**kwargs)


@torch.no_grad()
def generate_rounded(quant_aware: QuantAware, model, grid: Grid | None, **kwargs):
    """`model.generate(**kwargs)` with `grid`'s rounded weights (plain generate without a grid)."""
    if grid is None:
        return model.generate(**kwargs)
    params = {"model." + name: value for name, value in
              quant_aware.rounded(model, grid, straight_through=False).items()}
    return functional_call(_Generate(model), params, args=(), kwargs=kwargs, tie_weights=False, strict=False)
