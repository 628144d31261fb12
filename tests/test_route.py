"""Routing calibration (edgedistill.route): the curve of teacher calls against share of the teacher's
score, the confidence rules, `edgedistill route` on a run folder whose student is a real GGUF, the
route stage of a recipe with `route:` (through the stage runner), the report's Routing section and
plot, and the bundle's route.json with the serve command on its model card.

    .venv/bin/python -m pytest -q tests/test_route.py
"""

from __future__ import annotations

import json
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_model
from test_bundle import _fake_run as fake_bundle_run
from test_bundle import _members, _rewrite
from test_report import make_run as fake_report_run

from edgedistill.bundle import make_bundle, verify_bundle
from edgedistill.cli import main
from edgedistill.errors import EdgedistillError
from edgedistill.pipeline import Pipeline, Stage
from edgedistill.recipe import RouteConfig, load_recipe
from edgedistill.report.data import load_run
from edgedistill.report.html import render_html
from edgedistill.report.markdown import render_markdown
from edgedistill.route import (LEAST_CONFIDENT, calibrate, choose_route, held_out_check, routing_curve,
                               token_confidence)
from edgedistill.stages import stages_for

ROOT = Path(__file__).resolve().parent.parent


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
    # equal confidences go to the teacher together: no point claims to split them
    tied = routing_curve([0, 0, 1, 1], [1] * 4, [-2.0, -2.0, -0.5, -0.1])
    assert [p.teacher_calls for p in tied] == [0, 2, 3, 4]
    assert all(sum(c < p.threshold for c in [-2.0, -2.0, -0.5, -0.1]) == p.teacher_calls for p in tied[1:])


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
    (root / "export").mkdir()
    gguf = write_gguf(make_tiny_model(root / "student"), root / "export" / "student-q4_k_m.gguf")
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
    assert main(["route", str(routed_run), "--budget", "0.5"]) == 0
    written = json.loads((routed_run / "route" / "route.json").read_text())
    assert written["budget"] == 0.5 and written["teacher_call_share"] <= 0.5
    assert "(budget 50%)" in capsys.readouterr().out
    assert main(["route", str(routed_run), "--budget", "25"]) == 2
    assert "--budget 25 is not a share" in capsys.readouterr().err


@pytest.mark.integration
def test_route_names_the_rows_it_can_use(routed_run):
    assert main(["route", str(routed_run), "--artifact", "nonesuch.gguf"]) == 2


# --- the route stage --------------------------------------------------------------------------------


def _with_route(**route) -> object:
    return load_recipe(ROOT / "recipes" / "tiny.yaml").model_copy(update={"route": RouteConfig(**route)})


def _keys(recipe) -> dict[str, str]:
    stages = stages_for(recipe)
    pipeline = Pipeline(stages, recipe, Path("unused"))
    return {s.name: pipeline.key(dataclasses.replace(s, external=None), {name: "input" for name in s.inputs})[0]
            for s in stages}


@pytest.mark.unit
def test_a_route_section_adds_the_route_stage_after_eval_and_changes_no_other_key():
    plain, routed = load_recipe(ROOT / "recipes" / "tiny.yaml"), _with_route()
    names = [s.name for s in stages_for(routed)]
    assert "route" not in [s.name for s in stages_for(plain)]
    assert names.index("route") == names.index("eval") + 1 and names[-1] == "report"
    route = next(s for s in stages_for(routed) if s.name == "route")
    assert route.inputs == ("generate", "eval", "export", "export_onnx") and route.sections == ("route",)
    before, after = _keys(plain), _keys(routed)
    # the report reads route/ too; every other stage is what it was
    assert {n for n in before if before[n] != after[n]} == {"report"}
    assert _keys(_with_route(target=0.95))["route"] != after["route"]


@pytest.mark.integration
def test_route_stage_runs_through_the_stage_runner_from_the_export_folder(routed_run, tmp_path):
    recipe = _with_route(target=0.9)
    recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={"onnx": []})})
    route = next(s for s in stages_for(recipe) if s.name == "route")

    def copy(name: str):
        def stage(recipe, out):
            shutil.copytree(routed_run / name, out, dirs_exist_ok=True)
        return stage

    # eval.json's rows point elsewhere: the stage runs the GGUF of its export input, which its key covers
    eval_json = json.loads((routed_run / "eval" / "eval.json").read_text())
    eval_json["artifacts"][0]["path"] = str(tmp_path / "moved" / "student-q4_k_m.gguf")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(eval_json))
    stages = [Stage("generate", copy("generate")), Stage("export", copy("export")),
              Stage("eval", lambda recipe, out: shutil.copy(tmp_path / "eval" / "eval.json", out)), route]
    run = tmp_path / "run"
    results = Pipeline(stages, recipe, run, log=lambda _: None).run()
    assert sorted(p.name for p in (run / "route").iterdir()) == ["manifest.json", "route.json"]
    written = json.loads((run / "route" / "route.json").read_text())
    assert written["target"] == 0.9 and written["artifact"] == "student-q4_k_m.gguf"
    assert written["path"] == str(run / "export" / "student-q4_k_m.gguf")
    assert written["curves"] == calibrate(routed_run, target=0.9)["curves"]
    assert results[-1].manifest["result"]["rule"] == written["rule"] == "margin"
    again = Pipeline(stages, recipe, run, log=lambda _: None).run()
    assert again[-1].cached and (run / "route" / "route.json").read_text() == json.dumps(written, indent=2) + "\n"
    with pytest.raises(EdgedistillError, match="route.artifact 'student-q8_0.gguf' is not in"):
        eval_json["artifacts"][0]["artifact"] = "student-q8_0.gguf"
        (run / "eval" / "eval.json").write_text(json.dumps(eval_json))
        route.fn(_with_route(artifact="student-q8_0.gguf"), tmp_path, generate=run / "generate", eval=run / "eval",
                 export=run / "export")


# --- the report and the bundle ----------------------------------------------------------------------


def _route_json() -> dict:
    """route.json of 8 examples: the student misses 2 that the teacher gets; rule min finds both first."""
    student, teacher = [1, 0, 1, 1, 0, 1, 1, 1], [1] * 8
    confidences = {"min": [-0.1, -3.0, -0.2, -0.3, -2.5, -0.4, -0.5, -0.6],
                   "mean": [-0.1, -1.0, -3.0, -0.3, -2.5, -0.4, -0.5, -0.6]}
    return {"format": 1, "artifact": "student-q4_k_m.gguf", "path": "/elsewhere/student-q4_k_m.gguf", "examples": 8,
            "scorer": "label", **choose_route(student, teacher, confidences, 0.99)}


@pytest.mark.unit
def test_the_chosen_route_is_the_rule_with_the_fewest_teacher_calls():
    route = _route_json()
    assert route["rule"] == "min" and route["threshold"] == -0.6 and route["teacher_call_share"] == 0.25
    assert route["share_of_teacher"] == 1.0 and route["reached"]
    assert route["random_routing_share_of_teacher"] == 0.8125  # 0.75 + 0.25 of the 0.25 the student misses


@pytest.mark.unit
def test_a_budget_keeps_the_most_of_the_teachers_score_within_that_share_of_calls():
    # the student misses its 2 least confident answers under `min` and is never helped by `mean`'s
    # order past its third call: within 3 calls min keeps all of the teacher's score with 2 of them
    student, teacher = [1, 0, 1, 1, 0, 1, 1, 1], [1] * 8
    confidences = {"mean": [-0.1, -1.0, -3.0, -0.3, -2.5, -0.4, -0.5, -0.6],
                   "min": [-0.1, -3.0, -0.2, -0.3, -2.5, -0.4, -0.5, -0.6]}
    route = choose_route(student, teacher, confidences, 0.99, budget=3 / 8)
    assert route["budget"] == 3 / 8 and route["rule"] == "min" and route["teacher_call_share"] == 0.25
    assert route["share_of_teacher"] == 1.0 and route["reached"]
    # one call allowed: the best share within it, and the target is not reached
    tight = choose_route(student, teacher, confidences, 0.99, budget=1 / 8)
    assert tight["teacher_call_share"] == 0.125 and tight["share_of_teacher"] == round(7 / 8, 4)
    assert not tight["reached"] and tight["held_out_check"]["teacher_call_share"] <= 0.25
    # each fold is routed by the budget's choice on the others: 40 examples, 10 misses, the least
    # confident; a fold's misses fall below the threshold the other 35 chose, all within 30% of calls
    many = [1 if i % 4 else 0 for i in range(40)]
    order = {"min": [(-3.0 if s == 0 else -0.5) - i / 1000 for i, s in enumerate(many)]}
    check = held_out_check(many, [1] * 40, order, 0.99, budget=0.3)
    assert check["share_of_teacher"] == 1.0 and check["teacher_call_share"] <= 0.3
    assert all(fold["threshold"] is not None for fold in check["folds"])


@pytest.mark.unit
def test_the_held_out_check_routes_each_fold_by_the_threshold_fitted_on_the_others():
    # the student misses exactly its least confident answers: a threshold fitted on 7 of 8 folds
    # sends the eighth's misses to the teacher, and only a few others
    student = [0 if i % 5 == 0 else 1 for i in range(40)]
    teacher = [1] * 40
    confidences = {"min": [-5.0 - i / 100 if s == 0 else -0.1 - i / 100 for i, s in enumerate(student)]}
    check = held_out_check(student, teacher, confidences, 0.99)
    assert check["share_of_teacher"] == 1.0 and check["reached"]
    assert check["folds_count"] == 8 and len(check["folds"]) == 8
    assert all(fold["fit_examples"] + fold["examples"] == 40 for fold in check["folds"])
    assert sum(fold["examples"] for fold in check["folds"]) == 40
    assert held_out_check(student, teacher, confidences, 0.99, folds=2)["folds_count"] == 2
    assert 0.2 <= check["teacher_call_share"] <= 0.3
    # uninformative confidences fitted on some folds do not carry to another
    noise = {"min": [float(np.sin(7.0 * i)) for i in range(40)]}
    fitted = choose_route(student, teacher, noise, 0.99)
    assert fitted["held_out_check"]["teacher_call_share"] >= 0.5 or not fitted["held_out_check"]["reached"]
    assert "held_out_check" in _route_json()


@pytest.mark.unit
def test_report_shows_the_routing_section_and_plot_when_the_run_has_route_json(tmp_path):
    run = fake_report_run(tmp_path)
    assert "## Routing" not in render_markdown(load_run(run))
    (run / "route").mkdir()
    (run / "route" / "route.json").write_text(json.dumps(_route_json()))  # as `edgedistill route RUN` leaves it
    data = load_run(run)
    report = render_markdown(data)
    section = report.split("## Routing: when the student hands a request to the teacher")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| *"): line for line in section.splitlines() if line.startswith("| ")}
    assert rows["min (chosen)"] == "| **min (chosen)** | -0.6 | 25.0 (2 of 8) | 100.0 [100.0, 100.0] | yes |"
    # rule mean sends one right answer first: its fewest calls that reach 99% are 3
    assert rows["mean"] == "| mean | -0.6 | 37.5 (3 of 8) | 100.0 [100.0, 100.0] | yes |"
    assert rows["random (same calls as chosen)"] == "| random (same calls as chosen) | – | 25.0 (2 of 8) | 81.2 | no |"
    # the choice made on other examples (4 folds of 2 here): what a new request may expect
    assert rows["chosen on other examples (4-fold cross-validation)"] == \
        "| chosen on other examples (4-fold cross-validation) | per fold | 37.5 (3 of 8) | 100.0 [100.0, 100.0] | yes |"
    # with a budget the other rules show their best within it, and the note says what was chosen
    budgeted = {**_route_json(), "budget": 0.125}
    (run / "route" / "route.json").write_text(json.dumps(budgeted))
    with_budget = render_markdown(load_run(run))
    # mean's least confident answer is right: within one call, none is worth making
    assert "| mean | – (none) | 0.0 (0 of 8) | 75.0 [37.5, 100.0] | no |" in with_budget
    assert "at most 12.5% of requests sent to it" in with_budget
    (run / "route" / "route.json").write_text(json.dumps(_route_json()))
    assert "reaches 99%" in section and "Source: from route/route.json: rule, threshold" in section
    assert "`edgedistill serve student-q4_k_m.gguf --route route/route.json --teacher URL`" in section
    assert "`route/route.json`" in report.split("## Sources")[1]
    page = render_html(data)
    assert page.count("<svg") == 4 and '<table id="routing">' in page
    plot = page.split('<svg id="plot-routing"')[1].split("</svg>")[0]
    for text in ("rule min (chosen)", "rule mean", "random routing (expected)", "target: 99% of the teacher",
                 "chosen: min below -0.6, 25.0% of requests, 100.0%"):
        assert text in plot
    assert render_html(load_run(run)) == page  # the same bytes every time


@pytest.mark.unit
def test_bundle_holds_route_json_and_the_card_shows_the_serve_command(tmp_path):
    run = fake_bundle_run(tmp_path)
    plain = make_bundle(run, tmp_path / "plain.tar.gz")
    assert "route" not in plain and "route.json" not in plain["files"]
    (run / "route").mkdir()
    (run / "route" / "route.json").write_text(json.dumps(_route_json()))
    out = tmp_path / "tiny-routed.tar.gz"
    manifest = make_bundle(run, out)
    members = _members(out)
    assert manifest["route"] == "route.json"
    assert members["tiny-routed/route.json"] == (run / "route" / "route.json").read_bytes()
    card = members["tiny-routed/README.md"].decode()
    assert "    edgedistill serve student-q4_k_m.gguf --route route.json --teacher URL\n" in card
    assert "sent 25.0% of requests to the teacher and kept 100.0% [100.0, 100.0] of its task score" in card
    assert "does not hold" not in card
    summary = verify_bundle(out, extract_to=tmp_path / "deploy")
    assert summary["route"] == "route.json" and (tmp_path / "deploy" / "tiny-routed" / "route.json").is_file()
    # calibrated on an artifact the bundle leaves out: said, with the fix
    other = make_bundle(run, tmp_path / "other.tar.gz", artifacts=["student-q8_0.gguf"])
    card = _members(tmp_path / "other.tar.gz")["other/README.md"].decode()
    assert other["route"] == "route.json" and "`student-q4_k_m.gguf`, which this bundle does not hold" in card


@pytest.mark.unit
def test_verify_refuses_a_route_that_is_not_one_of_the_files(tmp_path):
    run = fake_bundle_run(tmp_path)
    (run / "route").mkdir()
    (run / "route" / "route.json").write_text(json.dumps(_route_json()))
    out = tmp_path / "tiny.tar.gz"
    make_bundle(run, out)
    members = _members(out)
    manifest = json.loads(members["tiny/manifest.json"])
    manifest["route"] = "missing.json"
    members["tiny/manifest.json"] = json.dumps(manifest).encode()
    _rewrite(out, members)
    with pytest.raises(EdgedistillError, match="route is missing.json, not one of the files"):
        verify_bundle(out)
    (run / "route" / "route.json").write_text("{not json")
    with pytest.raises(EdgedistillError, match="route.json is not valid JSON"):
        make_bundle(run, tmp_path / "again.tar.gz")
