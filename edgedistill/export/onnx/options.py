"""What an ONNX export can be asked for: precisions, export paths, quantization options, architectures.

    python -c "from edgedistill.export.onnx.options import QuantOptions; print(QuantOptions(block_size=64))"

The single source of truth for names: the exporter, the manifest and the CLI all use these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgedistill.errors import EdgedistillError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PATHS = ("auto", "builder", "optimum")
# The manifest every export folder carries; its presence is what marks a folder as an ONNX export.
MANIFEST = "onnx_export.json"
MODEL_FILE = "model.onnx"
# Weights always live in one external data file beside the graph, so a model of any size loads
# (a protobuf holds at most 2 GB) and the graph file stays small.
DATA_FILE = "model.onnx.data"

# HF `architectures[0]` → what the onnxruntime-genai 0.12 model builder calls it (its
# builder.create_model dispatch), text decoders only. Llama, Qwen2 and Qwen3 are tested here on tiny
# models (tests/test_export_onnx.py) and the Llama family on the real teacher and its students.
BUILDER_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "GraniteForCausalLM": "granite",
    "OlmoForCausalLM": "olmo",
    "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3",
    "NemotronForCausalLM": "nemotron",
    "SmolLM3ForCausalLM": "smollm3",
}
# Precisions the builder path makes; int8 is the builder's fp32 graph quantized by edgedistill.
BUILDER_PRECISIONS = ("fp32", "fp16", "int8", "int4")
# optimum exports on CPU in float32 (its fp16 export needs a CUDA device); int8/int4 are quantized after.
OPTIMUM_PRECISIONS = ("fp32", "int8", "int4")

BLOCK_SIZES = (16, 32, 64, 128, 256)
# MatMulNBits' accuracy_level: the type its activations are computed in. 0 lets the kernel choose,
# 1 fp32, 2 fp16, 3 bf16, 4 int8 (the builder's CPU default: fastest, and the least exact).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
LM_HEAD_BITS = (4, 8, None)


@dataclass(frozen=True)
class QuantOptions:
    """How int8/int4 weights are quantized (MatMulNBits, round to nearest, block-wise).

    `lm_head_bits`: 8 keeps the output projection at int8 (the largest matrix of a small model and
    the one whose error every logit sees), 4 quantizes it like the rest, None leaves it in float.
    `quantize_embeddings`: None (default) reads a tied model's embeddings from its quantized lm_head
    (one shared copy, when the lm_head is quantized and symmetric) and keeps other tables in float;
    True also quantizes a table of its own (to int4, the only width GatherBlockQuantized reads);
    False keeps the table in float. `accuracy_level` None means the CPU default, 4 (int8 activations).
    """

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None
    lm_head_bits: int | None = 8
    quantize_embeddings: bool | None = None

    def __post_init__(self):
        if self.block_size not in BLOCK_SIZES:
            raise EdgedistillError(f"block_size {self.block_size!r} is not supported",
                                   f"use one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVELS:
            raise EdgedistillError(f"accuracy_level {self.accuracy_level!r} is not supported",
                                   "use 0 (kernel's choice), 1 (fp32), 2 (fp16), 3 (bf16), 4 (int8) or None (4)")
        if self.lm_head_bits not in LM_HEAD_BITS:
            raise EdgedistillError(f"lm_head_bits {self.lm_head_bits!r} is not supported",
                                   "use 8, 4 or None (keep the lm_head in float)")
        if not isinstance(self.symmetric, bool):
            raise EdgedistillError(f"symmetric {self.symmetric!r} must be True or False")
        if self.quantize_embeddings not in (None, True, False):
            raise EdgedistillError(f"quantize_embeddings {self.quantize_embeddings!r} must be None, True or False")

    @property
    def effective_accuracy_level(self) -> int:
        return 4 if self.accuracy_level is None else self.accuracy_level

    def record(self, precision: str) -> dict:
        """The options as the manifest records them: every one, with the accuracy level resolved."""
        bits = {"int4": 4, "int8": 8}[precision]
        return {**asdict(self), "accuracy_level": self.effective_accuracy_level, "bits": bits,
                "lm_head_bits": None if self.lm_head_bits is None else max(bits, self.lm_head_bits),
                "op": "MatMulNBits"}


def check_precision(precision: str) -> str:
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise EdgedistillError(f"unknown ONNX precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    return precision
