"""The exporters' own rounding as grids for quantization-aware distillation (edgedistill.distill.quant_aware).

    python -c "from edgedistill.export.quant_grids import build_quant_aware; help(build_quant_aware)"

A grid maps each HF parameter name of the student to the exact rounding an export applies to it:
GGUF types with llama.cpp's per-tensor choice read back from a file quantized by the exporter
(edgedistill.export.gguf.ggml_quants), the ONNX int4/int8 grids with onnxruntime's MatMulNBits
quantizer as edgedistill.export.onnx.quantize calls it. See edgedistill.distill.quant_aware for
what is done with them and why torchao's fake quantizers are not used.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgedistill.distill.quant_aware import Grid, QuantAware, Rounding
from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import arch
from edgedistill.export.gguf.ggml_quants import round_trip, tensor_types
from edgedistill.export.gguf.quantize import quantize_gguf
from edgedistill.export.gguf.writer import plan_tensors, write_gguf
from edgedistill.export.onnx.options import QuantOptions
from edgedistill.export.onnx.rounding import QuantizedWeight, dequantize
from edgedistill.layout import HF_CONFIG
from edgedistill.recipe import ONNX_GRIDS, DistillConfig, ExportConfig, quant_aware_grids


@dataclass(frozen=True)
class WeightRounding:
    """How one weight [out, in] is rounded: `ggml` type name (after float16, as the F16 file
    holds it), or onnxruntime's `bits`-bit blocks (`gather`: its int4 Gather quantizer)."""

    ggml: str | None = None
    bits: int | None = None
    block_size: int = 32
    symmetric: bool = True
    gather: bool = False

    @property
    def label(self) -> str:
        if self.ggml is not None:
            return self.ggml
        return f"int{self.bits}" + (" gather" if self.gather else "")

    def __call__(self, weight: np.ndarray) -> np.ndarray:
        if self.ggml is not None:
            return round_trip(weight.astype(np.float16).astype(np.float32), self.ggml)
        return _gather_round_trip(weight, self) if self.gather else _matmul_round_trip(weight, self)


def _matmul_round_trip(weight: np.ndarray, rounding: WeightRounding) -> np.ndarray:
    """onnxruntime's MatMulNBits rounding of the HF weight [N, K] (the graph's [K, N] MatMul
    weight), dequantized as the kernel reads it."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  DefaultWeightOnlyQuantizer)

    config = DefaultWeightOnlyQuantConfig(block_size=rounding.block_size, is_symmetric=rounding.symmetric,
                                          bits=rounding.bits)
    matrix = np.ascontiguousarray(weight.T, dtype=np.float32)
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(matrix)
    quantized = QuantizedWeight(packed, scales, None if rounding.symmetric else zero_points)
    return dequantize(quantized, matrix.shape[0], rounding.bits, rounding.block_size).T


def _gather_round_trip(table: np.ndarray, rounding: WeightRounding) -> np.ndarray:
    """onnxruntime's int4 Gather quantizer on an embedding table [vocab, hidden] (blocks along hidden)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    table = np.ascontiguousarray(table, dtype=np.float32)
    packed, scales, zero_points = DefaultWeightOnlyQuantizer.quantize_ndarray(table, 1, rounding.block_size,
                                                                            rounding.symmetric)
    levels = np.stack([packed & 15, packed >> 4], -1).reshape(-1)[:table.size].astype(np.int16)
    if rounding.symmetric:
        centred = np.where(levels >= 8, levels - 16, levels)
    else:
        zeros = np.stack([zero_points & 15, zero_points >> 4], -1).reshape(-1)[:scales.size].astype(np.int16)
        centred = levels - np.repeat(zeros.reshape(scales.shape), rounding.block_size, 1)[:, :table.shape[1]].reshape(-1)
    step = np.repeat(scales, rounding.block_size, 1)[:, :table.shape[1]]
    return (centred.reshape(table.shape).astype(np.float32) * step).astype(np.float32)


def _aliases(model) -> dict[str, list[str]]:
    """Every name of each parameter, by its first name (a tied lm_head is the embedding's second name)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {group[0]: group for group in names.values()}


def gguf_grid(model, folder: Path, qtype: str, f16: Path, scratch: Path) -> Grid:
    """The rounding of `qtype` for `model` (saved in `folder`): llama.cpp's type per tensor, read
    from `f16` (the exporter's F16 GGUF of `folder`) quantized by the exporter's quantize_gguf."""
    quantized = f16 if qtype == "F16" else quantize_gguf(f16, scratch / f"student-{qtype.lower()}.gguf", qtype)
    types = tensor_types(quantized)
    config = json.loads((folder / HF_CONFIG).read_text(encoding="utf-8"))
    spec, dims = arch.gguf_layout(config, folder / HF_CONFIG)
    tied = bool(config.get("tie_word_embeddings", spec.tied_default))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    weights = {}
    for planned in plan_tensors(spec, dims, tied, shapes, folder):
        # float tensors (norms) are not rounded; the rest as the file stores them
        if types[planned.gguf_name] != "F32" and planned.values is None:
            weights[planned.source] = WeightRounding(ggml=types[planned.gguf_name])
    return Grid(qtype, _with_aliases(model, weights))


def onnx_grid(model, grid: str, options: QuantOptions) -> Grid:
    """The rounding of `grid` (onnx-int4, onnx-int8) as edgedistill.export.onnx.quantize applies it."""
    bits = {"int4": 4, "int8": 8}[ONNX_GRIDS[grid]]
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    head_name, table_name = names[id(head)] + ".weight", names[id(table)] + ".weight"
    tied = head.weight is table.weight
    rounding = WeightRounding(bits=bits, block_size=options.block_size, symmetric=options.symmetric)
    weights = {f"{name}.weight": rounding for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not head}
    head_rounding = None if options.lm_head_bits is None else WeightRounding(
        bits=max(bits, options.lm_head_bits), block_size=options.block_size, symmetric=options.symmetric)
    if head_rounding is not None:
        weights[head_name] = head_rounding
    shared = (tied and head_rounding is not None and options.symmetric
              and table.weight.shape[1] % options.block_size == 0)
    if options.quantize_embeddings is not False and shared:
        weights[table_name] = head_rounding
    elif options.quantize_embeddings:
        weights[table_name] = WeightRounding(bits=4, block_size=options.block_size, symmetric=options.symmetric,
                                             gather=True)
    if tied and weights.get(table_name) != weights.get(head_name):
        # one parameter, two roundings: functional_call is given both names apart (untied)
        return Grid(grid, weights)
    return Grid(grid, _with_aliases(model, weights))


def _with_aliases(model, weights: dict[str, Rounding]) -> dict[str, Rounding]:
    out = dict(weights)
    for group in _aliases(model).values():
        found = [weights[name] for name in group if name in weights]
        for name in group:
            if found:
                out[name] = found[0]
    return out


def build_quant_aware(model, folder: Path, distill: DistillConfig, export: ExportConfig, *,
                      first_epoch: int) -> QuantAware:
    """The grids of distill.quant_aware for `model` (saved in `folder`), fake-quantized from `first_epoch`."""
    grids = []
    names = quant_aware_grids(distill, export)
    gguf_names = [name for name in names if name not in ONNX_GRIDS]
    options = QuantOptions(**export.onnx_options.model_dump(exclude={"calibrate"}))
    with tempfile.TemporaryDirectory(prefix="quant-aware-") as scratch:
        f16 = write_gguf(folder, Path(scratch) / "student-f16.gguf") if gguf_names else None
        for name in names:
            grids.append(onnx_grid(model, name, options) if name in ONNX_GRIDS
                         else gguf_grid(model, folder, name, f16, Path(scratch)))
    for grid in grids:
        if not grid.weights:
            raise EdgedistillError(f"distill.quant_aware: grid {grid.name} rounds no weight of this student",
                                   "leave it out of distill.quant_aware.grids")
    return QuantAware(grids, first_epoch=first_epoch, soft_labels=distill.quant_aware.soft_labels,
                      learning_rate=distill.quant_aware.learning_rate)
