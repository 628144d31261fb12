"""What an ONNX export can be asked for: precisions, export paths, quantization options, architectures.

    python -c "from edgedistill.export.onnx.options import QuantOptions; print(QuantOptions(block_size=64))"

The single source of truth for names: the exporter, the manifest and the CLI all use these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgedistill import layout
from edgedistill.errors import EdgedistillError
from edgedistill.formats import ONNX_PRECISIONS

PATHS = ("auto", "builder", "optimum")
# The manifest every export folder carries; its presence is what marks a folder as an ONNX export.
MANIFEST = layout.ONNX_MANIFEST
MODEL_FILE = layout.ONNX_MODEL
# Weights always live in one external data file beside the graph, so a model of any size loads
# (a protobuf holds at most 2 GB) and the graph file stays small.
DATA_FILE = layout.ONNX_DATA
# Tokens of calibration text used: on the teacher, 4,096 gave the same perplexity and KL after int4
# as 16,384 (tools/bench_onnx.py --calibration), in a quarter of the time.
CALIBRATION_TOKENS = 4096

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
    if precision not in ONNX_PRECISIONS:
        raise EdgedistillError(f"unknown ONNX precision {precision!r}", f"use one of {', '.join(ONNX_PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class OnnxExportOptions:
    """What export_onnx makes; checked on construction.

    `precision`: one of edgedistill.formats.ONNX_PRECISIONS. `path`: "builder" (onnxruntime-genai's
    model builder), "optimum" or "auto" (the builder when it supports the architecture). int8/int4
    weights: block_size .. quantize_embeddings, see QuantOptions. `calibration`: task text (a run's
    generate/train.jsonl, a .jsonl of {"text": ...} rows or a .txt file) whose first
    `calibration_tokens` tokens weigh the int4 rounding (edgedistill.export.onnx.calibrate);
    without it int4 weights are rounded to nearest. `verify` compares the export with its source in
    PyTorch (edgedistill.export.onnx.verify; `reference` reuses a reference_for() result) and
    refuses an export beyond its precision's bound. An existing output is an error unless
    `overwrite`; `progress` shows a bar and the verification table; `timeout_s` bounds the exporter.
    """

    precision: str = "int4"
    path: str = "auto"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None
    lm_head_bits: int | None = 8
    quantize_embeddings: bool | None = None
    calibration: Path | None = None
    calibration_tokens: int = CALIBRATION_TOKENS
    verify: bool = True
    reference: Any = None
    threads: int | None = None
    overwrite: bool = False
    progress: bool = False
    timeout_s: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "precision", check_precision(self.precision))
        if self.path not in PATHS:
            raise EdgedistillError(f"unknown ONNX export path {self.path!r}", f"use one of {', '.join(PATHS)}")
        self.quant  # noqa: B018 (QuantOptions checks its own fields)

    @property
    def quant(self) -> QuantOptions:
        return QuantOptions(self.block_size, self.symmetric, self.accuracy_level, self.lm_head_bits,
                            self.quantize_embeddings)
