"""Model sources: a built-in name, an HF folder or a GGUF file, turned into one clean HF folder.

    python -c "from edgedistill.sources import resolve_source, materialize; \
materialize(resolve_source('smollm2-135m-instruct'), __import__('pathlib').Path('runs/teacher'))"

`resolve_source` checks a spec at once, so a typo fails before any slow work (an HF folder's
config, weights and tokenizer together: edgedistill.sources.hf). `materialize` writes
config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json (with
the chat template) and special_tokens_map.json; every later stage reads only such folders. The
weights keep the source's dtype: an HF folder's (config.json's torch_dtype, else its weights'), a
GGUF's F16 or BF16; quantized GGUF weights become float32, which holds them exactly. An HF folder
is loaded from its memory-mapped safetensors and written back without a second copy in memory.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from edgedistill.errors import EdgedistillError
from edgedistill.layout import HF_CONFIG
from edgedistill.sources.builtin import BUILTIN_MODELS, builtin_gguf_path, builtin_names
from edgedistill.sources.gguf import materialize_gguf, open_gguf, tokenizer_from_gguf
from edgedistill.sources.hf import check_hf_folder, text_decoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["ModelSource", "materialize", "resolve_source", "tokenizer_source"]

SourceKind = Literal["builtin", "hf", "gguf"]


@dataclass(frozen=True)
class ModelSource:
    """A checked model source. For "builtin", `path` is the GGUF file inside its package."""

    kind: SourceKind
    path: Path
    name: str


def resolve_source(spec: str) -> ModelSource:
    """Check `spec` (built-in name, HF folder, GGUF file) now; EdgedistillError says what is wrong."""
    spec = str(spec)
    if spec in BUILTIN_MODELS:
        path = builtin_gguf_path(spec)
        open_gguf(path)  # a damaged install fails here too; the reader is cached for later steps
        return ModelSource("builtin", path, spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        check_hf_folder(path)
        return ModelSource("hf", path, path.resolve().name)
    if path.is_file():
        open_gguf(path)
        return ModelSource("gguf", path, path.stem)
    if "/" not in spec and "\\" not in spec and not spec.endswith(".gguf"):
        raise EdgedistillError(
            f"'{spec}' is neither a built-in model nor an existing file or folder",
            hint=f"built-in models: {', '.join(builtin_names())}; or give the path to an HF folder "
            "or a .gguf file",
        )
    raise EdgedistillError(
        f"no such file or folder: {spec}",
        hint="nothing is downloaded at run time; give a local HF folder, a .gguf file or a built-in "
        f"name ({', '.join(builtin_names())})",
    )


def _empty_output_folder(out: Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EdgedistillError(
            f"{out} already exists and is not an empty folder",
            hint="choose a new output folder or remove this one",
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def materialize(
    source: ModelSource, out: Path, *, trust_remote_code: bool = False, progress: bool = True
) -> Path:
    """Write `source` as an HF folder (safetensors in the source's dtype, fast tokenizer, chat template) into `out`."""
    out = _empty_output_folder(out)
    if source.kind in ("builtin", "gguf"):
        return materialize_gguf(source.path, out, progress=progress)
    return _materialize_hf(source.path, out, trust_remote_code=trust_remote_code, progress=progress)


def _materialize_hf(path: Path, out: Path, *, trust_remote_code: bool, progress: bool) -> Path:
    from transformers import AutoModelForCausalLM

    config = json.loads((path / HF_CONFIG).read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise EdgedistillError(
            f"{path} needs its own Python code to load (config.json has auto_map)",
            hint="read that code, then pass trust_remote_code=True (--trust-remote-code)",
        )
    if config.get("auto_map"):
        # resolve_source could not build the architecture without leave to run its code
        check_hf_folder(path, trust_remote_code=True)
    tokenizer = _hf_tokenizer(path, trust_remote_code=trust_remote_code)
    if progress:
        stored = config.get("torch_dtype") or config.get("dtype") or "the weights' own dtype"
        print(f"loading {path} as stored ({stored}) ...", file=sys.stderr, flush=True)
    try:
        # "auto": config.json's torch_dtype, else the weights' dtype. A dtype that matches the file
        # leaves the weights in the memory-mapped file (no copy); widening bf16 to float32 would
        # hold a copy twice the file's size, for nothing the later stages need.
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype="auto",
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError) as error:
        raise EdgedistillError(f"transformers could not load the model in {path}: {error}") from error
    # a multimodal checkpoint (Gemma 3 4B and up) becomes its text decoder alone
    text_decoder(model).save_pretrained(out, safe_serialization=True)
    # Chat template in tokenizer_config.json, where every reader looks (see materialize_gguf).
    tokenizer.save_pretrained(out, save_jinja_files=False)
    return out


def _hf_tokenizer(path: Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as error:
        raise EdgedistillError(f"transformers could not load the tokenizer in {path}: {error}") from error
    if not tokenizer.is_fast:
        # Exporters and runtimes read tokenizer.json, which only fast tokenizers write.
        raise EdgedistillError(
            f"the tokenizer in {path} has no fast (tokenizers) version",
            hint="install sentencepiece and protobuf so transformers can convert it, or add a tokenizer.json",
        )
    return tokenizer


def tokenizer_source(spec: str) -> PreTrainedTokenizerFast:
    """Just the tokenizer of a source, quickly: for GGUF and built-ins from metadata, no weights."""
    source = resolve_source(spec)
    if source.kind == "hf":
        return _hf_tokenizer(source.path)
    return tokenizer_from_gguf(source.path)
