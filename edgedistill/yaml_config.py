"""Reading a YAML config file and naming its problems: shared by recipes and device targets.

    python -c "from pathlib import Path; from edgedistill.yaml_config import read_yaml_mapping; \
print(read_yaml_mapping(Path('recipes/tiny.yaml'), 'sections'))"

A bottom module (it imports only yaml, pydantic and edgedistill.errors), so that edgedistill.recipe
and edgedistill.targets can both use it without importing each other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edgedistill.errors import EdgedistillError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: YAML says keys are unique, but
    PyYAML keeps the last silently, so a pasted-in second `distill:` would undo the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = seen.get(key)
            except TypeError:  # an unhashable key: let PyYAML give its own error
                break
            if earlier is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first at line {earlier.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


# A recipe or target is a page of settings; these bounds only stop a damaged or hostile file
# (a pasted dataset, a billion-laughs alias bomb) before it costs memory or time.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64


def _bracket_depth(text: str) -> int:
    """The deepest run of open [ and { (quotes not parsed: an upper bound on YAML's flow nesting)."""
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", text):
        depth = depth + 1 if bracket in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (`what` names its keys in the error)."""
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise EdgedistillError(f"{path} has {size} bytes, more than a config file's {MAX_YAML_BYTES}",
                               "check that it is the YAML file meant; data belongs in the file data.prompts names")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgedistillError(f"{path} is not UTF-8 text (byte {exc.start} is {data[exc.start:exc.start + 1]!r})",
                               "save the file as UTF-8") from None
    if _bracket_depth(text) > MAX_YAML_DEPTH:  # PyYAML recurses per level: refused before it spends seconds
        raise EdgedistillError(f"{path} nests lists or mappings too deeply to be a config file (over "
                               f"{MAX_YAML_DEPTH} brackets deep)", "check the file for runaway brackets")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise EdgedistillError(f"{path} is not valid YAML: {exc}", "fix the YAML at the line shown") from None
    except RecursionError:
        raise EdgedistillError(f"{path} nests lists or mappings too deeply to be a config file",
                               "check the file for runaway brackets") from None
    if not isinstance(raw, dict):
        raise EdgedistillError(f"{path} must hold a mapping of {what}, got {type(raw).__name__}")
    if _count_values(raw, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise EdgedistillError(f"{path} expands to more than {MAX_YAML_VALUES} values (through YAML aliases)",
                               "write the settings out instead of repeating anchors inside anchors")
    return raw


def _count_values(value: Any, limit: int) -> int:
    """How many values `value` holds once aliases are expanded, counting no further than `limit`."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def validation_problems(path: Path, exc: ValidationError) -> list[str]:
    """One line per pydantic error, naming the file, the key and what was wrong with it."""
    problems = []
    for err in exc.errors():
        reason = "unknown key (check its spelling)" if err["type"] == "extra_forbidden" else err["msg"]
        value = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {err['input']!r})"
        problems.append(f"{path}: {_field_path(err['loc'])}: {reason}{value}")
    return problems
