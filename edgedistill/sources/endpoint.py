"""A teacher that exists only behind an inference engine: its folder holds a tokenizer and a config, no weights.

    # recipe: teacher: {source: endpoint, tokenizer: served-model-folder}
    #         generate: {endpoint: {url: http://127.0.0.1:8000/v1}}
    edgedistill run recipe.yaml --out runs/remote --to distill

With `teacher.source: endpoint` the teacher stage writes the tokenizer files and config.json of
`teacher.tokenizer` (an HF folder, with or without its weights, a GGUF file whose metadata alone is
read, or a built-in name) and a marker, ENDPOINT_TEACHER. Every later stage that would run the
teacher asks the endpoint instead: generate for answers and their top log-probs (the soft labels,
edgedistill.data.endpoint_labels), eval for the reference answers; the teacher's GGUF and its bench
row are skipped. The student is built from a config or given, since there is nothing to prune.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgedistill.errors import EdgedistillError
from edgedistill.layout import ENDPOINT_TEACHER, GENERATION_CONFIG, HF_CONFIG

MARKER_FORMAT = 1


def is_endpoint_teacher(folder: Path) -> bool:
    return (Path(folder) / ENDPOINT_TEACHER).is_file()


def tokenizer_path(spec: str) -> Path:
    """The file or folder `teacher.tokenizer` names (a built-in name: its GGUF), for the stage's cache key."""
    from edgedistill.sources import resolve_source

    path = Path(spec).expanduser()
    return path if path.is_dir() else resolve_source(spec).path


def write_endpoint_teacher(spec: str, out: Path) -> dict:
    """The teacher folder of an endpoint teacher: `spec`'s tokenizer and config, and the marker."""
    from edgedistill.sources import _hf_tokenizer, resolve_source
    from edgedistill.sources.gguf import tokenizer_from_gguf

    path = Path(spec).expanduser()
    if path.is_dir():
        # the served model's folder; its weights, if any, are not read
        if not (path / HF_CONFIG).is_file():
            raise EdgedistillError(f"teacher.tokenizer {path} has no config.json",
                                   "give the served model's HF folder (config.json and tokenizer files are enough), "
                                   "its GGUF file, or a built-in name")
        tokenizer = _hf_tokenizer(path)
        for name in (HF_CONFIG, GENERATION_CONFIG):
            if (path / name).is_file():
                shutil.copyfile(path / name, out / name)
        kind = "hf"
    else:
        from transformers import AutoConfig

        source = resolve_source(spec)
        tokenizer = tokenizer_from_gguf(source.path)
        # transformers reads a GGUF's config from its metadata, without the tensors
        config = AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name, local_files_only=True)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.save_pretrained(out)
        kind = source.kind
    tokenizer.save_pretrained(out, save_jinja_files=False)
    (out / ENDPOINT_TEACHER).write_text(json.dumps({"format": MARKER_FORMAT, "tokenizer": str(spec),
                                                    "tokenizer_kind": kind}, indent=2) + "\n")
    return {"source": "endpoint", "tokenizer": str(spec), "vocab_size": len(tokenizer)}
