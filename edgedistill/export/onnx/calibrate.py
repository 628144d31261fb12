"""Importance of each weight column for int4 rounding, measured on the exported float graph itself.

    python -c "from edgedistill.export.onnx.calibrate import activation_importance; \
print(activation_importance('fp32-export', [[1, 2, 3]]))"

For every MatMul with a constant weight, the mean of x² per input column over calibration tokens
(llama.cpp's imatrix, here for ONNX): edgedistill.export.onnx.rounding weighs rounding errors by
it. It is measured in onnxruntime on the float32 graph about to be quantized, so it needs no map
from HF module names to the exporter's fused weights (the builder's qkv_proj, say) and works the
same for the builder's graphs and optimum's. The graph is copied with each MatMul input added as an
output; the copy reads the same external weight file, so no weight is loaded twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgedistill.errors import EdgedistillError
from edgedistill.export.onnx.options import MODEL_FILE

PROBE_FILE = "calibration.onnx"


def weight_inputs(graph: onnx.GraphProto) -> dict[str, str]:
    """Weight initializer name → the activation it multiplies, for every MatMul with a constant weight."""
    constants = {init.name for init in graph.initializer}
    return {node.input[1]: node.input[0] for node in graph.node
            if node.op_type == "MatMul" and node.input[1] in constants}


def activation_importance(float_folder: Path, chunks: list[list[int]]) -> dict[str, np.ndarray]:
    """Mean squared input activation per column for every constant-weight MatMul of the float32
    decoder in `float_folder` (model.onnx + its data), over the token chunks `chunks`."""
    from edgedistill.runtimes.onnx import OnnxDecoder

    float_folder = Path(float_folder)
    if not chunks or not any(chunks):
        raise EdgedistillError("the calibration text is empty", "pass task text, e.g. a run's generate/train.jsonl")
    graph_only = onnx.load(str(float_folder / MODEL_FILE), load_external_data=False)
    inputs = weight_inputs(graph_only.graph)
    activations = sorted(set(inputs.values()))
    present = {out.name for out in graph_only.graph.output}
    graph_only.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                                   for name in activations if name not in present)
    probe = float_folder / PROBE_FILE
    onnx.save(graph_only, str(probe))
    try:
        decoder = OnnxDecoder(float_folder, model_file=PROBE_FILE)
        sums = {name: None for name in activations}
        tokens = 0
        for chunk in chunks:
            outputs = decoder.session.run(activations, decoder.feed(chunk, decoder.empty_past(), 0))
            for name, value in zip(activations, outputs):
                value = value.reshape(-1, value.shape[-1]).astype(np.float64)
                squares = (value * value).sum(0)
                sums[name] = squares if sums[name] is None else sums[name] + squares
            tokens += len(chunk)
    finally:
        probe.unlink(missing_ok=True)
    return {weight: (sums[activation] / tokens).astype(np.float32) for weight, activation in inputs.items()}
