"""The one way to make a GGUF file: any model source to one type, the best type under a size, or a LoRA.

    edgedistill export runs/tiny/distill --quant q4_k_m --out model.gguf      # what the CLI calls
    python -c "from pathlib import Path; from edgedistill.export.gguf import GgufExportOptions, export_gguf; \
print(export_gguf('runs/tiny/distill', Path('model.gguf'), GgufExportOptions(quant='Q4_K_M')))"

The chain: a source that is not an HF folder is unpacked into a scratch folder beside `out`; a
calibration file becomes an importance matrix there (edgedistill.export.gguf.imatrix); the F16 file
is written (edgedistill.export.gguf.writer) unless `options.f16` gives one already written, which is
how the export stage makes several types from one F16; then llama.cpp quantizes it to the type, or
to every type of the budget ladder until one fits `max_size` (edgedistill.export.gguf.quantize).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf.imatrix import imatrix_from_file
from edgedistill.export.gguf.lora import write_lora_gguf
from edgedistill.export.gguf.quantize import parse_size, quantize_gguf, quantize_to_budget
from edgedistill.export.gguf.writer import write_gguf
from edgedistill.export.source import hf_source
from edgedistill.formats import gguf_type

DEFAULT_QUANT = "Q4_K_M"


@dataclass(frozen=True)
class GgufExportOptions:
    """What export_gguf writes; checked on construction.

    `quant`: one type of edgedistill.formats.GGUF_QUANTS, any case (default Q4_K_M); or `max_size`
    ("60MB", "1.5GiB"): the most precise type whose file fits. `imatrix`: an importance-matrix
    file to quantize with, or `calibration`: task text (a run's generate/train.jsonl, a .txt file)
    to compute one from. `lora`: a PEFT adapter folder, written as a GGUF LoRA (float32) for the
    model's GGUF instead of the model. `name`: general.name (default: the source's name). `f16`: an
    F16 GGUF of the same model already written, to quantize from. An existing output is an error
    unless `overwrite`; `progress` shows bars.
    """

    quant: str | None = None
    max_size: str | None = None
    imatrix: Path | None = None
    calibration: Path | None = None
    lora: Path | None = None
    name: str | None = None
    f16: Path | None = None
    overwrite: bool = False
    progress: bool = False

    def __post_init__(self):
        if self.quant is not None:
            object.__setattr__(self, "quant", gguf_type(self.quant).name)
        if self.max_size is not None:
            parse_size(self.max_size)
            if self.quant is not None:
                raise EdgedistillError(f"quant {self.quant!r} and max_size {self.max_size!r} both choose the type",
                                       "give one of them")
        if self.imatrix is not None and self.calibration is not None:
            raise EdgedistillError(f"imatrix {self.imatrix} and calibration {self.calibration} both give the "
                                   "importance matrix", "give one of them")
        if self.lora is not None and (self.quant or self.max_size or self.calibration or self.imatrix):
            raise EdgedistillError(f"lora {self.lora} writes an adapter (float32), which takes no quant, max_size, "
                                   "calibration or imatrix (--quant, --max-size, --calibration, --imatrix)",
                                   "export and quantize the base model in a second command")

    @property
    def qtype(self) -> str:
        return self.quant or DEFAULT_QUANT


@dataclass(frozen=True)
class GgufExport:
    """The file export_gguf wrote, its type ("F32" for a LoRA adapter) and size."""

    path: Path
    qtype: str
    size_bytes: int
    # with max_size: every type's file size made on the way, in the order tried (the chosen one last)
    tried_bytes: dict[str, int] = field(default_factory=dict)


def export_gguf(model: Path | str, out: Path, options: GgufExportOptions) -> GgufExport:
    """Write the model source `model` (built-in name, HF folder, GGUF file) as the GGUF file `out`."""
    out = Path(out)
    with hf_source(model, out) as source:
        if options.lora is not None:
            write_lora_gguf(options.lora, source.folder, out, overwrite=options.overwrite)
            return GgufExport(out, "F32", out.stat().st_size)
        name = options.name if options.name is not None else source.name
        imatrix = options.imatrix
        if options.calibration is not None:
            imatrix = imatrix_from_file(source.folder, options.calibration, source.scratch / "imatrix.gguf",
                                        dataset=Path(options.calibration).name)
        if options.max_size is None and options.qtype == "F16":
            write_gguf(source.folder, out, name=name, overwrite=options.overwrite, progress=options.progress)
            return GgufExport(out, "F16", out.stat().st_size)
        f16 = options.f16 or write_gguf(source.folder, source.scratch / "model-f16.gguf", name=name,
                                        progress=options.progress)
        if options.max_size is not None:
            choice = quantize_to_budget(f16, out, parse_size(options.max_size), overwrite=options.overwrite,
                                        progress=options.progress, imatrix=imatrix)
            return GgufExport(out, choice.qtype, choice.size_bytes, choice.tried_bytes)
        quantize_gguf(f16, out, options.qtype, overwrite=options.overwrite, imatrix=imatrix)
        return GgufExport(out, options.qtype, out.stat().st_size)
