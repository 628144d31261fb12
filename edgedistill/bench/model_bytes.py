"""Bytes of weights a model reads to decode one token, for the memory-bandwidth bound of decoding.

    python -c "from edgedistill.bench.model_bytes import gguf_bytes_per_token as f; print(f('model.gguf'))"

Batch-1 decoding runs every matrix over one token, so it reads every weight once per token, with
two exceptions: a lookup table (the token embedding, the rotary cos/sin caches of ONNX Runtime's
GroupQueryAttention) is read one row per token. A tied model's embedding table is also the output
matrix, read whole. What this approximates: the KV cache, activations and the runtime's own
buffers are not counted (for a small model at a few hundred tokens of context the KV cache is a
few percent of the weights); nor is a cache that holds part of the weights between tokens (a model
smaller than the last-level cache can decode faster than the bound).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from edgedistill.layout import ONNX_MODEL

GGUF_TOKEN_EMBEDDING = "token_embd.weight"
GGUF_OUTPUT = "output.weight"
# op type -> the input positions that are indexed by position or token, not read whole
ONNX_LOOKUP_INPUTS = {"Gather": (0,), "GatherBlockQuantized": (0, 2, 3)}
ONNX_POSITION_LOOKUPS = {"GroupQueryAttention": (7, 8)}  # cos_cache, sin_cache
# nodes that pass a lookup table through on its way to the Gather (reshaping, dequantizing)
ONNX_TABLE_PASSTHROUGH = {"Reshape", "Transpose", "Cast", "DequantizeLinear", "Identity", "Squeeze", "Unsqueeze"}


def gguf_bytes_per_token(path: Path) -> int:
    """Tensor data bytes of a GGUF, the token embedding counted as one row unless it is also the output."""
    from edgedistill.sources.gguf import open_gguf

    tensors = {t.name: t for t in open_gguf(Path(path)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embedding = tensors.get(GGUF_TOKEN_EMBEDDING)
    if embedding is not None and GGUF_OUTPUT in tensors:
        rows = int(embedding.n_elements) // int(embedding.shape[0])  # shape is ggml's: [width, rows]
        total -= int(embedding.n_bytes) - int(embedding.n_bytes) // rows
    return total


def _onnx_initializer_bytes(tensor) -> int:
    external = {entry.key: entry.value for entry in tensor.external_data}
    if "length" in external:
        return int(external["length"])
    if tensor.raw_data:
        return len(tensor.raw_data)
    import onnx

    return onnx.numpy_helper.to_array(tensor).nbytes


def onnx_bytes_per_token(folder: Path) -> int:
    """Initializer bytes of an ONNX export (model.onnx and its model.onnx.data), lookup tables
    counted as one row each unless another node also reads them whole (a tied output matrix)."""
    import onnx

    graph = onnx.load(str(Path(folder) / ONNX_MODEL), load_external_data=False).graph
    sizes = {t.name: _onnx_initializer_bytes(t) for t in graph.initializer}
    rows = {t.name: (t.dims[0] if t.dims else 1) for t in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def table_initializers(name: str, path: list) -> list[tuple[str, list]]:
        """The initializers a lookup's table input comes from, each with the nodes on the way."""
        if name in sizes:
            return [(name, path)]
        node = producer.get(name)
        if node is None or node.op_type not in ONNX_TABLE_PASSTHROUGH:
            return []
        # a Reshape's shape or a Squeeze's axes is no part of the table; a DequantizeLinear's scales are
        sources = node.input if node.op_type == "DequantizeLinear" else node.input[:1]
        return [found for source in sources if source for found in table_initializers(source, path + [node])]

    lookups = []
    for node in graph.node:
        positions = ONNX_LOOKUP_INPUTS.get(node.op_type, ()) if "input_ids" in node.input else \
            ONNX_POSITION_LOOKUPS.get(node.op_type, ())
        lookups += [(node, node.input[i]) for i in positions if i < len(node.input) and node.input[i]]
    # per initializer, the nodes that only look rows up in it (the lookups and the nodes on their way)
    row_readers = defaultdict(set)
    for lookup, table in lookups:
        for name, path in table_initializers(table, []):
            row_readers[name].update(id(node) for node in [lookup, *path])
    # one that any other node reads whole is a matrix too (a tied output matrix)
    by_row = {name for name, readers in row_readers.items() if all(id(c) in readers for c in consumers[name])}
    return sum(size // max(rows[name], 1) if name in by_row else size for name, size in sizes.items())


def torch_bytes_per_token(model) -> int:
    """Parameter bytes of a loaded PyTorch model, as it sits in memory (its dtype), the input
    embedding counted as one row unless it is tied to the output matrix."""
    params = {p.data_ptr(): p for p in model.parameters()}  # a tied weight once
    total = sum(p.numel() * p.element_size() for p in params.values())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != embedding.data_ptr():
        total -= (embedding.shape[0] - 1) * embedding.shape[1] * embedding.element_size()
    return total
