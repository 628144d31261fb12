"""Importance-weighted int4/int8 rounding for MatMulNBits (edgedistill.export.onnx.rounding), run in
onnxruntime itself: the layout it writes is the one the kernel reads, and its error is never above
onnxruntime's own round-to-nearest on any block.

    .venv/bin/python -m pytest -q tests/test_onnx_rounding.py
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgedistill.export.onnx.rounding import dequantize, quantize_weight

BLOCK = 32


def _weights(k: int, n: int, seed: int = 0) -> np.ndarray:
    # heavy-tailed, like a trained matrix: a few large weights per block decide round-to-nearest's grid
    return np.random.default_rng(seed).standard_t(3, size=(k, n)).astype(np.float32)


def _run(node_inputs: list[str], initializers: list[onnx.TensorProto], k: int, n: int, bits: int) -> np.ndarray:
    """The [K, N] weight a MatMulNBits node computes with: its product with the identity."""
    node = helper.make_node("MatMulNBits", ["x", *node_inputs], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(k, dtype=np.float32)})[0]


def _onnxruntime_round_to_nearest(weight: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    k, n = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                              [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantizer = MatMulNBitsQuantizer(copy.deepcopy(model), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=BLOCK, is_symmetric=symmetric, bits=bits, accuracy_level=0))
    quantizer.process()
    quantized = quantizer.model.model
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(k, dtype=np.float32)})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.integration
def test_layout_is_what_the_kernel_reads(bits, symmetric):
    k, n = 80, 24  # 80 is not a whole number of blocks: the last block is padded
    weight = _weights(k, n)
    quantized = quantize_weight(weight, bits, BLOCK, symmetric, np.random.default_rng(1).random(k).astype(np.float32))
    initializers = [numpy_helper.from_array(quantized.data, "B"), numpy_helper.from_array(quantized.scales, "scales")]
    inputs = ["B", "scales"]
    if not symmetric:
        initializers.append(numpy_helper.from_array(quantized.zero_points, "zero_points"))
        inputs.append("zero_points")
    computed = _run(inputs, initializers, k, n, bits)
    np.testing.assert_allclose(computed, dequantize(quantized, k, bits, BLOCK), atol=1e-5)
    assert np.abs(computed - weight).max() < np.abs(weight).max() / (6 if bits == 4 else 100)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.integration
def test_never_worse_than_round_to_nearest_on_any_block(symmetric):
    k, n = 128, 48
    weight = _weights(k, n, seed=2)
    importance = np.random.default_rng(3).lognormal(0, 1.5, size=k).astype(np.float32)
    ours = dequantize(quantize_weight(weight, 4, BLOCK, symmetric, importance), k, 4, BLOCK)
    nearest = _onnxruntime_round_to_nearest(weight, 4, symmetric)

    def block_errors(approx):
        return ((approx - weight) ** 2 * importance[:, None]).reshape(k // BLOCK, BLOCK, n).sum(1)

    assert (block_errors(ours) <= block_errors(nearest) * (1 + 1e-5) + 1e-9).all()
    assert block_errors(ours).sum() < 0.9 * block_errors(nearest).sum()


@pytest.mark.unit
def test_importance_buys_precision_where_activations_are_large():
    k, n = 64, 64
    weight = _weights(k, n, seed=4)
    heavy = np.zeros(k, bool)
    heavy[::8] = True  # one column in eight carries large activations
    importance = np.where(heavy, 100.0, 1.0).astype(np.float32)
    plain = dequantize(quantize_weight(weight, 4, BLOCK, True), k, 4, BLOCK)
    weighted = dequantize(quantize_weight(weight, 4, BLOCK, True, importance), k, 4, BLOCK)
    assert ((weighted - weight)[heavy] ** 2).sum() < 0.8 * ((plain - weight)[heavy] ** 2).sum()


@pytest.mark.unit
def test_zero_and_constant_blocks():
    weight = np.zeros((64, 4), np.float32)
    weight[32:, 1] = 0.5  # a constant block
    for symmetric in (True, False):
        quantized = quantize_weight(weight, 4, BLOCK, symmetric)
        np.testing.assert_allclose(dequantize(quantized, 64, 4, BLOCK), weight, atol=1e-6)
        assert np.isfinite(quantized.scales).all()
