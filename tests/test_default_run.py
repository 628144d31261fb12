"""The default recipe on the real embedded teacher (slow: about 12 minutes on 2 cores).

    .venv/bin/python -m pytest -q -m slow tests/test_default_run.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgedistill.cli import main
from edgedistill.runtimes.llamacpp import LlamaCppChatModel

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_default_run_ships_a_student_that_keeps_most_of_the_teachers_score(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "recipes" / "default.yaml"), "--out", str(out)]) == 0
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    scores = {r["artifact"]: r for r in evaluation["artifacts"]}
    # The teacher clearly beats chance (0.5) on the held-out reviews.
    assert evaluation["reference"]["task_score"] >= 0.8
    # The student, at under half the teacher's parameters, keeps most of its score.
    assert scores["student-q4_k_m.gguf"]["share_of_reference"] >= 0.7
    assert scores["student-int4/"]["share_of_reference"] >= 0.7
    student = json.loads((out / "student" / "manifest.json").read_text())["result"]
    assert student["parameter_ratio"] <= 0.5

    chat = LlamaCppChatModel(out / "export" / "student-q4_k_m.gguf")
    (answer, finished), = chat.generate([[{"role": "user", "content": (
        "Read the review and say whether the opinion is positive or negative. Answer with one word: "
        "positive or negative.\n\nReview: The room was spotless and the staff could not have been kinder.")}]], 12)
    assert finished and answer.lower().startswith("positive")
