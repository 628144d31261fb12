"""Whether two run folders of the same recipe made the same models and the same eval numbers.

    .venv/bin/python tools/compare_runs.py runs/before runs/after --json runs/compare.json

For refactors: every GGUF file (export/, teacher_gguf/) and ONNX weight file (export_onnx/) must
have the same sha256, and eval.json the same numbers (eval's `path`/`data` and the
`schema_version` key aside, which name where and in which layout the file was written). Speeds
are not compared: they depend on the machine's load. Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

# keys that say where or in which layout a file was written, not what was measured
IGNORED_KEYS = {"schema_version", "path", "data"}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def model_files(run: Path) -> dict[str, str]:
    patterns = ("export/*.gguf", "teacher_gguf/*.gguf", "export_onnx/*/model.onnx", "export_onnx/*/model.onnx.data")
    return {str(p.relative_to(run)): sha256(p) for pattern in patterns for p in sorted(run.glob(pattern))}


def without_ignored(value):
    if isinstance(value, dict):
        return {k: without_ignored(v) for k, v in value.items() if k not in IGNORED_KEYS}
    if isinstance(value, list):
        return [without_ignored(v) for v in value]
    return value


def compare(before: Path, after: Path) -> dict:
    files_before, files_after = model_files(before), model_files(after)
    eval_before = without_ignored(json.loads((before / "eval" / "eval.json").read_text()))
    eval_after = without_ignored(json.loads((after / "eval" / "eval.json").read_text()))
    scores = {row["artifact"]: row.get("task_score") for row in eval_after["artifacts"]}
    return {
        "before": str(before), "after": str(after),
        "model_files": {name: {"before": files_before.get(name), "after": files_after.get(name),
                               "same": files_before.get(name) == files_after.get(name)}
                        for name in sorted(set(files_before) | set(files_after))},
        "eval_same": eval_before == eval_after,
        "task_scores_after": scores,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = compare(args.before, args.after)
    for name, entry in result["model_files"].items():
        print(f"{'same' if entry['same'] else 'DIFFERENT':<9} {name} {entry['after'] or 'missing'}")
    print(f"{'same' if result['eval_same'] else 'DIFFERENT':<9} eval/eval.json numbers")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    same = result["eval_same"] and all(e["same"] for e in result["model_files"].values())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
