"""The report: report.md and report.html from a run folder's JSON, and the HTML in a real browser.

    .venv/bin/python -m pytest -q tests/test_report.py

Most tests build a small synthetic run folder (bench.json, eval.json, manifests) in a few
milliseconds; tests/test_run_tiny.py checks the report of a real tiny run. The browser test needs
Debian's chromium, which setup.sh installs where apt-get is available.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edgedistill.cli import main
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import load_recipe
from edgedistill.report.data import load_run, pareto_front
from edgedistill.report.html import render_html
from edgedistill.report.markdown import render_markdown
from edgedistill.report.plots import FRONT_COLOR
from edgedistill.report.stage import report_stage
from edgedistill.report.tables import pareto_names

ROOT = Path(__file__).resolve().parent.parent
# artifact: (file MB, decode tok/s, task score); the teacher's reference score is 0.75
ARTIFACTS = {
    "teacher-f16.gguf": (270.9, 56.4, 0.75),
    "student-f16.gguf": (129.2, 125.5, 0.6667),
    "student-q8_0.gguf": (69.5, 90.1, 0.5833),  # slower and worse than student-f16: dominated
    "student-q4_k_m.gguf": (56.5, 343.8, 0.5833),
    "student-int4/": (61.0, 280.0, 0.5),  # slower and worse than student-q4_k_m: dominated
}
STAGE_SECONDS = {"teacher": 1.5, "generate": 12.25, "logits": 3.0, "student": 0.5, "distill": 40.0, "export": 6.0,
                 "teacher_gguf": 2.0, "bench": 9.0, "eval": 7.0}
OPTIONAL_BENCH = {"bandwidth_efficiency": 0.4234, "peak_gpu_mb": 812.5, "device": "cuda:0"}
OPTIONAL_EVAL = {"perplexity": 12.3456, "perplexity_ratio": 1.0456, "kl_to_reference": 0.01234,
                 "top1_agreement": 0.9375}


def make_run(root: Path, *, bench_extra: dict | None = None, eval_extra: dict | None = None) -> Path:
    """A finished run folder as `edgedistill run` leaves it, minus the models: the JSON is all a report reads."""
    run = root / "run"
    bench, evaluation = [], []
    for name, (file_mb, decode, score) in ARTIFACTS.items():
        onnx = name.endswith("/")
        bench.append({"artifact": name, "path": f"{run}/{name}", "file_mb": file_mb,
                      "runtime": "onnxruntime-genai" if onnx else "llama.cpp", "prompt_tokens": 128, "gen_tokens": 64,
                      "repetitions": 3, "threads": 2, "ttft_ms": 75.25, "prefill_tokens_per_s": 1800.5,
                      "decode_tokens_per_s": decode, "decode_tokens_per_s_spread": 1.5, "peak_rss_mb": 120.5,
                      **(bench_extra or {})})
        evaluation.append({"artifact": name, "examples": 12, "correct": round(12 * score), "unparsed": 0,
                           "task_score": score, "share_of_reference": round(score / 0.75, 4),
                           "answers": [{"id": 1, "answer": "positive"}], **(eval_extra or {})})
    (run / "bench").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "bench" / "bench.json").write_text(json.dumps(bench, indent=2))
    (run / "eval" / "eval.json").write_text(json.dumps({
        "data": "generate/heldout.jsonl", "artifacts": evaluation,
        "reference": {"artifact": "teacher/", "examples": 12, "correct": 9, "task_score": 0.75, "answers": []}}))
    results = {"student": {"method": "prune", "teacher_parameters": 2_000_000, "student_parameters": 1_000_000,
                           "parameter_ratio": 0.5},
               "distill": {"epochs": [{"epoch": 1, "loss": 2.5, "ce": 2.0, "kl": 3.0},
                                      {"epoch": 2, "loss": 1.25, "ce": 1.0, "kl": 1.5}]}}
    configs = {"teacher": {"seed": 0, "teacher": {"source": "random"}}, "export": {"name": "synthetic"}}
    for i, (stage, seconds) in enumerate(STAGE_SECONDS.items()):
        (run / stage).mkdir(exist_ok=True)
        manifest = {"stage": stage, "config": configs.get(stage, {}), "inputs": {}, "files": {}, "seconds": seconds,
                    "finished": f"2026-01-01T00:00:{i:02d}+0000"}
        if stage in results:
            manifest["result"] = results[stage]
        (run / stage / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return run


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def header_of(report: str) -> list[str]:
    return cells(next(line for line in report.splitlines() if line.startswith("| artifact |")))


def row_of(report: str, artifact: str) -> list[str]:
    return cells(next(line for line in report.splitlines() if line.startswith(f"| `{artifact}` |")))


@pytest.mark.unit
def test_pareto_front():
    assert pareto_front([]) == []
    assert pareto_front([(0.5, 10.0)]) == [True]
    # (quality, speed): the third is beaten in both by the second; equal points do not dominate each other
    assert pareto_front([(0.9, 10.0), (0.8, 20.0), (0.7, 15.0), (0.9, 10.0)]) == [True, True, False, True]
    # better in one, equal in the other is enough to dominate
    assert pareto_front([(0.8, 10.0), (0.8, 12.0), (0.7, 12.0)]) == [False, True, False]


@pytest.mark.unit
def test_pareto_names_of_a_run(tmp_path):
    data = load_run(make_run(tmp_path))
    assert pareto_names(data) == ["teacher-f16.gguf", "student-f16.gguf", "student-q4_k_m.gguf"]


@pytest.mark.unit
def test_every_number_comes_from_the_json_it_names(tmp_path):
    run = make_run(tmp_path)
    report = render_markdown(load_run(run))
    bench = json.loads((run / "bench" / "bench.json").read_text())
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    assert report.startswith("# edgedistill report: synthetic\n")
    assert "Teacher `random`: 2.0 M parameters; student (prune): 1.0 M parameters (50% of the teacher)." in report
    assert "**0.750** (9/12)" in report
    for b, e in zip(bench, evaluation["artifacts"]):
        row = row_of(report, b["artifact"])
        for value in (f"{b['file_mb']:.1f}", f"{b['decode_tokens_per_s']:.1f}", f"{b['prefill_tokens_per_s']:.1f}",
                      f"{b['ttft_ms']:.1f}", f"{b['peak_rss_mb']:.1f}", f"{e['task_score']:.3f}",
                      f"{100 * e['share_of_reference']:.1f}"):
            assert value in row, (b["artifact"], value, row)
    assert ("Source: from bench/bench.json: file_mb, decode_tokens_per_s, decode_tokens_per_s_spread, "
            "prefill_tokens_per_s, ttft_ms, peak_rss_mb; eval/eval.json: task_score, share_of_reference (×100)."
            ) in report
    assert "Source: from distill/manifest.json: result.epochs[].epoch, loss, ce, kl." in report
    for stage, seconds in STAGE_SECONDS.items():
        assert f"| {stage} | {seconds:.1f} |" in report
    # Sources: every file read, with the sha256 of its bytes
    for rel in ["bench/bench.json", "eval/eval.json", *(f"{s}/manifest.json" for s in STAGE_SECONDS)]:
        data = (run / rel).read_bytes()
        assert f"| `{rel}` | {len(data)} | `{hashlib.sha256(data).hexdigest()}` |" in report
    assert "llama.cpp (GGUF) and ONNX Runtime GenAI (ONNX folders), 2 threads" in report
    assert "`teacher-f16.gguf`, `student-f16.gguf`, `student-q4_k_m.gguf` (from" in report


@pytest.mark.unit
def test_lora_and_merge_stages_are_reported(tmp_path):
    run = make_run(tmp_path)
    for stage, result in (("lora", {"epochs": [{"epoch": 1, "loss": 0.5, "ce": 0.25, "kl": 0.75}]}),
                          ("merge", {"max_abs_logit_difference": 2.5e-5, "tolerance": 0.001})):
        (run / stage).mkdir()
        (run / stage / "manifest.json").write_text(json.dumps({"stage": stage, "config": {}, "seconds": 1.0,
                                                               "finished": "2026-01-01T00:01:00+0000",
                                                               "result": result}))
    report = render_markdown(load_run(run))
    assert "## LoRA adapter" in report and "| 1 | 0.5000 | 0.2500 | 0.7500 |" in report
    assert "differ by at most 2.5e-05 (tolerance 0.001)" in report
    assert "| `merge/manifest.json` |" in report


@pytest.mark.unit
def test_optional_columns_appear_only_when_the_json_has_them(tmp_path):
    plain = header_of(render_markdown(load_run(make_run(tmp_path / "a"))))
    for header in ("perplexity", "KL to teacher", "top-1 agreement", "bandwidth efficiency %", "peak GPU MB", "device"):
        assert header not in plain
    assert "decode spread tok/s" in plain  # bench already writes it

    run = make_run(tmp_path / "b", bench_extra=OPTIONAL_BENCH, eval_extra=OPTIONAL_EVAL)
    report = render_markdown(load_run(run))
    header = header_of(report)
    for name in ("perplexity", "perplexity ratio", "KL to teacher", "top-1 agreement", "bandwidth efficiency %",
                 "peak GPU MB", "device"):
        assert name in header, name
    row = row_of(report, "student-f16.gguf")
    assert len(row) == len(header)
    expected = {"bandwidth efficiency %": "42.3", "peak GPU MB": "812.5", "device": "cuda:0", "perplexity": "12.35",
                "perplexity ratio": "1.046", "KL to teacher": "0.0123", "top-1 agreement": "0.938"}
    for name, value in expected.items():
        assert row[header.index(name)] == value, name
    for key in (*OPTIONAL_BENCH, *OPTIONAL_EVAL):
        assert key in report.split("## Artifacts")[1].split("## ")[0]  # named in the table's source line

    # a key that only some rows have: shown, and "–" where missing
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    for r in evaluation["artifacts"][1:]:
        del r["perplexity"]
    (run / "eval" / "eval.json").write_text(json.dumps(evaluation))
    report = render_markdown(load_run(run))
    header = header_of(report)
    assert row_of(report, "teacher-f16.gguf")[header.index("perplexity")] == "12.35"
    assert row_of(report, "student-f16.gguf")[header.index("perplexity")] == "–"


@pytest.mark.unit
def test_missing_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(EdgedistillError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    run = make_run(tmp_path)
    (run / "eval" / "eval.json").unlink()
    with pytest.raises(EdgedistillError, match=r"is not a finished run: .*eval\.json is missing") as caught:
        load_run(run)
    assert "edgedistill run" in caught.value.hint
    assert main(["report", str(run)]) == 2
    error = capsys.readouterr().err
    assert "eval.json is missing" in error and "fix:" in error
    assert not (run / "report.md").exists() and not (run / "report.html").exists()

    (run / "eval" / "eval.json").write_text("{not json")
    with pytest.raises(EdgedistillError, match="not valid JSON"):
        load_run(run)


@pytest.mark.unit
def test_report_command_renders_both_files_the_same_every_time(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert f"wrote {run / 'report.html'}" in capsys.readouterr().out
    first = {name: (run / name).read_bytes() for name in ("report.md", "report.html")}
    out = tmp_path / "elsewhere"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    assert {name: (out / name).read_bytes() for name in first} == first


@pytest.mark.unit
def test_report_stage_writes_md_and_html_named_after_the_recipe(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "partial"
    out.mkdir()
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    assert report_stage(recipe, out, **{stage: run / stage for stage in STAGE_SECONDS}) == {}
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    assert (out / "report.md").read_text().startswith("# edgedistill report: tiny\n")
    assert "<title>edgedistill report: tiny</title>" in (out / "report.html").read_text()


@pytest.mark.unit
def test_html_is_self_contained_with_three_plots_and_the_tables(tmp_path):
    page = render_html(load_run(make_run(tmp_path, bench_extra=OPTIONAL_BENCH)))
    assert page.startswith("<!DOCTYPE html>")
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # nothing to fetch: no scripts, no links or sources outside the page (SVG namespaces are names, not fetches)
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?:https?:|//|file:)""", page)
    assert page.count("<svg") == 3
    for plot in ("quality-vs-size", "quality-vs-speed", "stage-times"):
        assert f'<figure id="{plot}">' in page and f'<svg id="plot-{plot}"' in page
    assert '<table id="artifacts">' in page and '<table id="sources">' in page
    assert "from bench/bench.json: decode_tokens_per_s; eval/eval.json: task_score" in page
    assert "<td>42.3</td>" in page  # bandwidth_efficiency 0.4234 as a percentage
    speed_plot = page.split('<svg id="plot-quality-vs-speed"')[1].split("</svg>")[0]
    for name in ARTIFACTS:
        assert name in speed_plot  # every point labelled (SVG text stays text)
    assert "Pareto front" in speed_plot


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("Chromium is not installed: `apt-get install -y --no-install-recommends chromium` "
                "(setup.sh does this where apt-get is available)")


def _headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.integration
def test_html_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    run = make_run(tmp_path)
    assert main(["report", str(run)]) == 0
    url = (run / "report.html").resolve().as_uri()

    dom = _headless(tmp_path, "--dump-dom", url).stdout
    assert "<h1>edgedistill report: synthetic</h1>" in dom
    assert dom.count("<svg") == 3
    for plot in ("quality-vs-size", "quality-vs-speed", "stage-times"):
        assert f'id="plot-{plot}"' in dom
    artifacts = dom.split('<table id="artifacts">')[1].split("</table>")[0]
    assert artifacts.count("<tr>") == 1 + len(ARTIFACTS)

    shot = tmp_path / "report.png"
    _headless(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", url)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 100, f"only {len(colors)} colours: the page looks blank"
    # the Pareto front's markers were painted, so the SVG plots rendered (not only the text)
    front = tuple(int(FRONT_COLOR[i:i + 2], 16) for i in (1, 3, 5))
    painted = sum(count for count, rgb in colors if all(abs(a - b) <= 8 for a, b in zip(rgb, front)))
    assert painted > 100, f"{painted} pixels of the Pareto front colour {FRONT_COLOR}"


def scored(mean: float, low: float, high: float, **extra) -> dict:
    return {"mean": mean, "low": low, "high": high, "n": 40, "errors": 0, "first_error": None,
            "skipped_no_reference": 0, **extra}


def make_generation_run(root: Path) -> Path:
    """make_run's folder as a generation task with teacher-built references, intervals and the
    PyTorch student (an eval row without a bench row) leaves it."""
    run = make_run(root)
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    for row, within in zip(evaluation["artifacts"], (True, True, False, False, False)):
        score = row["task_score"]
        row.pop("correct"), row.pop("unparsed")
        row.update(task_score_interval=[round(score - 0.1, 4), round(score + 0.05, 4)],
                   share_of_reference_interval=[round(row["share_of_reference"] - 0.12, 4),
                                                round(row["share_of_reference"] + 0.08, 4)],
                   within_noise_of_reference=within,
                   scores={"chrf": scored(score, score - 0.1, score + 0.05, n_gold=20, n_teacher_built=20),
                           "rouge_l": scored(0.5, 0.41, 0.6, n_gold=20, n_teacher_built=20),
                           "exact_match": scored(0.25, 0.125, 0.4, n_gold=20, n_teacher_built=20)})
    evaluation["artifacts"].insert(1, {**evaluation["artifacts"][0], "artifact": "student (PyTorch)/",
                                       "path": "run/distill"})
    agreement = {"chrf": {"mean": 0.62, "low": 0.55, "high": 0.69, "n": 20},
                 "rouge_l": {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 20},
                 "exact_match": {"mean": 0.3, "low": 0.1, "high": 0.5, "n": 20}}
    evaluation["reference"].update(examples=40, task_score=0.62, task_score_interval=[0.55, 0.69],
                                   scores={name: scored(**{k: v for k, v in entry.items() if k != "n"})
                                           for name, entry in agreement.items()},
                                   agreement_with_gold=agreement)
    evaluation["reference"].pop("correct")
    evaluation["teacher_built_references"] = 20
    (run / "eval" / "eval.json").write_text(json.dumps(evaluation))
    return run


@pytest.mark.unit
def test_scores_show_their_intervals_the_noise_and_the_teacher_built_references(tmp_path):
    data = load_run(make_generation_run(tmp_path))
    report = render_markdown(data)
    header = header_of(report)
    row = row_of(report, "student-f16.gguf")
    assert row[header.index("task score")] == "0.667 [0.57, 0.72]"
    assert row[header.index("% of teacher")] == "88.9 [76.9, 96.9]"  # share 0.8889, interval ×100
    assert ("eval/eval.json: task_score, task_score_interval, share_of_reference (×100), "
            "share_of_reference_interval (×100)") in report
    assert "In brackets: the 95% bootstrap interval" in report
    # the student in PyTorch: an eval row without speed, said so under the table
    student = row_of(report, "student (PyTorch)/")
    assert student[header.index("decode tok/s")] == "–" and student[header.index("task score")] == "0.750 [0.65, 0.80]"
    assert "`student (PyTorch)/` is the trained student in PyTorch fp32" in report
    assert ("within the noise of it, `teacher-f16.gguf`, `student (PyTorch)/`, `student-f16.gguf` (the 95% interval "
            "of the paired difference holds 0") in report
    assert "further from it than the noise, `student-q8_0.gguf`, `student-q4_k_m.gguf`, `student-int4/`." in report
    # generation: a column per scorer, the teacher first
    scorers = report.split("## Scores by scorer")[1].split("## ")[0]
    assert "| artifact | chrf | rouge_l | exact_match |" in scorers
    assert ("| `teacher/` (teacher, reference, on the gold examples) | 0.620 [0.55, 0.69] | 0.500 [0.40, 0.60] "
            "| 0.300 [0.10, 0.50] |") in scorers
    assert "| `student-f16.gguf` | 0.667 [0.57, 0.72] | 0.500 [0.41, 0.60] | 0.250 [0.12, 0.40] |" in scorers
    # the teacher-built part and how far to trust it
    assert "**0.620** [0.55, 0.69] (chrf over 40)" in report
    assert ("**Teacher-built references:** 20 of 40 held-out examples have no gold answer and are scored against "
            "the teacher's own answer") in report
    assert "the teacher agrees with it: chrf 0.620 [0.55, 0.69], rouge_l 0.500 [0.40, 0.60], exact_match 0.300" in report
    page = render_html(data)
    assert '<table id="scorers">' in page and "<td>0.667 [0.57, 0.72]</td>" in page
    assert "<strong>Teacher-built references:</strong> 20 of 40" in page and "further from it than the noise" in page


@pytest.mark.unit
def test_a_classification_report_has_no_scorer_table_and_no_teacher_built_line(tmp_path):
    run = make_run(tmp_path)
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    for row in evaluation["artifacts"]:
        row.update(task_score_interval=[0.5, 0.8], scores={"label": scored(row["task_score"], 0.5, 0.8)})
    (run / "eval" / "eval.json").write_text(json.dumps(evaluation))
    report = render_markdown(load_run(run))
    assert "## Scores by scorer" not in report and "Teacher-built" not in report
    assert "Compared with the teacher" not in report  # no within_noise_of_reference in this file
    assert row_of(report, "student-f16.gguf")[header_of(report).index("task score")] == "0.667 [0.50, 0.80]"
    assert row_of(report, "student-f16.gguf")[header_of(report).index("% of teacher")] == "88.9"  # no interval given
