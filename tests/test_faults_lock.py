"""One run at a time in a run folder: a second `edgedistill run` on the same --out stops at once
with a message naming the first, the first's stages are untouched, and the lock is free again when
a run ends, fails or is killed."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgedistill.errors import EdgedistillError
from edgedistill.layout import PARTIAL, RUN_LOCK
from edgedistill.pipeline import Pipeline, Stage, is_complete, run_lock
from edgedistill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.yaml"
WAIT_S = 120


@pytest.fixture
def recipe():
    return load_recipe(TINY)


def write_stage(name: str, *inputs: str) -> Stage:
    def fn(recipe, out, **_):
        (out / f"{name}.txt").write_text(name)
    return Stage(name, fn, inputs=inputs)


def pipeline(stages: list[Stage], recipe, run: Path) -> Pipeline:
    return Pipeline(stages, recipe, run, log=lambda _: None)


def assert_free(run: Path) -> None:
    assert not (run / RUN_LOCK).exists()
    with run_lock(run):  # would raise if anything still held it
        pass


@pytest.mark.unit
def test_a_second_run_inside_the_first_is_refused_and_the_first_finishes(recipe, tmp_path):
    run = tmp_path / "run"
    refused: list[EdgedistillError] = []

    def second_run(recipe, out, *, first):
        with pytest.raises(EdgedistillError) as caught:
            pipeline([write_stage("first"), write_stage("other")], recipe, run).run(force=True)
        refused.append(caught.value)
        (out / "second.txt").write_text((first / "first.txt").read_text())

    results = pipeline([write_stage("first"), Stage("second", second_run, inputs=("first",))], recipe, run).run()

    problem = refused[0].problem
    assert problem.startswith(f"{run} is in use by edgedistill run, pid {os.getpid()} on {socket.gethostname()} since ")
    assert "wait for that run to finish, or use another --out folder" == refused[0].hint
    assert [r.name for r in results] == ["first", "second"]
    assert all(is_complete(r.path, r.manifest["key"]) for r in results)
    assert (run / "first" / "first.txt").read_text() == "first" and not (run / "other").exists()
    assert_free(run)


@pytest.mark.unit
def test_a_held_folder_refuses_a_run_before_any_stage(recipe, tmp_path):
    run = tmp_path / "run"
    pipeline([write_stage("first")], recipe, run).run()
    before = (run / "first" / "manifest.json").read_text()
    with run_lock(run):
        with pytest.raises(EdgedistillError, match=f"pid {os.getpid()} on "):
            pipeline([write_stage("first")], recipe, run).run(force=True)
    assert (run / "first" / "manifest.json").read_text() == before
    assert_free(run)


@pytest.mark.unit
def test_the_lock_is_free_after_a_stage_fails(recipe, tmp_path):
    run = tmp_path / "run"

    def fails(recipe, out, *, first):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        pipeline([write_stage("first"), Stage("second", fails, inputs=("first",))], recipe, run).run()
    assert_free(run)
    results = pipeline([write_stage("first"), write_stage("second", "first")], recipe, run).run()
    assert [r.cached for r in results] == [True, False]


@pytest.mark.unit
def test_a_lock_file_left_by_a_killed_run_does_not_hold_the_folder(recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # what a killed run leaves: the file with its details, but no flock (the kernel dropped it)
    (run / RUN_LOCK).write_text('{"pid": 999999, "host": "gone", "since": "yesterday"}')
    results = pipeline([write_stage("first")], recipe, run).run()
    assert not results[0].cached
    assert_free(run)


@pytest.mark.unit
def test_a_holder_that_has_not_written_its_details_is_still_named(recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / RUN_LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(EdgedistillError, match="in use by another edgedistill run"):
            pipeline([write_stage("first")], recipe, run).run()
    finally:
        os.close(fd)
    assert not (run / "first").exists()


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from edgedistill.pipeline import Pipeline, Stage
    from edgedistill.recipe import load_recipe

    run, started, release = (Path(a) for a in sys.argv[1:4])

    def wait(recipe, out):
        started.write_text("")
        deadline = time.monotonic() + float(sys.argv[4])
        while not release.exists():
            if time.monotonic() > deadline:
                sys.exit("never released")
            time.sleep(0.05)
        (out / "held.txt").write_text("held")

    Pipeline([Stage("held", wait)], load_recipe(sys.argv[5]), run, log=lambda _: None).run()
""")


@pytest.mark.integration
def test_a_second_process_on_the_same_folder_exits_2_naming_the_first(tmp_path):
    run, started, release = tmp_path / "run", tmp_path / "started", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), str(started), str(release), str(WAIT_S),
                               str(TINY)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not started.exists():
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline, "the holding run never started its stage"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "edgedistill.cli", "run", str(TINY), "--out", str(run)],
                                cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by edgedistill run, pid {holder.pid} on {socket.gethostname()} since " in second.stderr
        assert "use another --out folder" in second.stderr and "Traceback" not in second.stderr
        assert sorted(p.name for p in run.iterdir()) == sorted([PARTIAL, RUN_LOCK]), "the second started no stage"

        release.write_text("")
        _, err = holder.communicate(timeout=WAIT_S)
        assert holder.returncode == 0, err[-3000:]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (run / "held" / "held.txt").read_text() == "held"
    assert list((run / PARTIAL).iterdir()) == [] and not (run / RUN_LOCK).exists()
