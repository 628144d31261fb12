"""A run's stage folders under faults (issue 13, items 4 and 10): a disk that fills during distill's
checkpoint, what a killed export leaves in its partial folder, a finished file changed at the same
size (`run --verify`).

    python -m pytest -q tests/test_faults_run.py

The full disk is real: the run goes in a child process under a file size limit (RLIMIT_FSIZE),
so the kernel refuses the checkpoint's write as a full disk would (EFBIG instead of ENOSPC), and
torch reports it the same way, without an errno.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import random_teacher_recipe

from edgedistill.cli import main
from edgedistill.errors import no_room
from edgedistill.layout import DISTILL, MANIFEST, PARTIAL
from edgedistill.pipeline import Pipeline, Stage, is_complete, read_manifest
from edgedistill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.yaml"


def write_stage(name: str, content: bytes = b"result") -> Stage:
    def fn(recipe, out, **_):
        (out / f"{name}.bin").write_bytes(content)
    return Stage(name, fn)


def pipeline(stages: list[Stage], run: Path, log: list[str] | None = None) -> Pipeline:
    return Pipeline(stages, load_recipe(TINY), run, log=(log if log is not None else []).append)


# --- a killed writer's leftovers -----------------------------------------------------------------

@pytest.mark.unit
def test_a_killed_exports_leftovers_are_not_adopted(tmp_path):
    stage = write_stage("export")
    clean = pipeline([stage], tmp_path / "clean").run()[0]

    run = tmp_path / "run"
    line = pipeline([stage], run)
    key, _ = line.key(stage, {})
    # what `kill -9` during an export leaves: an atomic write's temporary file, a scratch folder
    partial = run / PARTIAL / f"export.{key[:16]}"
    (partial / ".student-Q4_K_M.gguf.12345.partial").parent.mkdir(parents=True)
    (partial / ".student-Q4_K_M.gguf.12345.partial").write_bytes(b"x" * 1000)
    (partial / ".student-onnx.abcd" / "hf").mkdir(parents=True)
    (partial / ".student-onnx.abcd" / "hf" / "model.safetensors").write_bytes(b"y" * 1000)
    (partial / "sub").mkdir()
    (partial / "sub" / ".model.onnx.999.partial").write_bytes(b"z")

    resumed = line.run()[0]
    assert sorted(resumed.manifest["files"]) == ["export.bin"]
    assert resumed.manifest["key"] == clean.manifest["key"]
    assert resumed.manifest["files"] == clean.manifest["files"]
    assert not any(p.name.startswith(".") for p in (run / "export").rglob("*"))


# --- a finished file changed at the same size ---------------------------------------------------

@pytest.mark.unit
def test_verify_rehashes_finished_stages_and_reruns_a_changed_one(tmp_path):
    run = tmp_path / "run"
    stages = [write_stage("first"), write_stage("second")]
    pipeline(stages, run).run()
    damaged = run / "first" / "first.bin"
    damaged.write_bytes(b"resulT")  # same size: the cheap check cannot see it

    log: list[str] = []
    assert all(r.cached for r in pipeline(stages, run, log).run())
    assert damaged.read_bytes() == b"resulT" and is_complete(run / "first")

    log.clear()
    results = pipeline(stages, run, log).run(verify=True)
    assert [r.cached for r in results] == [False, True]
    assert log[0] == (f"[first] first.bin changed since the stage wrote it (sha256 differs from "
                      f"{run / 'first' / MANIFEST}): running it again")
    assert "[second] up to date, verified, skipped" in log
    assert damaged.read_bytes() == b"result"


@pytest.mark.integration
def test_verify_through_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(random_teacher_recipe(name="verify", prompt="Review: {text}",
                                            data=f"{{prompts: {ROOT / 'recipes' / 'data' / 'sentiment.jsonl'}}}",
                                            generate="{max_new_tokens: 4}"))
    args = ["run", str(recipe), "--out", str(run), "--to", "teacher"]
    assert main(args) == 0
    config = run / "teacher" / "config.json"
    config.write_text(config.read_text().replace('"', "'", 1)[:-1] + "\n")  # same size, other bytes
    capsys.readouterr()
    assert main([*args, "--verify"]) == 0
    assert "[teacher] config.json changed since the stage wrote it" in capsys.readouterr().out
    assert is_complete(run / "teacher") and json.loads(config.read_text())


# --- a full disk during distill's checkpoint --------------------------------------------------------

# the child: no signal on a write past the limit (the default kills the process), then the run
LIMITED_RUN = textwrap.dedent("""
    import resource, signal, sys
    from edgedistill.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.integration
def test_a_full_disk_in_distills_checkpoint_names_the_problem_and_the_rerun_resumes(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(random_teacher_recipe(name="disk", prompt="Review: {text}",
                                            data=f"{{prompts: {ROOT / 'recipes' / 'data' / 'sentiment.jsonl'}, limit: 12}}",
                                            generate="{max_new_tokens: 4}") + "distill: {epochs: 1}\n")
    run = tmp_path / "run"
    args = ["run", str(recipe), "--out", str(run)]
    assert main([*args, "--to", "student"]) == 0
    model_bytes = (run / "student" / "model.safetensors").stat().st_size
    # room for every file distill writes but its checkpoint (model, optimizer moments: about 3x)
    limit = int(model_bytes * 1.5)

    child = subprocess.run([sys.executable, "-c", LIMITED_RUN, str(limit), *args, "--to", DISTILL],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 2, child.stderr[-3000:]
    assert "Traceback" not in child.stderr
    error = child.stderr[child.stderr.index("error: "):]
    assert error.startswith(f"error: no room to write distill's folder {run / PARTIAL}/distill.")
    assert "the disk is full, a quota or a file size limit was reached" in error
    assert "fix: free some space and run the same command again; finished stages are kept" in error
    partials = list((run / PARTIAL).glob("distill.*"))
    assert len(partials) == 1 and not list(partials[0].rglob("*.writing"))
    assert not (run / DISTILL).exists() and is_complete(run / "student")

    assert main([*args, "--to", DISTILL]) == 0
    assert is_complete(run / DISTILL) and read_manifest(run / DISTILL)["files"]


@pytest.mark.unit
@pytest.mark.parametrize("error, found", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (OSError(122, "Disk quota exceeded"), "Disk quota exceeded"),
    (OSError("1000000 requested and 12500 written"), "short write"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "inline_container.cc"),
    (RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"), "PytorchStreamWriter"),
    (type("SafetensorError", (Exception,), {})("Error while serializing: I/O error: File too large (os error 27)"),
     "File too large"),
], ids=["enospc", "quota", "numpy", "torch-pos", "torch-write", "safetensors"])
def test_every_layers_write_failure_maps_to_no_room(error, found):
    assert found in no_room(error)
    wrapped = RuntimeError("while saving")
    wrapped.__context__ = error
    assert found in no_room(wrapped)


@pytest.mark.unit
def test_other_failures_are_not_a_full_disk():
    assert no_room(OSError(2, "No such file or directory")) is None
    assert no_room(RuntimeError("CUDA out of memory")) is None
    assert no_room(ValueError("File too large")) is None
