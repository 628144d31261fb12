"""Fuzz recipe loading: damaged copies of the shipped recipes through load_recipe and the data check.

    .venv/bin/python tools/fuzz_recipe.py                                 # 3000 cases, seed 0, JSON to stdout
    .venv/bin/python tools/fuzz_recipe.py --cases 300 --seed 7 --out /tmp/fuzz_recipe.json
    .venv/bin/python tools/fuzz_recipe.py --replay 1234 --seed 7          # one case here, with its traceback

Each case starts from one of recipes/*.yaml and applies one to three mutations, chosen by a
generator seeded with (seed, case index): on the parsed recipe, set a value anywhere to a value of
another type or a boundary (None, -1, 0, 2**70, nan, inf, '', a 100k string, '../../etc/passwd', a
list, a mapping), delete a key, add an unknown one, misspell one, make a section a scalar; on the
text, flip or delete a character, delete, repeat or indent a line, cut the file, insert bytes that
are not UTF-8, nest brackets 20000 deep, add an alias bomb or a key given twice. The worker then
does what `edgedistill run` does before its first stage: load_recipe, the data check (every
prompt read, the split made) and the cache key of every section (pipeline.section_dump and
sha256_json). Outcomes, limits and the JSON are tools/fuzz_harness.py's.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_harness import Case, classify  # noqa: E402
from fuzz_harness import main as harness_main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ODD_VALUES = (None, -1, 0, 1, 2**70, -(2**70), math.nan, math.inf, 0.5, "", "x" * 100_000, "../../etc/passwd",
              "/etc/passwd", "random", "smollm2-135m-instruct", "{text}", "{missing}", True, [], [1, "a"], {},
              {"a": 1}, "1e9", "null", "\x00", "ünïcode")


def setup(root: Path) -> dict:
    """The shipped recipes with their data, in root/recipes (cases refer to the data relative to it)."""
    shutil.copytree(ROOT / "recipes", root / "recipes")
    return {"sources": [path.name for path in RECIPES]}


def _paths(value, prefix=()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _parent(tree, path):
    for part in path[:-1]:
        tree = tree[part]
    return tree


def mutate_tree(tree: dict, rng: random.Random) -> str:
    path = rng.choice(_paths(tree))
    parent, last = _parent(tree, path), path[-1]
    where = ".".join(map(str, path))
    kind = rng.choice(("set", "set", "set", "delete", "unknown_key", "typo_key", "scalar_section"))
    if kind == "set" or (isinstance(parent, list) and kind != "delete"):
        value = rng.choice(ODD_VALUES)
        parent[last] = value
        return f"set {where}={str(value)[:40]!r}"
    if kind == "delete":
        del parent[last]
        return f"delete {where}"
    if kind == "unknown_key" and isinstance(parent, dict):
        parent[rng.choice(("epoch", "lr_rate", "tempreature", "x", "name"))] = rng.choice(ODD_VALUES)
        return f"unknown_key under {where}"
    if kind == "typo_key" and isinstance(parent, dict) and isinstance(last, str) and len(last) > 1:
        cut = rng.randrange(len(last))
        parent[last[:cut] + last[cut + 1:]] = parent.pop(last)
        return f"typo_key {where}"
    parent[last] = rng.choice((1, "text", None))
    return f"scalar_section {where}"


ALIAS_BOMB = "".join(f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 10) if i else 'x'}]\n" for i in range(9))


def mutate_text(text: bytes, rng: random.Random) -> tuple[bytes, str]:
    lines = text.split(b"\n")
    at = rng.randrange(len(lines))
    kind = rng.choice(("flip_char", "delete_char", "delete_line", "repeat_line", "indent_line", "truncate",
                       "not_utf8", "deep_nesting", "alias_bomb", "tab"))
    if kind == "flip_char" and text:
        index = rng.randrange(len(text))
        return text[:index] + bytes([rng.randrange(32, 127)]) + text[index + 1:], f"flip_char {index}"
    if kind == "delete_char" and text:
        index = rng.randrange(len(text))
        return text[:index] + text[index + 1:], f"delete_char {index}"
    if kind == "delete_line":
        return b"\n".join(lines[:at] + lines[at + 1:]), f"delete_line {at + 1}"
    if kind == "repeat_line":
        return b"\n".join(lines[:at + 1] + lines[at:]), f"repeat_line {at + 1}"
    if kind == "indent_line":
        return b"\n".join(lines[:at] + [b"   " + lines[at]] + lines[at + 1:]), f"indent_line {at + 1}"
    if kind == "truncate":
        cut = rng.randrange(len(text) + 1)
        return text[:cut], f"truncate {cut}"
    if kind == "not_utf8":
        index = rng.randrange(len(text) + 1)
        return text[:index] + rng.choice((b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00")) + text[index:], f"not_utf8 {index}"
    if kind == "deep_nesting":
        return text + b"\ndeep: " + b"[" * 20000 + b"]" * 20000 + b"\n", "deep_nesting"
    if kind == "alias_bomb":
        return text + b"\n" + ALIAS_BOMB.encode() + b"task_extra: *b8\n", "alias_bomb"
    return b"\n".join(lines[:at] + [b"\t" + lines[at]] + lines[at + 1:]), f"tab {at + 1}"


def make_case(index: int, rng: random.Random, case_dir: Path) -> Case:
    source = case_dir.parent / "recipes" / rng.choice(RECIPES).name
    text, done = source.read_bytes(), []
    n_tree, n_text = rng.choice(((1, 0), (0, 1), (1, 1), (2, 0), (0, 2), (2, 1), (1, 2)))
    # tree mutations first, on the shipped text: a text mutation may add an alias bomb, which
    # re-dumping here would expand
    tree = yaml.safe_load(text)
    for _ in range(n_tree):
        done.append(mutate_tree(tree, rng))
    if n_tree:
        text = yaml.safe_dump(tree, allow_unicode=True, sort_keys=False).encode()
    for _ in range(n_text):
        text, what = mutate_text(text, rng)
        done.append(what)
    # beside the shipped recipes, so relative data paths resolve as they do for the originals
    path = case_dir.parent / "recipes" / f"case-{index:05d}.yaml"
    path.write_bytes(text)
    return Case(str(path), [f"{source.name}:", *done])


def run_case(line: str) -> dict:
    from edgedistill.data.prompts import check_data
    from edgedistill.pipeline import sha256_json
    from edgedistill.recipe import Recipe, load_recipe, section_dump

    path = Path(line)

    def load():
        try:
            recipe = load_recipe(path)
            check_data(recipe)
            sha256_json(section_dump(recipe, tuple(name for name in Recipe.model_fields if name != "base_dir")))
        finally:
            path.unlink(missing_ok=True)

    return classify(load)


if __name__ == "__main__":
    sys.exit(harness_main("fuzz_recipe", Path(__file__).resolve(), make_case, run_case, default_cases=3000,
                          description=__doc__.splitlines()[0], setup=setup))
