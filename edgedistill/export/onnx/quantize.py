"""Weight-only int8/int4 quantization of an exported float32 ONNX decoder (MatMulNBits, block-wise).

    python -c "from edgedistill.export.onnx.quantize import quantize_onnx; from edgedistill.export.onnx.options \
import QuantOptions; quantize_onnx('fp32/model.onnx', 'int4/model.onnx', 4, QuantOptions(), tied=True)"

Both export paths get the same quantization, so an int4 from the builder and one from optimum differ
only in their graphs. Weights become MatMulNBits (what onnxruntime's CPU kernels and
onnxruntime-genai run fastest); activations stay float (a decoder's activations have outliers that
per-tensor int8 handles badly). onnxruntime's quantizer makes the graph and rounds to nearest; given
calibration statistics, the 4-bit weights are then rounded again to the least importance-weighted
error (edgedistill.export.onnx.rounding), in the same layout: on the teacher this took the int4
perplexity ratio from 1.164 to about 1.02 and the KL to fp32 from 0.38 to 0.21.

The lm_head is quantized in a pass of its own at `lm_head_bits`. The embedding table is either left
in float, or, for tied embeddings with a symmetric quantized lm_head, read from the lm_head's
quantized weights through GatherBlockQuantized (one copy, as the builder does for its own int4), or
quantized to int4 on its own (GatherBlockQuantized supports 4 bits only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgedistill.errors import EdgedistillError
from edgedistill.export.onnx.options import DATA_FILE, QuantOptions
from edgedistill.export.onnx.rounding import quantize_weight


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def lm_head_node(graph: onnx.GraphProto) -> onnx.NodeProto:
    """The MatMul that makes the logits: followed back from the `logits` output through casts."""
    producers = _producers(graph)
    node = producers.get("logits")
    while node is not None and node.op_type in ("Cast", "Identity", "Reshape", "Add"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "MatMul":
        raise EdgedistillError("cannot find the lm_head MatMul that makes the `logits` output of the ONNX graph",
                               "export with lm_head_bits=None (the lm_head is then left in float)")
    return node


def embedding_node(graph: onnx.GraphProto, vocab: int) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None]:
    """The Gather that looks token ids up in a [vocab, hidden] table (None if there is none), and
    the Transpose feeding it when the table is a tied lm_head weight."""
    producers, inits = _producers(graph), _initializers(graph)
    for node in graph.node:
        if node.op_type != "Gather":
            continue
        feeder = producers.get(node.input[0])
        if feeder is not None and feeder.op_type == "Transpose" and feeder.input[0] in inits:
            if inits[feeder.input[0]].dims[-1] == vocab:
                return node, feeder
        elif node.input[0] in inits and len(inits[node.input[0]].dims) == 2 and inits[node.input[0]].dims[0] == vocab:
            return node, None
    return None, None


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


def _weight_only(model: onnx.ModelProto, bits: int, options: QuantOptions, *, include=None, exclude=(),
                 op_types=("MatMul",)) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=options.block_size, is_symmetric=options.symmetric,
                                          accuracy_level=options.effective_accuracy_level, bits=bits,
                                          op_types_to_quantize=op_types)
    quantizer = MatMulNBitsQuantizer(model, nodes_to_include=include, nodes_to_exclude=list(exclude),
                                     algo_config=config)
    # the quantizer logs a line per node at INFO
    level = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").level
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    try:
        # the Gather quantizer divides by each block's scale, zero for an all-zero block (a padded
        # vocabulary row), before masking the result: numpy's warning there is noise
        with np.errstate(invalid="ignore", divide="ignore"):
            quantizer.process()
    finally:
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(level)
    return quantizer.model.model


def _share_embeddings(graph: onnx.GraphProto, gather: onnx.NodeProto, transpose: onnx.NodeProto,
                      head: onnx.NodeProto, bits: int, block_size: int) -> None:
    """Replace Transpose(lm_head weight) → Gather with GatherBlockQuantized on the lm_head's quantized data."""
    inits = _initializers(graph)
    data, scales = inits[head.input[1]], inits[head.input[2]]
    vocab, blocks, blob = data.dims
    flat = blocks * blob
    new_nodes = [
        helper.make_node("Reshape", [data.name, gather.name + "/data_shape"], [gather.name + "/data"]),
        helper.make_node("Reshape", [scales.name, gather.name + "/scales_shape"], [gather.name + "/scales"]),
        helper.make_node("GatherBlockQuantized", [gather.name + "/data", gather.input[1], gather.name + "/scales"],
                         list(gather.output), name=gather.name + "_shared", domain="com.microsoft", bits=bits,
                         block_size=block_size, gather_axis=0, quantize_axis=1),
    ]
    graph.initializer.extend([
        numpy_helper.from_array(np.array([vocab, flat], np.int64), gather.name + "/data_shape"),
        numpy_helper.from_array(np.array([vocab, blocks], np.int64), gather.name + "/scales_shape"),
    ])
    index = min(list(graph.node).index(gather), list(graph.node).index(transpose))
    for node in (gather, transpose):
        graph.node.remove(node)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(index + offset, node)


def _untie_embeddings(graph: onnx.GraphProto, gather: onnx.NodeProto, transpose: onnx.NodeProto) -> None:
    """Give the Gather its own [vocab, hidden] table instead of a Transpose of the lm_head weight,
    so the quantizer (which quantizes constant Gather data only) can take it."""
    source = _initializers(graph)[transpose.input[0]]
    table = numpy_helper.to_array(source).T.copy()
    graph.initializer.append(numpy_helper.from_array(table, source.name + ".embedding"))
    gather.input[0] = source.name + ".embedding"
    graph.node.remove(transpose)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _round_by_importance(model: onnx.ModelProto, src: Path, importance: dict[str, np.ndarray],
                         options: QuantOptions) -> int:
    """Give every 4-bit MatMulNBits weight that onnxruntime rounded to nearest the integers and scales
    of edgedistill.export.onnx.rounding instead, weighed by `importance`; returns how many.

    The graph stays onnxruntime's; only the initializers' contents change. Float weights are read
    one at a time from `src`'s external data, so the float model is never in memory twice."""
    source = {init.name: init for init in onnx.load(str(src), load_external_data=False).graph.initializer}
    inits = _initializers(model.graph)
    rounded = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or helper.get_node_attr_value(node, "bits") != 4:
            continue
        # onnxruntime's quantizer names a weight's int4 data <weight>_Q4
        weight = node.input[1].removesuffix("_Q4")
        if weight not in source or weight not in importance:
            raise EdgedistillError(f"no float weight or calibration statistics for the int4 weight {node.input[1]}",
                                   "export without calibration (round to nearest) and report this as a bug")
        values = numpy_helper.to_array(source[weight], base_dir=str(Path(src).parent))
        quantized = quantize_weight(values, 4, options.block_size, options.symmetric, importance[weight])
        scales_dtype = numpy_helper.to_array(inits[node.input[2]]).dtype
        updates = [(node.input[1], quantized.data), (node.input[2], quantized.scales.astype(scales_dtype))]
        if quantized.zero_points is not None:
            updates.append((node.input[3], quantized.zero_points))
        for name, array in updates:
            if tuple(inits[name].dims) != array.shape:
                raise EdgedistillError(f"{name}: onnxruntime's layout {tuple(inits[name].dims)} is not {array.shape}",
                                       "export without calibration and report this as a bug")
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
        rounded += 1
    return rounded


def quantize_onnx(src: Path, dst: Path, bits: int, options: QuantOptions, *, tied: bool,
                  hidden_size: int | None = None, importance: dict[str, np.ndarray] | None = None) -> dict:
    """Quantize the float32 decoder `src` (model.onnx with its data) to `bits` at `dst`; returns what was done.

    `tied`: the model ties its embeddings to its lm_head (config.json's tie_word_embeddings).
    `importance`: mean squared input activation per column by weight name
    (edgedistill.export.onnx.calibrate); with it, 4-bit weights are rounded to the least
    importance-weighted error instead of to nearest.
    """
    model = onnx.load(str(src))
    graph = model.graph
    head_name = lm_head_node(graph).name
    model = _weight_only(model, bits, options, exclude=[head_name])
    lm_head_bits = None
    if options.lm_head_bits is not None:
        lm_head_bits = max(bits, options.lm_head_bits)
        model = _weight_only(model, lm_head_bits, options, include=[head_name])
    rounded = _round_by_importance(model, src, importance, options) if importance is not None else 0
    graph = model.graph

    embeddings = "float"
    want = options.quantize_embeddings
    head = next(n for n in graph.node if n.name.startswith(head_name))
    vocab = next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim[-1].dim_value
    gather, transpose = embedding_node(graph, vocab)
    if want and gather is None:
        raise EdgedistillError("cannot find the embedding table (a Gather on a [vocab, hidden] weight) in the ONNX graph",
                               "export with quantize_embeddings=None or False")
    can_share = (tied and transpose is not None and head.op_type == "MatMulNBits" and options.symmetric
                 and (hidden_size is None or hidden_size % options.block_size == 0))
    if want is not False and can_share:
        _share_embeddings(graph, gather, transpose, head, lm_head_bits, options.block_size)
        embeddings = f"int{lm_head_bits}, shared with the lm_head"
    elif want:
        if transpose is not None:
            _untie_embeddings(graph, gather, transpose)
        model = _weight_only(model, 4, options, include=[gather.name], op_types=("Gather",))
        embeddings = "int4"
    _drop_unused_initializers(model.graph)

    dst = Path(dst)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    # 8-bit weights stay rounded to nearest: their error is already small (teacher int8 KL 0.005)
    algorithm = "importance-weighted search (4-bit), rtn (8-bit)" if rounded else "rtn"
    return {"lm_head_bits": lm_head_bits, "embeddings": embeddings, "algorithm": algorithm,
            "importance_rounded_weights": rounded}
