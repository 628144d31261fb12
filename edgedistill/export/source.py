"""Any model source as the HF folder an exporter reads, with a scratch folder for the steps between.

    python -c "from edgedistill.export.source import hf_source; print(hf_source)"

Both export entry points (edgedistill.export.gguf.export_gguf, edgedistill.export.onnx.export_onnx)
take what every command takes: a built-in name, an HF folder, a GGUF file or a stage folder. A
source that is not an HF folder is unpacked into the scratch folder first.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgedistill.sources import materialize, resolve_source


@dataclass(frozen=True)
class HfSource:
    """The HF folder to export, the general.name it should carry (None: its own), and a scratch folder."""

    folder: Path
    name: str | None
    scratch: Path


@contextmanager
def hf_source(model: Path | str, out: Path) -> Iterator[HfSource]:
    """`model` as an HF folder, while the context lasts; the scratch folder is removed after it."""
    source = resolve_source(str(model))
    # beside the output, so the intermediate files land on the disk that has room for the result
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=f".{Path(out).name}.") as scratch:
        if source.kind == "hf":
            yield HfSource(source.path, None, Path(scratch))
        else:
            # general.name from the source, not from the scratch folder it is unpacked into
            yield HfSource(materialize(source, Path(scratch) / "hf"), source.name, Path(scratch))
