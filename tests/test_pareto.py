"""tools/pareto.py's pure parts on tiny inputs: shapes, the shape's recipe, the front, resume, the
table and the plot; no pipeline, no timing.

    .venv/bin/python -m pytest -q tests/test_pareto.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from edgedistill.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TEACHER = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30}

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pareto():
    # tools/ is a folder of scripts, not a package
    spec = importlib.util.spec_from_file_location("pareto", ROOT / "tools" / "pareto.py")
    module = importlib.util.module_from_spec(spec)
    # registered before it runs: its dataclass looks its module up by name
    sys.modules["pareto"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["pareto"]


def test_shapes_parse_and_refuse_bad_text(pareto):
    shape = pareto.parse_shape("8x384x1024")
    assert (shape.blocks, shape.hidden_size, shape.intermediate_size, shape.name) == (8, 384, 1024, "8x384x1024")
    longer = pareto.parse_shape("8x256x1024@8")
    assert (longer.epochs, longer.name) == (8, "8x256x1024-e8")
    for bad in ("8x384", "8x384x1024@0", "8x384x1024@"):
        with pytest.raises(SystemExit, match="BLOCKSxHIDDENxMLP"):
            pareto.parse_shape(bad)


def test_shape_recipe_keeps_the_base_keys_at_full_width(pareto):
    recipe = load_recipe(ROOT / "recipes" / "default.yaml")
    same = pareto.shape_recipe(recipe, pareto.parse_shape("10x576x1536"), TEACHER)
    # the default student, unchanged: the student and distill stages' cache keys are the base run's
    assert same.student.model_dump() == recipe.student.model_dump()
    assert same.export.onnx == [] and "Q4_K_M" in same.export.quants
    narrow = pareto.shape_recipe(recipe, pareto.parse_shape("8x256x1536"), TEACHER)
    assert narrow.student.keep_layers == 8 and narrow.student.layer_selection == recipe.student.layer_selection
    assert narrow.student.width.model_dump() == {"intermediate_size": None, "num_attention_heads": None,
                                                 "hidden_size": 256}
    assert narrow.distill.epochs == recipe.distill.epochs
    assert pareto.shape_recipe(recipe, pareto.parse_shape("8x256x1536@8"), TEACHER).distill.epochs == 8
    with pytest.raises(SystemExit, match="wider than the teacher's 576"):
        pareto.shape_recipe(recipe, pareto.parse_shape("8x640x1024"), TEACHER)


def test_a_quant_aware_recipe_keeps_its_gguf_grids(pareto):
    # the shapes export no ONNX, so an onnx-int4 grid would make the recipe invalid
    recipe = load_recipe(ROOT / "recipes" / "sentiment-quant-aware.yaml")
    shaped = pareto.shape_recipe(recipe, pareto.parse_shape("8x256x1024@6"), TEACHER)
    assert shaped.distill.quant_aware.grids == ["Q4_K_M"]
    assert (shaped.distill.epochs, shaped.distill.quant_aware.epochs) == (6, recipe.distill.quant_aware.epochs)
    only_onnx = recipe.model_copy(update={"distill": recipe.distill.model_copy(
        update={"quant_aware": recipe.distill.quant_aware.model_copy(update={"grids": ["onnx-int4"]})})})
    assert pareto.shape_recipe(only_onnx, pareto.parse_shape("8x256x1024"), TEACHER).distill.quant_aware is None


def test_front_marks_the_rows_nothing_beats(pareto):
    rows = [{"shape": "a", "share_of_teacher": 0.95, "speed_ratio": 2.0},
            {"shape": "b", "share_of_teacher": 0.90, "speed_ratio": 1.5},  # beaten by a in both
            {"shape": "c", "share_of_teacher": 0.80, "speed_ratio": 5.5},
            {"shape": "d", "share_of_teacher": 0.80, "speed_ratio": 5.5},  # a tie: both stay on it
            {"shape": "e", "share_of_teacher": None, "speed_ratio": 9.0}]  # not measured: never on it
    marked = {r["shape"]: r["on_front"] for r in pareto.with_front(rows)}
    assert marked == {"a": True, "b": False, "c": True, "d": True, "e": False}


def test_median_of_rounds(pareto):
    assert pareto.median([3.0, 1.0, 2.0]) == 2.0 and pareto.median([4.0, 1.0]) == 2.5


def _result(shape: str, share: float, ratio: float) -> dict:
    return {"shape": shape, "share_of_teacher": share, "share_of_teacher_interval": [share - 0.05, share + 0.05],
            "speed_ratio": ratio, "task_score": 0.8 * share, "correct": 100, "examples": 128, "file_mb": 20.0,
            "decode_tokens_per_s": 100 * ratio, "teacher_decode_tokens_per_s": 100.0,
            "load_average_before": [1.0, 1.0, 1.0], "load_average_after": [1.5, 1.0, 1.0]}


def test_resume_does_only_the_missing_shapes(pareto, tmp_path):
    shapes = [pareto.parse_shape(s) for s in ("10x576x1536", "8x384x1024", "8x256x1024")]
    assert pareto.pending(shapes, tmp_path) == shapes
    (tmp_path / "8x384x1024.json").write_text(json.dumps(_result("8x384x1024", 0.9, 3.0)))
    assert [s.name for s in pareto.pending(shapes, tmp_path)] == ["10x576x1536", "8x256x1024"]
    # a result not asked for is left out; the order is the shapes'
    (tmp_path / "6x320x1024.json").write_text(json.dumps(_result("6x320x1024", 0.8, 4.0)))
    (tmp_path / "10x576x1536.json").write_text(json.dumps(_result("10x576x1536", 0.9, 2.0)))
    assert [r["shape"] for r in pareto.load_results(shapes, tmp_path)] == ["10x576x1536", "8x384x1024"]


def test_summary_table_and_plot(pareto, tmp_path):
    reference = {"task_score": 0.8, "q4_task_score": 0.82, "q4_file_mb": 101.0}
    rows = [_result("10x576x1536", 0.92, 2.3), _result("8x256x1024", 0.91, 5.2), _result("6x256x768", 0.7, 4.0)]
    summary = pareto.summarize(Path("recipes/default.yaml"), reference, rows)
    assert [r["on_front"] for r in summary["shapes"]] == [True, True, False]  # 6x256x768: 8x256x1024 beats it
    assert summary["teacher"]["q4_share"] == 1.025 and summary["teacher"]["on_front"]
    assert summary["meeting_target"] == ["8x256x1024"]
    lines = pareto.table_lines(summary)
    assert len(lines) == 2 + 1 + 3 and "| 8x256x1024 |" in lines[4] and "5.20x | yes |" in lines[4]
    pareto.write_plot(summary, tmp_path / "pareto.svg")
    svg = (tmp_path / "pareto.svg").read_text()
    assert "8x256x1024" in svg and "Pareto front" in svg


def test_a_teacher_that_scores_zero_gives_no_shares(pareto, tmp_path):
    summary = pareto.summarize(Path("recipes/tiny.yaml"), {"task_score": 0.0, "q4_task_score": 0.0, "q4_file_mb": 1.0},
                               [{**_result("2x32x96", 0.0, 1.2), "share_of_teacher": None}])
    assert summary["teacher"]["q4_share"] is None and not summary["shapes"][0]["on_front"]
    assert "| 2x32x96 |" in pareto.table_lines(summary)[3]
    pareto.write_plot(summary, tmp_path / "pareto.svg")
