"""The export stages: an HF folder to GGUF F16, then llama.cpp's quantizer for each chosen type.

    edgedistill run recipes/default.yaml --from export

Files are named `<role>-<type>.gguf` (student-q4_k_m.gguf, teacher-f16.gguf), F16 always first:
it is what the quantized types are made from. Every file is then checked in llama.cpp against the
folder it was exported from (edgedistill.export.gguf.verify); the checks go into the manifest, and
a file beyond its type's bound fails the stage.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from edgedistill.export.gguf import quantize_gguf, write_gguf
from edgedistill.export.gguf.verify import format_verification, raise_if_failed, verify_ggufs
from edgedistill.recipe import Recipe


def export_gguf_set(model: Path, out: Path, role: str, quants: list[str], name: str) -> dict:
    f16 = out / f"{role}-f16.gguf"
    if not f16.exists():
        write_gguf(model, f16, name=name, overwrite=True, progress=True)
    files = {"F16": f16}
    for qtype in tqdm([q for q in quants if q != "F16"], desc=f"quantize {role}", unit="type"):
        target = out / f"{role}-{qtype.lower()}.gguf"
        if not target.exists():
            quantize_gguf(f16, target, qtype)
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


def export_student(recipe: Recipe, out: Path, *, distill: Path | None = None, merge: Path | None = None) -> dict:
    # The LoRA-merged student when the recipe trains an adapter, else the distilled one.
    model = merge if merge is not None else distill
    return export_gguf_set(model, out, "student", recipe.export.quants, f"{recipe.name}-student")


def export_teacher(recipe: Recipe, out: Path, *, teacher: Path) -> dict:
    return export_gguf_set(teacher, out, "teacher", recipe.export.teacher_quants, f"{recipe.name}-teacher")
