"""One way to open any artifact for chat generation: a GGUF file (llama.cpp), an ONNX export folder
(ONNX Runtime GenAI) or an HF folder (PyTorch).

    python -c "from edgedistill.runtimes import open_chat_model; print(open_chat_model('model.gguf'))"
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from edgedistill.errors import EdgedistillError


class ChatModel(Protocol):
    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[tuple[str, bool]]:
        """Greedy answers, each with whether it ended by itself (False: cut at max_new_tokens)."""


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


def open_chat_model(spec: Path | str, *, threads: int | None = None) -> ChatModel:
    path = resolve_artifact(spec)
    kind = artifact_kind(path)
    if kind == "gguf":
        from edgedistill.runtimes.llamacpp import LlamaCppChatModel
        return LlamaCppChatModel(path, threads=threads)
    if kind == "onnx":
        from edgedistill.runtimes.onnx import OnnxChatModel
        return OnnxChatModel(path, threads=threads)
    from edgedistill.runtimes.pytorch import TorchChatModel
    return TorchChatModel(path)
