"""One interface over every runtime an artifact runs in: a GGUF file (llama.cpp), an ONNX export
folder (ONNX Runtime, GenAI for builder exports) or an HF folder (PyTorch).

    python -c "from edgedistill.runtimes import open_runtime; print(open_runtime('model.gguf').vocab_size)"

Every runtime greedily answers chat conversations (`generate`, `stream`) and scores token ids
(`score`): log-probs, not logits, so that runtimes whose logits differ by a constant per position
compare directly, and a caller never normalizes twice. Plain text outside a chat (the prompts of
lm-evaluation-harness tasks) goes through `encode`, `decode` and `greedy_ids`.

Every runtime runs on the CPU (the default) or a CUDA GPU: llama.cpp with every layer offloaded,
ONNX Runtime (GenAI) with its CUDA provider, PyTorch. The GPU builds of llama.cpp and ONNX Runtime
are installed by hand (README, "GPU runtimes"); `require_device` refuses a device an artifact's
runtime cannot use here, with the install command, before anything loads.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from edgedistill import layout
from edgedistill.errors import EdgedistillError
from edgedistill.runtimes.common import DEVICES, DTYPES



class Runtime(Protocol):
    vocab_size: int  # the width of a row of score(): the model's output rows, padding included
    context_length: int | None  # tokens one conversation may take, prompt and answer; None: no stated limit
    bos_id: int | None  # the tokenizer's beginning-of-text token; None: it has none
    eos_id: int  # the tokenizer's end-of-text token (is_end accepts it, and every other id that ends a turn)

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[tuple[str, bool]]:
        """Greedy answers, each with whether it ended by itself (False: cut at max_new_tokens)."""

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int) -> Iterator[str]:
        """The greedy answer to one conversation as text pieces, as its tokens come."""

    def prompt_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """The conversation rendered with the artifact's own chat template and tokenized by its tokenizer."""

    def is_end(self, token: int) -> bool:
        """Whether `token` ends an answer (generation stops there)."""

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        """Plain text (no chat template) tokenized by the artifact's tokenizer, special-token strings in
        it becoming their tokens; add_special: also the tokens the tokenizer's own config puts around a
        text (a BOS), as transformers' add_special_tokens=True does."""

    def decode(self, ids: list[int]) -> str:
        """The text of token ids, special tokens left out."""

    def greedy_ids(self, prompt: list[int], max_new_tokens: int) -> Iterator[int]:
        """The greedy continuation of the token ids `prompt`, one id at a time; an end token, when one
        comes, is the last yielded."""

    def score(self, ids: list[int], *, last: int | None = None) -> np.ndarray:
        """float32 [positions, vocab_size] log-probs of the token after each position of `ids`, in one
        pass from an empty cache; `last`: only the last that many positions (cheaper where the
        runtime can skip the others' output layer)."""


ChatModel = Runtime  # the name before `score` and `stream` joined `generate`


def gguf_artifacts(*folders: Path) -> list[Path]:
    """The GGUF files of stage folders, folder by folder, largest (least quantized) first."""
    return [path for folder in folders for path in sorted(folder.glob("*.gguf"), key=lambda p: (-p.stat().st_size, p.name))]


def artifact_kind(path: Path) -> str:
    if path.suffix == ".gguf":
        return "gguf"
    # before the HF check: an optimum export holds a config.json too
    if path.is_dir() and ((path / layout.ONNX_MANIFEST).exists() or (path / layout.ONNX_MODEL).exists()):
        return "onnx"
    if path.is_dir() and (path / layout.HF_CONFIG).exists():
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


def require_device(path: Path, device: str) -> None:
    """Refuses `device` ("cpu" or "cuda") when the runtime of the artifact at `path` cannot run there,
    naming what to install; cheap, nothing is loaded (bench and eval check every artifact first)."""
    if device not in DEVICES:
        raise EdgedistillError(f"unknown device {device!r}", f"use a device in {', '.join(DEVICES)}")
    if device == "cpu":
        return
    kind = artifact_kind(path)
    if kind == "gguf":
        from edgedistill.runtimes.llamacpp import gpu_layers
        gpu_layers(device)
    elif kind == "onnx":
        from edgedistill.runtimes.onnx import require_cuda
        require_cuda(path)
    else:
        from edgedistill.runtimes.torch_decode import require_device as require_torch_device
        require_torch_device(device)


def open_runtime(spec: Path | str, *, threads: int | None = None, device: str = "cpu", dtype: str = "fp32") -> Runtime:
    """The artifact `spec` (path or built-in name) in its runtime on `device`. `dtype` chooses how
    PyTorch runs an HF folder; llama.cpp and ONNX Runtime run their files in the precision stored, with
    `threads` (default: all cores; PyTorch keeps its process-wide setting)."""
    if device not in DEVICES or dtype not in DTYPES:
        raise EdgedistillError(f"unknown device {device!r} or dtype {dtype!r}",
                               f"use a device in {', '.join(DEVICES)} and a dtype in {', '.join(DTYPES)}")
    path = resolve_artifact(spec)
    kind = artifact_kind(path)
    if kind != "hf" and dtype != "fp32":
        raise EdgedistillError(f"dtype={dtype!r} for {path}, a {kind} artifact: device and dtype choose how PyTorch "
                               f"runs an HF folder, and a {kind} file runs in the precision it stores",
                               f"leave out dtype={dtype!r} (device={device!r} still applies)")
    if kind == "gguf":
        from edgedistill.runtimes.llamacpp import LlamaCppChatModel
        return LlamaCppChatModel(path, threads=threads, device=device)
    if kind == "onnx":
        from edgedistill.runtimes.onnx import OnnxChatModel
        return OnnxChatModel(path, threads=threads, device=device)
    from edgedistill.runtimes.pytorch import TorchChatModel
    return TorchChatModel(path, device=device, dtype=dtype)


open_chat_model = open_runtime
