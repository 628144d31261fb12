"""Reading a YAML config file and naming its problems: shared by recipes and device targets.

    python -c "from pathlib import Path; from edgedistill.yaml_config import read_yaml_mapping; \
print(read_yaml_mapping(Path('recipes/tiny.yaml'), 'sections'))"

A bottom module (it imports only yaml, pydantic and edgedistill.errors), so that edgedistill.recipe
and edgedistill.targets can both use it without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edgedistill.errors import EdgedistillError


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (`what` names its keys in the error)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EdgedistillError(f"{path} is not valid YAML: {exc}", "fix the YAML syntax at the line shown") from None
    if not isinstance(raw, dict):
        raise EdgedistillError(f"{path} must hold a mapping of {what}, got {type(raw).__name__}")
    return raw


def validation_problems(path: Path, exc: ValidationError) -> list[str]:
    """One line per pydantic error, naming the file, the key and what was wrong with it."""
    problems = []
    for err in exc.errors():
        reason = "unknown key (check its spelling)" if err["type"] == "extra_forbidden" else err["msg"]
        value = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {err['input']!r})"
        problems.append(f"{path}: {_field_path(err['loc'])}: {reason}{value}")
    return problems
