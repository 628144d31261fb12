"""Routing calibration (edgedistill.route): the curve of teacher calls against share of the teacher's
score, the confidence rules, and `edgedistill route` on a run folder whose student is a real GGUF.

    .venv/bin/python -m pytest -q tests/test_route.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_model

from edgedistill.cli import main
from edgedistill.route import LEAST_CONFIDENT, calibrate, routing_curve, token_confidence


@pytest.mark.unit
def test_routing_the_least_confident_first_reaches_the_teacher_with_those_calls_only():
    # the student is wrong exactly where it is least confident
    student = [1, 1, 0, 1, 0, 1, 1, 1, 1, 1]
    teacher = [1] * 10
    confidences = [0.9, 0.8, 0.1, 0.7, 0.2, 0.95, 0.6, 0.85, 0.75, 0.65]
    curve = routing_curve(student, teacher, confidences)
    assert [p.teacher_calls for p in curve] == list(range(11))
    assert curve[0].share_of_teacher == 0.8 and curve[0].threshold is None
    assert curve[2].share_of_teacher == 1.0 and curve[1].share_of_teacher == 0.9
    # a threshold sends exactly its point's calls: those below it
    for point in curve[1:]:
        assert sum(c < point.threshold for c in confidences) == point.teacher_calls
    assert curve[2].low <= 1.0 <= curve[2].high


@pytest.mark.unit
def test_confidence_rules_read_the_answers_token_log_probs():
    logprobs = [-0.1, -0.2, -3.0, -0.05]
    assert token_confidence(logprobs, "min") == -3.0
    assert token_confidence(logprobs, "mean") == pytest.approx(-0.8375)
    assert -3.0 < token_confidence(logprobs, "p25") < -0.1
    assert token_confidence([], "min") == LEAST_CONFIDENT
    with pytest.raises(Exception, match="unknown confidence rule"):
        token_confidence(logprobs, "median-ish")


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory) -> Path:
    """A run folder as the eval stage leaves it, with a tiny model's F16 GGUF as the student."""
    from edgedistill.export.gguf import write_gguf

    root = tmp_path_factory.mktemp("route")
    gguf = write_gguf(make_tiny_model(root / "student"), root / "student-q4_k_m.gguf")
    (root / "generate").mkdir()
    (root / "eval").mkdir()
    prompts = ["kaka lomi", "tuna rapo", "mine deva", "quzé ñuør", "sipo kalo", "nemi tura"]
    records = [{"id": i, "messages": [{"role": "user", "content": p}], "label": "positive" if i % 2 else "negative",
                "choices": ["positive", "negative"]} for i, p in enumerate(prompts)]
    (root / "generate" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def row(name: str, path: str, right: list[bool]) -> dict:
        answers = [{"id": r["id"], "answer": r["label"] if ok else "unsure", "predicted": r["label"] if ok else None,
                    "label": r["label"]} for r, ok in zip(records, right)]
        return {"artifact": name, "path": path, "examples": len(records), "correct": sum(right),
                "task_score": sum(right) / len(records), "answers": answers}

    report = {"schema_version": 1, "data": str(root / "generate" / "heldout.jsonl"),
              "reference": row("teacher/", str(root / "teacher"), [True] * 6),
              "artifacts": [row("student-q4_k_m.gguf", str(gguf), [True, False, True, True, False, True])]}
    (root / "eval" / "eval.json").write_text(json.dumps(report))
    return root


@pytest.mark.integration
def test_route_calibrates_a_run_and_writes_route_json(routed_run, capsys):
    result = calibrate(routed_run)
    assert result["artifact"] == "student-q4_k_m.gguf" and result["rule"] == "margin"
    assert result["student_score"] == round(4 / 6, 4) and result["teacher_score"] == 1.0
    curve = result["curves"]["margin"]
    assert len(curve) == 7 and curve[-1]["share_of_teacher"] == 1.0
    assert result["reached"] and result["share_of_teacher"] >= 0.99
    assert result["teacher_call_share"] == curve[[p["teacher_calls"] for p in curve].index(
        round(result["teacher_call_share"] * 6))]["teacher_call_share"]
    assert main(["route", str(routed_run), "--target", "0.9"]) == 0
    written = json.loads((routed_run / "route" / "route.json").read_text())
    assert written["target"] == 0.9 and "teacher" in capsys.readouterr().out


@pytest.mark.integration
def test_route_names_the_rows_it_can_use(routed_run):
    assert main(["route", str(routed_run), "--artifact", "nonesuch.gguf"]) == 2
