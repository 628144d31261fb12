"""Block-wise integer weights that minimize the rounding error, in onnxruntime's MatMulNBits layout.

    python -c "import numpy as np; from edgedistill.export.onnx.rounding import quantize_weight; \
print(quantize_weight(np.random.randn(64, 8).astype('float32'), 4, 32, True).scales.shape)"

onnxruntime's own quantizer rounds to nearest on a grid set by each block's extreme weight, so one
outlier decides the step for the other 31 weights. Here a few grids per block are tried and each
is refitted by least squares; the block keeps the one whose reconstruction error is smallest, with
each weight's error weighed by how much it matters (as llama.cpp's quantizers do for its k-quants
and, with an importance matrix, for Q4_0): `importance` is the mean squared input activation of each
input column on calibration text, so a column that carries large activations is rounded more
closely. Without it every column counts alike, which on the teacher was worse than rounding to
nearest (int4 perplexity ratio 1.21 against 1.16), so exports without calibration text do not come
here. The integers and scales are written in MatMulNBits'
layout, so the graph is the one onnxruntime's quantizer makes and its fast kernels run it
(integer zero points only: float zero points fall off the fast CPU path).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

# Grids tried per block: the step that puts the block's extreme weight on the grid's end, and steps
# up to this many tenths of a level finer or coarser (llama.cpp's make_qx_quants tries the same span).
SEARCH_TENTHS = 9


@dataclass(frozen=True)
class QuantizedWeight:
    """One MatMulNBits weight: data [N, blocks, block_size * bits / 8] uint8, scales [N, blocks],
    zero points packed per row (None: symmetric, the kernel's default mid-point)."""

    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None


def _best_grid(x: torch.Tensor, w: torch.Tensor, bits: int, symmetric: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levels [M, B] (0 .. 2^bits - 1), scales [M] and zero points [M] for blocks x [M, B] with
    error weights w [M, B]: of the grids tried, the one with the least weighted squared error."""
    top = 2 ** bits - 1
    if symmetric:
        # levels -2^(bits-1) .. 2^(bits-1) - 1 around the fixed zero point 2^(bits-1), as the kernel reads them
        half = 2 ** (bits - 1)
        extreme = x.gather(1, x.abs().argmax(1, keepdim=True)).squeeze(1)
        zero = torch.full_like(extreme, float(half))
    else:
        # the range always holds 0 (level = zero point), as in onnxruntime's and llama.cpp's quantizers
        low, high = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    best_score = torch.full((x.shape[0],), -1.0, dtype=x.dtype)
    best_levels = torch.zeros_like(x)
    best_scale = torch.zeros_like(best_score)
    best_zero = torch.zeros_like(best_score)
    for tenths in range(-SEARCH_TENTHS, SEARCH_TENTHS + 1):
        if symmetric:
            # the extreme weight lands on the grid's most negative level, which reaches furthest
            step = extreme / -(half + 0.1 * tenths)
        else:
            step = (high - low) / (top + 0.1 * tenths)
            zero = torch.clamp(torch.round(-low / torch.where(step == 0, 1.0, step)), 0, top)
        inverse = torch.where(step == 0, 0.0, 1.0 / step)
        levels = torch.clamp(torch.round(x * inverse[:, None]) + zero[:, None], 0, top)
        centred = levels - zero[:, None]
        # least-squares scale for these levels; the error it leaves is sum(w x²) - score
        wx_l = (w * x * centred).sum(1)
        w_l2 = (w * centred * centred).sum(1)
        score = torch.where(w_l2 > 0, wx_l * wx_l / torch.where(w_l2 > 0, w_l2, 1.0), 0.0)
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, torch.where(w_l2 > 0, wx_l / torch.where(w_l2 > 0, w_l2, 1.0), 0.0),
                                 best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_levels = torch.where(better[:, None], levels, best_levels)
    return best_levels, best_scale, best_zero


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit values along the last axis into bytes, the first of each pair in the low nibble."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


@contextmanager
def _one_thread():
    # The search is a string of cheap element-wise passes: on a busy machine torch's thread pool
    # spins and waits (measured: 1.5 s per 576x1536 matrix on 2 threads with another process
    # running, 0.13 s on one), and on a quiet one a second thread saves little.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def quantize_weight(weight: np.ndarray, bits: int, block_size: int, symmetric: bool,
                    importance: np.ndarray | None = None) -> QuantizedWeight:
    """MatMulNBits data for the [K, N] weight of `y = x @ weight`; `importance` [K] weighs each input column."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    k, n = weight.shape
    blocks = -(-k // block_size)
    # one row per output column, padded with zeros to whole blocks as the kernel expects
    rows = torch.zeros((n, blocks * block_size), dtype=torch.float32)
    rows[:, :k] = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float32))
    column_weight = torch.ones(blocks * block_size, dtype=torch.float32)
    if importance is not None:
        if importance.shape != (k,):
            raise ValueError(f"importance has shape {importance.shape}, the weight has {k} input columns")
        column_weight[:k] = torch.from_numpy(np.maximum(importance.astype(np.float32), 1e-12))
    x = rows.reshape(n * blocks, block_size)
    w = column_weight.reshape(blocks, block_size).repeat(n, 1)
    with _one_thread():
        levels, scales, zeros = _best_grid(x, w, bits, symmetric)

    levels = levels.to(torch.uint8).numpy().reshape(n, blocks, block_size)
    data = _pack_nibbles(levels) if bits == 4 else levels
    zero_points = None
    if not symmetric:
        zeros = zeros.to(torch.uint8).numpy().reshape(n, blocks)
        zero_points = _pack_nibbles(zeros) if bits == 4 else zeros
    return QuantizedWeight(data, scales.numpy().reshape(n, blocks).astype(np.float32), zero_points)


def dequantize(quantized: QuantizedWeight, k: int, bits: int, block_size: int) -> np.ndarray:
    """The [K, N] float32 weight MatMulNBits computes with (for tests, error measurements and the
    fake-quantized weights of quantization-aware training, edgedistill.export.quant_grids). In
    torch and float32: level - zero is an exact small integer, so each value is the one float32
    product of it and its block's scale, and an 8-bit lm_head (28 M weights) takes about a second
    where numpy's float64 broadcast took ten."""
    n, blocks = quantized.scales.shape
    # np.require copies only what torch cannot wrap: read-only arrays (initializers read from a file)
    data = torch.from_numpy(np.require(quantized.data, requirements=["C", "W"]))
    if bits == 4:
        levels = torch.stack([data & 15, data >> 4], -1).reshape(n, blocks, block_size)
    else:
        levels = data.reshape(n, blocks, block_size)
    if quantized.zero_points is None:
        zeros = torch.full((n, blocks), float(2 ** (bits - 1)))
    else:
        points = torch.from_numpy(np.require(quantized.zero_points, requirements=["C", "W"]))
        zeros = (torch.stack([points & 15, points >> 4], -1).reshape(n, -1)[:, :blocks] if bits == 4
                 else points.reshape(n, blocks)).to(torch.float32)
    scales = torch.from_numpy(np.require(quantized.scales, dtype=np.float32, requirements=["C", "W"]))
    values = (levels.to(torch.float32) - zeros[:, :, None]) * scales[:, :, None]
    return values.reshape(n, blocks * block_size)[:, :k].T.numpy()
