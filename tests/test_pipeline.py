"""The stage runner: cache keys, skipping, --force/--from, atomic folders, resume from a partial folder."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from edgedistill.errors import EdgedistillError
from edgedistill.pipeline import PARTIAL, Pipeline, Stage, is_complete, read_manifest
from edgedistill.recipe import load_recipe

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def recipe():
    return load_recipe(ROOT / "recipes" / "tiny.yaml")


class Calls:
    def __init__(self):
        self.names: list[str] = []


def make_stages(calls: Calls, fail_in: set[str] | None = None) -> list[Stage]:
    fail_in = fail_in if fail_in is not None else set()

    def first(recipe, out):
        calls.names.append("first")
        (out / "a.txt").write_text(f"epochs={recipe.distill.epochs}")
        return {"note": "made a"}

    def second(recipe, out, *, first):
        calls.names.append("second")
        # Progress saved in the partial folder survives a failure and is picked up again.
        progress = out / "progress.txt"
        done = int(progress.read_text()) if progress.exists() else 0
        progress.write_text(str(done + 1))
        if "second" in fail_in:
            raise RuntimeError("killed")
        (out / "b.txt").write_text((first / "a.txt").read_text() + f" resumed_after={done}")

    def third(recipe, out, *, second):
        calls.names.append("third")
        (out / "sub").mkdir()
        (out / "sub" / "c.txt").write_text((second / "b.txt").read_text().upper())

    return [Stage("first", first, sections=("distill",)),
            Stage("second", second, inputs=("first",), sections=("seed",)),
            Stage("third", third, inputs=("second",), sections=("bench",))]


def run(recipe, tmp_path, calls, **kwargs):
    return Pipeline(make_stages(calls, kwargs.pop("fail_in", None)), recipe, tmp_path / "run",
                    log=lambda _: None).run(**kwargs)


def test_run_writes_stage_folders_with_manifests(recipe, tmp_path):
    calls = Calls()
    results = run(recipe, tmp_path, calls)
    assert calls.names == ["first", "second", "third"]
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"first", "second", "third", PARTIAL}
    assert list((tmp_path / "run" / PARTIAL).iterdir()) == []
    manifest = read_manifest(tmp_path / "run" / "third")
    assert set(manifest["files"]) == {"sub/c.txt"}
    assert manifest["files"]["sub/c.txt"]["bytes"] == len("EPOCHS=2 RESUMED_AFTER=0")
    assert manifest["config"] == {"bench": recipe.bench.model_dump(mode="json")}
    assert set(manifest["inputs"]) == {"second"}
    assert results[0].manifest["result"] == {"note": "made a"}
    assert all(not r.cached for r in results)


def test_rerun_with_nothing_changed_does_no_work(recipe, tmp_path):
    run(recipe, tmp_path, Calls())
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    calls = Calls()
    results = run(recipe, tmp_path, calls)
    assert calls.names == []
    assert all(r.cached for r in results)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_changed_section_reruns_that_stage_and_what_reads_it(recipe, tmp_path):
    run(recipe, tmp_path, Calls())
    calls = Calls()
    changed = recipe.model_copy(update={"bench": recipe.bench.model_copy(update={"gen_tokens": 7})})
    run(changed, tmp_path, calls)
    assert calls.names == ["third"]
    calls = Calls()
    changed = recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"epochs": 9})})
    run(changed, tmp_path, calls)
    assert calls.names == ["first", "second", "third"]
    assert (tmp_path / "run" / "third" / "sub" / "c.txt").read_text() == "EPOCHS=9 RESUMED_AFTER=0"


def test_force_and_from(recipe, tmp_path):
    run(recipe, tmp_path, Calls())
    calls = Calls()
    run(recipe, tmp_path, calls, from_stage="second")
    assert calls.names == ["second", "third"]
    calls = Calls()
    run(recipe, tmp_path, calls, force=True)
    assert calls.names == ["first", "second", "third"]
    with pytest.raises(EdgedistillError, match="no such stage"):
        run(recipe, tmp_path, Calls(), from_stage="nope")


def test_failed_stage_leaves_no_final_folder_and_resumes_from_partial(recipe, tmp_path):
    with pytest.raises(RuntimeError):
        run(recipe, tmp_path, Calls(), fail_in={"second"})
    assert is_complete(tmp_path / "run" / "first")
    assert not (tmp_path / "run" / "second").exists()
    partials = list((tmp_path / "run" / PARTIAL).glob("second.*"))
    assert len(partials) == 1 and (partials[0] / "progress.txt").read_text() == "1"

    calls = Calls()
    run(recipe, tmp_path, calls)
    assert calls.names == ["second", "third"]
    assert (tmp_path / "run" / "second" / "b.txt").read_text() == "epochs=2 resumed_after=1"
    assert list((tmp_path / "run" / PARTIAL).iterdir()) == []


def test_a_stage_folder_with_missing_files_is_redone(recipe, tmp_path):
    run(recipe, tmp_path, Calls())
    (tmp_path / "run" / "second" / "b.txt").unlink()
    calls = Calls()
    run(recipe, tmp_path, calls)
    assert calls.names == ["second"]


def test_a_redone_stage_replaces_the_old_folder_whole(recipe, tmp_path):
    run(recipe, tmp_path, Calls())
    (tmp_path / "run" / "first" / "stray.txt").write_text("left from before")
    run(recipe, tmp_path, Calls(), force=True)
    assert not (tmp_path / "run" / "first" / "stray.txt").exists()
    assert json.loads((tmp_path / "run" / "first" / "manifest.json").read_text())["stage"] == "first"


def test_full_disk_is_a_clear_error_that_keeps_finished_stages(recipe, tmp_path):
    def full(recipe, out, *, first):
        raise OSError(errno.ENOSPC, "No space left on device")

    stages = make_stages(Calls())
    stages[1] = Stage("second", full, inputs=("first",))
    with pytest.raises(EdgedistillError, match="disk is full") as error:
        Pipeline(stages, recipe, tmp_path / "run", log=lambda _: None).run()
    assert "resumes" in str(error.value)
    assert is_complete(tmp_path / "run" / "first")


def test_a_stage_may_only_read_earlier_stages(recipe, tmp_path):
    stages = make_stages(Calls())
    with pytest.raises(ValueError, match="do not run before it"):
        Pipeline([stages[1], stages[0]], recipe, tmp_path)


# --- the stage contract: a stage reads only the recipe sections it declares ---

def test_a_stage_reads_its_declared_sections_and_nothing_else(recipe, tmp_path):
    from edgedistill.pipeline import UndeclaredSection

    seen = {}

    def reads(view, out):
        seen["epochs"] = view.distill.epochs  # covered by "distill"
        seen["batch"] = view.generate.batch_size  # covered by the field itself
        seen["endpoint"] = view.generate.endpoint  # partly declared and not set: None
        seen["prompts"] = view.resolve(view.data.prompts)  # path helpers are always there
        with pytest.raises(UndeclaredSection, match=r"recipe\.generate\.max_new_tokens"):
            view.generate.max_new_tokens
        with pytest.raises(UndeclaredSection, match=r"recipe\.seed"):
            view.seed
        with pytest.raises(AttributeError, match="read-only"):
            view.name = "other"
        (out / "done.txt").write_text("ok")

    stage = Stage("reads", reads, sections=("distill", "generate.batch_size", "generate.endpoint.model", "data"))
    Pipeline([stage], recipe, tmp_path).run()
    assert seen == {"epochs": recipe.distill.epochs, "batch": recipe.generate.batch_size, "endpoint": None,
                    "prompts": recipe.resolve(recipe.data.prompts)}


def test_unkeyed_sections_are_readable_but_leave_the_key_alone(recipe, tmp_path):
    def reads(view, out):
        (out / "batch.txt").write_text(str(view.generate.batch_size))

    keyed = Stage("s", reads, sections=("generate.batch_size",))
    unkeyed = Stage("s", reads, unkeyed_sections=("generate.batch_size",))
    other = recipe.model_copy(update={"generate": recipe.generate.model_copy(update={"batch_size": 3})})
    key = {name: Pipeline([stage], r, tmp_path).key(stage, {})[0]
           for name, stage, r in (("keyed", keyed, recipe), ("keyed-other", keyed, other),
                                  ("unkeyed", unkeyed, recipe), ("unkeyed-other", unkeyed, other))}
    assert key["keyed"] != key["keyed-other"]
    assert key["unkeyed"] == key["unkeyed-other"]


def test_a_derived_recipe_is_what_the_stage_reads_and_keys(recipe, tmp_path):
    def reads(view, out):
        (out / "epochs.txt").write_text(str(view.distill.epochs))

    def one_epoch(r):
        return r.model_copy(update={"distill": r.distill.model_copy(update={"epochs": 1})})

    stage = Stage("s", reads, sections=("distill",), derive=one_epoch)
    Pipeline([stage], recipe, tmp_path).run()
    assert (tmp_path / "s" / "epochs.txt").read_text() == "1"
    assert read_manifest(tmp_path / "s")["config"]["distill"]["epochs"] == 1


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny-lora.yaml", "default.yaml"])
def test_every_shipped_stage_declares_what_its_key_covers(name):
    """Every section a stage declares exists in the recipe schema (a typo would key on nothing)."""
    from edgedistill.recipe import Recipe
    from edgedistill.stages import stages_for

    def exists(model, path):
        head, _, rest = path.partition(".")
        field = model.model_fields.get(head)
        if field is None:
            return False
        if not rest:
            return True
        inner = [t for t in getattr(field.annotation, "__args__", (field.annotation,)) if hasattr(t, "model_fields")]
        return any(exists(t, rest) for t in inner)

    for stage in stages_for(load_recipe(ROOT / "recipes" / name)):
        for section in stage.sections + stage.unkeyed_sections:
            assert exists(Recipe, section), f"{stage.name}: {section}"
