"""The export stages: an HF folder to GGUF F16, then llama.cpp's quantizer for each chosen type.

    edgedistill run recipes/default.yaml --from export

Files are named `<role>-<type>.gguf` (student-q4_k_m.gguf, teacher-f16.gguf), F16 always first:
it is what the quantized types are made from. Every file is then checked in llama.cpp against the
folder it was exported from (edgedistill.export.gguf.verify); the checks go into the manifest, and
a file beyond its type's bound fails the stage.

With `export.imatrix: true` the student's types are quantized with an importance matrix computed
on the generate stage's training answers (imatrix/student-imatrix.gguf). With a `lora:` section,
lora/ also holds the distilled student (student-base-f16.gguf) and the adapter as a GGUF LoRA
(student-lora.gguf), checked in llama.cpp against the merged model: one base, many task adapters.
Both live in subfolders so that bench and eval, which take every top-level .gguf, see only models.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from edgedistill import layout
from edgedistill.export.gguf import GgufExportOptions, export_gguf
from edgedistill.export.gguf.imatrix import imatrix_from_file, read_imatrix
from edgedistill.export.gguf.verify import format_verification, raise_if_failed, verify_gguf, verify_ggufs
from edgedistill.recipe import Recipe


def export_gguf_set(model: Path, out: Path, role: str, quants: list[str], name: str, *,
                    imatrix: Path | None = None) -> dict:
    f16 = out / layout.gguf_name(role, "F16")
    if not f16.exists():
        export_gguf(model, f16, GgufExportOptions(quant="F16", name=name, overwrite=True, progress=True))
    files = {"F16": f16}
    for qtype in tqdm([q for q in quants if q != "F16"], desc=f"quantize {role}", unit="type"):
        target = out / layout.gguf_name(role, qtype)
        if not target.exists():
            export_gguf(model, target, GgufExportOptions(quant=qtype, f16=f16, imatrix=imatrix))
        files[qtype] = target
    checks = verify_ggufs(list(files.values()), model, raise_on_failure=False)
    print(format_verification(checks))
    raise_if_failed(checks)
    return {
        qtype: {"file": path.name, "bytes": path.stat().st_size,
                # without paths: the stage folder is renamed into place after this
                "verification": {k: v for k, v in check.items() if k not in ("file", "reference")}}
        for (qtype, path), check in zip(files.items(), checks)
    }


def export_student(recipe: Recipe, out: Path, *, distill: Path, generate: Path, lora: Path | None = None,
                   merge: Path | None = None) -> dict:
    # The LoRA-merged student when the recipe trains an adapter, else the distilled one.
    model = merge if merge is not None else distill
    extra: dict = {}
    imatrix = None
    if recipe.export.imatrix:
        (out / layout.IMATRIX_DIR).mkdir(exist_ok=True)
        imatrix = out / layout.IMATRIX_DIR / layout.imatrix_name("student")
        if not imatrix.exists():
            imatrix_from_file(model, generate / layout.TRAIN_JSONL, imatrix,
                              dataset=f"{recipe.name} {layout.GENERATE}/{layout.TRAIN_JSONL}")
        extra["imatrix"] = {"file": f"{layout.IMATRIX_DIR}/{imatrix.name}", "chunks": read_imatrix(imatrix).chunk_count}
    files = export_gguf_set(model, out, "student", recipe.export.quants, f"{recipe.name}-student", imatrix=imatrix)
    if lora is not None:
        extra["lora"] = export_lora_pair(distill, lora, merge, out / layout.LORA_DIR, f"{recipe.name}-student")
    return {**files, **extra}


def export_student_onnx(recipe: Recipe, out: Path, *, distill: Path, generate: Path, lora: Path | None = None,
                        merge: Path | None = None) -> dict:
    """The export_onnx stage: `student-<precision>/` ONNX folders of the student, each verified;
    with export.onnx_options.calibrate, int4 weights are rounded by importance on the generate
    stage's training text."""
    from edgedistill.export.onnx import OnnxExportOptions, export_onnx_set

    model = merge if merge is not None else distill
    options = recipe.export.onnx_options.model_dump()
    calibration = generate / layout.TRAIN_JSONL if options.pop("calibrate") else None
    return export_onnx_set(model, out, "student", OnnxExportOptions(
        **options, calibration=calibration, overwrite=True, progress=True), recipe.export.onnx)


def export_lora_pair(base: Path, adapter: Path, merged: Path, out: Path, name: str) -> dict:
    """The base as F16 GGUF and the adapter as GGUF LoRA in `out`, checked together against `merged`."""
    out.mkdir(exist_ok=True)
    base_file, adapter_file = out / layout.lora_base_name("student"), out / layout.lora_adapter_name("student")
    if not base_file.exists():
        export_gguf(base, base_file, GgufExportOptions(quant="F16", name=f"{name}-base", overwrite=True))
    if not adapter_file.exists():
        export_gguf(base, adapter_file, GgufExportOptions(lora=adapter, overwrite=True))
    check = verify_gguf(base_file, merged, lora=adapter_file, raise_on_failure=False)
    print(format_verification([check]))
    raise_if_failed([check])
    return {"base": f"{layout.LORA_DIR}/{base_file.name}", "adapter": f"{layout.LORA_DIR}/{adapter_file.name}",
            "adapter_bytes": adapter_file.stat().st_size,
            "verification": {k: v for k, v in check.items() if k not in ("file", "reference", "lora")}}


def export_teacher(recipe: Recipe, out: Path, *, teacher: Path) -> dict:
    from edgedistill.sources.endpoint import is_endpoint_teacher

    if is_endpoint_teacher(teacher):
        # bench and eval then have no teacher GGUF rows; eval's reference is the endpoint's answers
        return {"skipped": "the teacher is served by generate.endpoint: no weights here to export"}
    return export_gguf_set(teacher, out, "teacher", recipe.export.teacher_quants, f"{recipe.name}-teacher")
