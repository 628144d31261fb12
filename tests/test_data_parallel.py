"""Data-parallel distillation: two worker processes (gloo on CPU) give the one-process result,
whether the distill stage starts them (distill.processes) or torchrun does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgedistill.distill.train import _shard, distill
from edgedistill.pipeline import Pipeline
from edgedistill.recipe import load_recipe
from edgedistill.stages import stages_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    run = tmp_path_factory.mktemp("dp") / "run"
    Pipeline(stages_for(recipe), recipe, run, log=lambda _: None).run(to_stage="distill")
    return recipe, run


@pytest.mark.integration
def test_two_processes_match_one(prepared, tmp_path):
    recipe, run = prepared
    weights = {}
    for processes in (1, 2):
        cfg = recipe.distill.model_copy(update={"processes": processes, "epochs": 2, "batch_size": 6})
        out = tmp_path / f"p{processes}"
        out.mkdir()
        result = distill(recipe.model_copy(update={"distill": cfg}), out, student=run / "student",
                         logits=run / "logits", generate=run / "generate")
        assert result["processes"] == processes and len(result["epochs"]) == 2
        assert not (out / "checkpoint").exists()
        weights[processes] = load_file(str(out / "model.safetensors"))
    start = load_file(str(run / "student" / "model.safetensors"))
    moved = max((weights[1][k] - start[k]).abs().max().item() for k in start)
    differ = max((weights[1][k] - weights[2][k]).abs().max().item() for k in start)
    assert moved > 1e-3, "training changed nothing, the comparison would prove nothing"
    # fp32 sums in another order: the two runs agree to about 0.1% of how far training moved.
    assert differ < 1e-2 * moved, (differ, moved)


@pytest.mark.integration
def test_under_torchrun_every_process_trains_and_the_first_finishes(prepared, tmp_path):
    recipe, run = prepared
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("distill"))
    # The launcher a multi-GPU machine uses (accelerate launch runs torchrun); here two CPU processes.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "edgedistill.cli", "run", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(copy), "--to", "distill"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[teacher] up to date" in done.stdout and "[distill] done" in done.stdout
    assert done.stdout.count("stage(s) ran") == 1, "only the first process reports"
    manifest = json.loads((copy / "distill" / "manifest.json").read_text())
    assert manifest["result"]["processes"] == 2 and len(manifest["result"]["epochs"]) == recipe.distill.epochs
    assert not any((copy / ".partial").iterdir())
    one, two = load_file(str(run / "distill" / "model.safetensors")), load_file(str(copy / "distill" / "model.safetensors"))
    start = load_file(str(run / "student" / "model.safetensors"))
    moved = max((one[k] - start[k]).abs().max().item() for k in start)
    assert max((one[k] - two[k]).abs().max().item() for k in start) < 1e-2 * moved


@pytest.mark.unit
def test_batch_smaller_than_processes_is_refused():
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    with pytest.raises(ValueError, match="batch_size must be at least processes"):
        recipe.distill.model_validate({**recipe.distill.model_dump(), "processes": 4, "batch_size": 2})


class FakeSet:
    """Examples of given (length, prompt length), as SoftLabelSet.row_counts sees them."""

    def __init__(self, shapes):
        self.shapes = shapes

    def row_counts(self, i, kl_positions):
        length, prompt = self.shapes[i]
        return length - prompt, (length - 1 if kl_positions == "all" else length - prompt)


@pytest.mark.parametrize("kl_positions", ["all", "answer"])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.unit
def test_shard_weights_make_the_average_the_whole_batch_mean(kl_positions, world):
    # Per-token losses: each example's tokens all lose its index + 1, so means differ per example.
    data = FakeSet([(10, 7), (30, 20), (12, 11), (50, 10), (9, 3)])
    rows = list(range(5))
    for term in (0, 1):
        counts = [data.row_counts(i, kl_positions)[term] for i in rows]
        whole = sum((i + 1) * n for i, n in zip(rows, counts)) / sum(counts)
        averaged = 0.0
        for rank in range(world):
            mine, scales = _shard(data, rows, rank, world, kl_positions)
            mine_counts = [data.row_counts(i, kl_positions)[term] for i in mine]
            local_mean = sum((i + 1) * n for i, n in zip(mine, mine_counts)) / sum(mine_counts)
            averaged += scales[term] * local_mean / world
        assert averaged == pytest.approx(whole)


@pytest.mark.unit
def test_shard_gives_an_idle_process_a_zero_weight_row():
    data = FakeSet([(10, 7)])
    assert _shard(data, [0], 1, 2, "all") == ([0], (0.0, 0.0))
    assert _shard(data, [0], 0, 1, "all") == ([0], (1.0, 1.0))
