"""The stage runner: cache keys, resume, atomic stage folders and manifests.

    edgedistill run recipes/tiny.yaml --out runs/tiny            # runs what is not done yet
    edgedistill run recipes/tiny.yaml --out runs/tiny --from distill

Each stage writes one folder `RUN/<stage>/` with a `manifest.json`. Its cache key is a hash of
the stage's name and version, the recipe sections it reads, the content hashes of the stage
folders it reads and of any outside files (a prompt file, a model file). A stage whose folder
holds a manifest with the same key (and whose files are all there) is skipped.

The stage contract: a stage is a function `fn(recipe, out, **inputs)` where `recipe` is a
read-only view of the sections the Stage declares (SectionView: reading any
other raises), `out` is the folder to fill and `inputs` are the finished folders of the stages it
names. So the cache key is exactly what the stage reads.

A stage works in `RUN/.partial/<stage>.<key>/` and that folder is renamed to `RUN/<stage>/` only
when the stage has finished, so a run killed at any point never leaves a half-written stage under
its final name. The partial folder survives the kill, so a stage that saves progress there (the
generator per example, the trainer per epoch) resumes where it stopped when run again with the
same key.

One run at a time works in a run folder: `run` holds an exclusive flock on `RUN/.lock`
(which names its pid, host and start time) while it works, and a second run on the same folder
stops at once with a message naming the first. The kernel drops the lock when its process dies, so
a killed run never leaves the folder locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedistill import __version__
from edgedistill.errors import EdgedistillError, no_room, no_room_error
from edgedistill.layout import MANIFEST, PARTIAL, RUN_LOCK
from edgedistill.recipe import Recipe, section_dump

FOLLOW_POLL_S = 0.5


class UndeclaredSection(AttributeError):
    """A stage read a recipe section its Stage does not declare: a bug, since the stage's cache key
    would not change when that section does."""


# what a stage may call on the whole recipe whatever it declares: path resolution against the
# recipe's folder, which the stage's outside files (Stage.external) put into the key by content
RECIPE_PATH_HELPERS = ("resolve", "source", "base_dir")


class SectionView:
    """A read-only view of a recipe (or of one of its sections) that lets a stage read only the
    sections it declares: `keyed` ones go into its cache key, `unkeyed` ones are read on purpose
    without changing the result (an endpoint's URL). Reading anything else raises UndeclaredSection.

    A declared name covers everything under it ("distill" covers distill.topk); reading a section
    that is only partly declared ("generate" when "generate.batch_size" is) gives a view of it,
    or None when the section is not set."""

    def __init__(self, value: Any, declared: tuple[str, ...], path: str = ""):
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_declared", declared)
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self._path}.{name}" if self._path else name
        value = getattr(self._value, name)
        if not self._path and name in RECIPE_PATH_HELPERS:
            return value
        if any(full == d or full.startswith(d + ".") for d in self._declared):
            return value
        if value is not None and any(d.startswith(full + ".") for d in self._declared):
            return SectionView(value, self._declared, full)
        if value is None and any(d.startswith(full + ".") for d in self._declared):
            return None
        raise UndeclaredSection(f"this stage reads recipe.{full}, which its Stage does not declare: add it to the "
                                f"Stage's sections (or unkeyed_sections), so that the cache key covers what it reads")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the recipe is read-only in a stage (tried to set {name})")

    def __repr__(self) -> str:
        return f"SectionView({self._path or 'recipe'}, declared={list(self._declared)})"


@dataclass(frozen=True)
class Check:
    """A quick look after a stage, on every run whether the stage ran or was up to date: whether later
    stages can do what the recipe asks (edgedistill.export.check). `fn(recipe, folder, stages=...)` gets
    a view of `sections`, the stage's folder and the names of the stages this run goes to (--to); it
    writes nothing and returns a line for the log, or None. It has no cache key, and its EdgedistillError
    stops the run before the stages after it."""

    fn: Callable[..., str | None]
    sections: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: `fn(recipe, out, **inputs)` fills `out` from input stage folders,
    reading only `sections` (in the key) and `unkeyed_sections` (read on purpose, not in the key)
    of the recipe."""

    name: str
    fn: Callable[..., dict[str, Any] | None]
    inputs: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    unkeyed_sections: tuple[str, ...] = ()
    # The recipe as this stage sees it, when it is not the run's own (a progressive step's pruning).
    derive: Callable[[Recipe], Recipe] | None = None
    # Outside files whose content goes into the key, found from the recipe.
    external: Callable[[Recipe], dict[str, Path]] | None = None
    # Bump when the stage's code changes what it writes, so old folders are not reused.
    version: int = 1
    # Under a launcher (torchrun, accelerate launch) every process runs this stage's function and
    # takes part (training); other stages run in the first process while the rest wait for them.
    distributed: bool = False
    # Run after this stage on every run; not part of the key.
    check: Check | None = None


@dataclass
class StageResult:
    name: str
    path: Path
    cached: bool
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)


def launched() -> tuple[int, int]:
    """(rank, world size) when started by torchrun or accelerate launch, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def launch_id() -> str:
    """Tells this launch's processes from an earlier one's (files left by a killed launch)."""
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(path: Path) -> str:
    """Content hash of a file, or of every file in a folder (relative names included)."""
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return sha256_json({str(p.relative_to(path)): sha256_file(p) for p in files})


def clear_folder(folder: Path) -> None:
    """Empties a stage's partial folder, for stages that start over instead of resuming."""
    for leftover in folder.iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


def drop_leftovers(folder: Path) -> None:
    """Removes what a killed writer left in a stage's partial folder: the hidden names that atomic
    writes use (`.NAME.<pid>.partial`, a `.NAME.xxxx/` scratch folder). A stage's own files never
    start with a dot, and the run lock means no other process is writing here, so these are never
    adopted into the stage's manifest (which would change its key and keep hundreds of MB)."""
    for leftover in sorted(folder.rglob(".*"), key=lambda p: len(p.parts)):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def manifest_digest(manifest: dict[str, Any]) -> str:
    """What a downstream stage's key depends on: the content of this stage's files."""
    return sha256_json(manifest["files"])


def is_complete(folder: Path, key: str | None = None) -> bool:
    """Whether `folder` holds its manifest's files at their sizes (what every run checks: cheap)."""
    manifest = read_manifest(folder)
    if manifest is None or (key is not None and manifest.get("key") != key):
        return False
    for rel, info in manifest["files"].items():
        file = folder / rel
        if not file.is_file() or file.stat().st_size != info["bytes"]:
            return False
    return True


def changed_files(folder: Path) -> list[str]:
    """The files of a finished stage whose content no longer matches their manifest's sha256
    (`run --verify`): a same-size corruption that the size check of `is_complete` cannot see."""
    manifest = read_manifest(folder) or {"files": {}}
    return [rel for rel, info in manifest["files"].items()
            if not (folder / rel).is_file() or sha256_file(folder / rel) != info["sha256"]]


def write_manifest(folder: Path, stage: Stage, key: str, config: dict[str, Any], inputs: dict[str, str],
                   seconds: float, extra: dict[str, Any] | None) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "stage": stage.name,
        "stage_version": stage.version,
        "edgedistill_version": __version__,
        "key": key,
        "config": config,
        "inputs": inputs,
        "files": files,
        "seconds": round(seconds, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"result": extra} if extra else {}),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Holds the run folder for one run: an exclusive flock on RUN/.lock, or
    EdgedistillError naming the run that holds it."""
    path = run_dir / RUN_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise EdgedistillError(f"{run_dir} is in use by {holder}",
                                   "wait for that run to finish, or use another --out folder") from None
        # A run that just ended removed the file it held: then this lock is on a file nobody else
        # will open, so start again with the file now at the path.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        except OSError as exc:
            if no_room(exc) is None:
                raise
            raise no_room_error(path, exc, "nothing was lost") from None
        yield
    finally:
        # removed while still held, so the next run never locks a file that is about to vanish
        path.unlink(missing_ok=True)
        os.close(fd)


def _lock_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"edgedistill run, pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another edgedistill run (which has not written its pid yet)"


class Pipeline:
    """Runs stages in order under one run folder, skipping those already done for the same key."""

    def __init__(self, stages: list[Stage], recipe: Recipe, run_dir: Path, log: Callable[[str], None] = print):
        names = [s.name for s in stages]
        for stage in stages:
            unknown = [i for i in stage.inputs if i not in names[: names.index(stage.name)]]
            if unknown:
                raise ValueError(f"stage {stage.name} reads {unknown}, which do not run before it")
        self.stages, self.recipe, self.run_dir, self.log = stages, recipe, run_dir, log

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage_recipe(self, stage: Stage) -> Recipe:
        return stage.derive(self.recipe) if stage.derive is not None else self.recipe

    def view(self, stage: Stage) -> SectionView:
        """What the stage's function gets as its recipe: the declared sections, read-only."""
        return SectionView(self.stage_recipe(stage), stage.sections + stage.unkeyed_sections)

    def key(self, stage: Stage, inputs: dict[str, str]) -> tuple[str, dict[str, Any]]:
        recipe = self.stage_recipe(stage)
        config = section_dump(recipe, stage.sections)
        external = {}
        if stage.external is not None:
            external = {name: fingerprint(path) for name, path in stage.external(recipe).items()}
        key = sha256_json({"stage": stage.name, "version": stage.version, "config": config,
                           "inputs": inputs, "external": external})
        return key, config

    def run(self, *, force: bool = False, from_stage: str | None = None, to_stage: str | None = None,
            verify: bool = False) -> list[StageResult]:
        """Runs the stages in order (from `from_stage` on, redone; up to `to_stage`, included).
        With `verify`, a finished stage counts as done only if every file's sha256 still matches
        its manifest; one that does not is named and run again."""
        for flag, name in (("--from", from_stage), ("--to", to_stage)):
            if name is not None and name not in self.stage_names():
                raise EdgedistillError(f"{flag} {name}: no such stage", f"use one of: {', '.join(self.stage_names())}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if launched()[0] > 0:
            return self._follow()  # the first process holds the lock for the whole launch
        with run_lock(self.run_dir):
            return self._run_all(force, from_stage, to_stage, verify)

    def _run_all(self, force: bool, from_stage: str | None, to_stage: str | None, verify: bool) -> list[StageResult]:
        redo = force
        names = self.stage_names()
        reaching = tuple(names[: names.index(to_stage) + 1] if to_stage is not None else names)
        results: list[StageResult] = []
        digests: dict[str, str] = {}
        for stage in self.stages:
            redo = redo or stage.name == from_stage
            inputs = {name: digests[name] for name in stage.inputs}
            result = self._run_stage(stage, inputs, redo, verify)
            digests[stage.name] = manifest_digest(result.manifest)
            results.append(result)
            said = None if stage.check is None else stage.check.fn(
                SectionView(self.stage_recipe(stage), stage.check.sections), result.path, stages=reaching)
            if said is not None:
                self.log(f"[{stage.name}] {said}")
            if stage.name == to_stage:
                break
        reached = {r.name for r in results}
        for stage in self.stages:
            if stage.distributed and stage.name not in reached:
                self._announce(stage, None)
        return results

    def _run_stage(self, stage: Stage, inputs: dict[str, str], redo: bool, verify: bool) -> StageResult:
        key, config = self.key(stage, inputs)
        final = self.run_dir / stage.name
        partial = self.run_dir / PARTIAL / f"{stage.name}.{key[:16]}"
        if not redo and verify and is_complete(final, key):
            changed = changed_files(final)
            if changed:
                self.log(f"[{stage.name}] {', '.join(changed)} changed since the stage wrote "
                         f"{'them' if len(changed) > 1 else 'it'} (sha256 differs from {final / MANIFEST}): running it again")
                redo = True
        if not redo and is_complete(final, key):
            self.log(f"[{stage.name}] up to date{', verified' if verify else ''}, skipped")
            if stage.distributed:
                self._announce(stage, None)
            return StageResult(stage.name, final, True, 0.0, read_manifest(final) or {})

        if redo and partial.exists():
            shutil.rmtree(partial)
        resumed = partial.exists()
        if resumed:
            drop_leftovers(partial)
        partial.mkdir(parents=True, exist_ok=True)
        if stage.distributed:
            self._announce(stage, partial)
        self.log(f"[{stage.name}] {'resuming' if resumed else 'running'}")
        started = time.perf_counter()
        input_paths = {name: self.run_dir / name for name in stage.inputs}
        try:
            extra = stage.fn(self.view(stage), partial, **input_paths)
            seconds = time.perf_counter() - started
            manifest = write_manifest(partial, stage, key, config, inputs, seconds, extra)
            self._swap_into_place(partial, final)
        except Exception as exc:  # whichever layer reports the full disk (torch, safetensors, numpy, os)
            if no_room(exc) is None:
                raise
            raise no_room_error(f"{stage.name}'s folder {partial}", exc,
                                f"finished stages are kept and {stage.name} resumes from what it saved") from None
        self._drop_stale_partials(stage.name)
        self.log(f"[{stage.name}] done in {seconds:.1f} s")
        return StageResult(stage.name, final, False, seconds, manifest)

    # Under a launcher (torchrun, accelerate launch) the first process runs the pipeline; the
    # others only take part in the distributed stages. For each of those, in order, the first
    # writes `.partial/<stage>.launch` naming the folder to work in, or none when the stage is
    # skipped; the others wait for it (torchrun ends every process when one fails).

    def _announce(self, stage: Stage, partial: Path | None) -> None:
        if launched()[1] == 1:
            return
        note = self.run_dir / PARTIAL / f"{stage.name}.launch"
        note.parent.mkdir(parents=True, exist_ok=True)
        aside = note.with_suffix(".writing")
        aside.write_text(json.dumps({"launch": launch_id(), "partial": str(partial) if partial else None}))
        os.rename(aside, note)

    def _follow(self) -> list[StageResult]:
        for stage in self.stages:
            if not stage.distributed:
                continue
            note = self.run_dir / PARTIAL / f"{stage.name}.launch"
            while True:
                try:
                    told = json.loads(note.read_text())
                except (OSError, ValueError):
                    told = {}
                if told.get("launch") == launch_id():
                    break
                time.sleep(FOLLOW_POLL_S)
            if told["partial"] is not None:
                stage.fn(self.view(stage), Path(told["partial"]), **{name: self.run_dir / name for name in stage.inputs})
        return []

    def _swap_into_place(self, partial: Path, final: Path) -> None:
        # A killed swap leaves no final folder (so the stage reruns), never a mix of old and new.
        if final.exists():
            trash = self.run_dir / PARTIAL / f"old-{final.name}.{os.getpid()}"
            if trash.exists():
                shutil.rmtree(trash)
            os.rename(final, trash)
            os.rename(partial, final)
            shutil.rmtree(trash)
        else:
            os.rename(partial, final)

    def _drop_stale_partials(self, name: str) -> None:
        for old in (self.run_dir / PARTIAL).glob(f"{name}.*"):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)  # a launch note
        for old in (self.run_dir / PARTIAL).glob(f"old-{name}.*"):
            shutil.rmtree(old, ignore_errors=True)
