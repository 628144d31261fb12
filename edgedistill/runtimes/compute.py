"""The recipe's `compute:` section resolved for one teacher folder: the device and dtype it runs in.

    python -m edgedistill.runtimes.compute runs/tiny/teacher                    # what auto means here
    python -m edgedistill.runtimes.compute runs/tiny/teacher --device cpu --dtype bfloat16

auto device: cuda when torch sees a GPU, else cpu. auto dtype: bfloat16 on CUDA; on the CPU the dtype
the folder stores its weights in (config.json's `torch_dtype`, `dtype` in transformers 5), float32
when it names none. So the embedded teacher (float32 once dequantized) runs on the CPU as it always
did, and a teacher stored in bfloat16 is loaded as it is stored, from the memory-mapped file, instead
of being widened into a float32 copy twice the file's size. bfloat16 on a CPU without native bf16
instructions (avx512_bf16, AMX) works, slowly. Whatever the dtype, log-probs are taken in float32.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from edgedistill.errors import EdgedistillError
from edgedistill.layout import HF_CONFIG
from edgedistill.recipe import ComputeConfig
from edgedistill.runtimes.pytorch import load_model

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the same dtypes as the runtimes name them (edgedistill.runtimes.common.DTYPES)
RUNTIME_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Compute:
    """A resolved compute: section: "cpu" or "cuda", and one of TORCH_DTYPES' names."""

    device: str
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def runtime_dtype(self) -> str:
        return RUNTIME_DTYPES[self.dtype]

    def as_dict(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype}


def require_device(config: ComputeConfig) -> None:
    """Refuses `device: cuda` where torch has no GPU, before any work, with the fix."""
    if config.device == "cuda" and not torch.cuda.is_available():
        build = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
                 else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU")
        raise EdgedistillError(
            f"compute.device is cuda, but {build}",
            "set compute.device: auto (the GPU when there is one, else the CPU) or cpu in the recipe, or run "
            "on a machine with an NVIDIA GPU and a CUDA build of torch "
            "(pip install torch --index-url https://download.pytorch.org/whl/cu128)")


def stored_dtype(folder: Path) -> str:
    """The dtype a model folder stores its weights in, as config.json names it; float32 when it
    names none or one the teacher does not run in (float64, say)."""
    try:
        config = json.loads((Path(folder) / HF_CONFIG).read_text())
    except (OSError, ValueError):
        return "float32"
    named = config.get("torch_dtype") or config.get("dtype")
    return named if named in TORCH_DTYPES else "float32"


def resolve_compute(config: ComputeConfig | None, folder: Path) -> Compute:
    """`config` (None: all auto) for the model in `folder`."""
    config = config or ComputeConfig()
    require_device(config)
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if config.dtype != "auto":
        return Compute(device, config.dtype)
    return Compute(device, "bfloat16" if device == "cuda" else stored_dtype(folder))


def load_on(folder: Path, compute: Compute, *, trust_remote_code: bool = False):
    """The model in `folder` (edgedistill.runtimes.pytorch.load_model) in `compute`'s dtype, on its device."""
    model = load_model(folder, dtype=compute.torch_dtype, trust_remote_code=trust_remote_code)
    return model.to(compute.device) if compute.device != "cpu" else model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", *TORCH_DTYPES])
    args = parser.parse_args()
    compute = resolve_compute(ComputeConfig(device=args.device, dtype=args.dtype), args.folder)
    print(json.dumps({**compute.as_dict(), "stored_dtype": stored_dtype(args.folder),
                      "cuda_available": torch.cuda.is_available()}))


if __name__ == "__main__":
    main()
