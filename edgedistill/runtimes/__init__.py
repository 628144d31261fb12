"""One interface over every runtime an artifact runs in: a GGUF file (llama.cpp), an ONNX export
folder (ONNX Runtime, GenAI for builder exports) or an HF folder (PyTorch).

    python -c "from edgedistill.runtimes import open_runtime; print(open_runtime('model.gguf').vocab_size)"

Every runtime greedily answers chat conversations (`generate`, `stream`) and scores token ids
(`score`): log-probs, not logits, so that runtimes whose logits differ by a constant per position
compare directly, and a caller never normalizes twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from edgedistill.errors import EdgedistillError

DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "fp16", "bf16")


class Runtime(Protocol):
    vocab_size: int  # the width of a row of score(): the model's output rows, padding included

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[tuple[str, bool]]:
        """Greedy answers, each with whether it ended by itself (False: cut at max_new_tokens)."""

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int) -> Iterator[str]:
        """The greedy answer to one conversation as text pieces, as its tokens come."""

    def prompt_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """The conversation rendered with the artifact's own chat template and tokenized by its tokenizer."""

    def is_end(self, token: int) -> bool:
        """Whether `token` ends an answer (generation stops there)."""

    def score(self, ids: list[int], *, last: int | None = None) -> np.ndarray:
        """float32 [positions, vocab_size] log-probs of the token after each position of `ids`, in one
        pass from an empty cache; `last`: only the last that many positions (cheaper where the
        runtime can skip the others' output layer)."""


ChatModel = Runtime  # the name before `score` and `stream` joined `generate`


def log_softmax(logits: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Log-probs of logits rows, normalized in float64 (a 262k vocabulary stays exact), as `dtype`."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))).astype(dtype, copy=False)


def scored_positions(ids: list[int], last: int | None) -> int:
    """How many positions score(ids, last=last) returns; refuses an empty or bad request."""
    if not ids:
        raise EdgedistillError("score() needs at least one token id", "pass a non-empty list of ids")
    if last is not None and not 0 < last:
        raise EdgedistillError(f"score(last={last}) asks for no positions", "pass last >= 1 or None (all)")
    return len(ids) if last is None else min(last, len(ids))


def stream_pieces(tokens: Iterable[int], decode: Callable[[list[int]], str]) -> Iterator[str]:
    """Text pieces of an answer whose tokens (end token left out) come one by one: each piece is
    what the text gained, and a piece that ends inside a multi-byte character waits for the rest."""
    emitted, ids = "", []
    for token in tokens:
        ids.append(token)
        # decoding the whole answer each time keeps multi-byte characters whole; answers are short,
        # so the quadratic cost does not matter
        text = decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text


def gguf_artifacts(*folders: Path) -> list[Path]:
    """The GGUF files of stage folders, folder by folder, largest (least quantized) first."""
    return [path for folder in folders for path in sorted(folder.glob("*.gguf"), key=lambda p: (-p.stat().st_size, p.name))]


def artifact_kind(path: Path) -> str:
    if path.suffix == ".gguf":
        return "gguf"
    # before the HF check: an optimum export holds a config.json too
    if path.is_dir() and ((path / "onnx_export.json").exists() or (path / "model.onnx").exists()):
        return "onnx"
    if path.is_dir() and (path / "config.json").exists():
        return "hf"
    raise EdgedistillError(f"{path} is neither a .gguf file, an ONNX export folder nor an HF model folder",
                           "pass a GGUF file, a folder with model.onnx, or a folder with config.json and *.safetensors")


def resolve_artifact(spec: Path | str) -> Path:
    """An artifact's path: a file or folder as given, or a built-in model's GGUF file."""
    from edgedistill.sources.builtin import BUILTIN_MODELS, builtin_gguf_path

    if str(spec) in BUILTIN_MODELS:
        return builtin_gguf_path(str(spec))
    path = Path(spec)
    if not path.exists():
        raise EdgedistillError(f"{path} does not exist",
                               f"pass a GGUF file, an HF folder or a built-in name ({', '.join(BUILTIN_MODELS)})")
    return path


def open_runtime(spec: Path | str, *, threads: int | None = None, device: str = "cpu", dtype: str = "fp32") -> Runtime:
    """The artifact `spec` (path or built-in name) in its runtime. `device` and `dtype` choose how
    PyTorch runs an HF folder; llama.cpp and ONNX Runtime run their files on the CPU as stored, with
    `threads` (default: all cores; PyTorch keeps its process-wide setting)."""
    if device not in DEVICES or dtype not in DTYPES:
        raise EdgedistillError(f"unknown device {device!r} or dtype {dtype!r}",
                               f"use a device in {', '.join(DEVICES)} and a dtype in {', '.join(DTYPES)}")
    path = resolve_artifact(spec)
    kind = artifact_kind(path)
    if kind != "hf" and (device, dtype) != ("cpu", "fp32"):
        raise EdgedistillError(f"{path} is a {kind} artifact: device and dtype choose how PyTorch runs an HF folder",
                               f"leave out device={device!r} and dtype={dtype!r}; the {kind} file's own "
                               "precision is what runs")
    if kind == "gguf":
        from edgedistill.runtimes.llamacpp import LlamaCppChatModel
        return LlamaCppChatModel(path, threads=threads)
    if kind == "onnx":
        from edgedistill.runtimes.onnx import OnnxChatModel
        return OnnxChatModel(path, threads=threads)
    from edgedistill.runtimes.pytorch import TorchChatModel
    return TorchChatModel(path, device=device, dtype=dtype)


open_chat_model = open_runtime
