"""`edgedistill run` end to end on the tiny recipe: every stage for real, in about a minute.

The tiny teacher has random weights (its answers are noise), but every part is real: the
SmolLM2 tokenizer, transformers, the GGUF writer, llama.cpp's quantizer and runtime.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgedistill.cli import main
from edgedistill.pipeline import PARTIAL, is_complete

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["teacher", "generate", "logits", "student", "distill", "export", "export_onnx", "teacher_gguf", "bench",
          "eval", "report"]


def copy_recipe(folder: Path, **replace: str) -> Path:
    """The tiny recipe and its data in `folder`, so relative paths (and cache keys) stay the same."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "recipes" / "data", folder / "data", dirs_exist_ok=True)
    text = (ROOT / "recipes" / "tiny.yaml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    (folder / "tiny.yaml").write_text(text)
    return folder / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["run", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(out)]) == 0
    return out


def test_every_stage_is_written_and_complete(tiny_run):
    assert {p.name for p in tiny_run.iterdir()} == set(STAGES) | {PARTIAL}  # each stage writes its own folder only
    assert list((tiny_run / PARTIAL).iterdir()) == []
    for stage in STAGES:
        assert is_complete(tiny_run / stage), stage
    assert {p.name for p in (tiny_run / "export").glob("*.gguf")} == {
        "student-f16.gguf", "student-q8_0.gguf", "student-q4_k_m.gguf"}
    assert {p.name for p in (tiny_run / "teacher_gguf").glob("*.gguf")} == {"teacher-f16.gguf", "teacher-q4_k_m.gguf"}
    assert (tiny_run / "export_onnx" / "student-int4" / "model.onnx").is_file()
    # onnx_options.calibrate: int4 rounded by importance on the generate stage's training text
    onnx_manifest = json.loads((tiny_run / "export_onnx" / "student-int4" / "onnx_export.json").read_text())
    assert onnx_manifest["quantization"]["calibration"]["file"].endswith("generate/train.jsonl")
    # Checkpoints are progress, not results: the finished distill folder holds the model only.
    assert not (tiny_run / "distill" / "checkpoint").exists()
    assert (tiny_run / "distill" / "model.safetensors").exists()


def test_heldout_prompts_never_reach_training(tiny_run):
    train = [json.loads(line) for line in (tiny_run / "generate" / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (tiny_run / "generate" / "heldout.jsonl").read_text().splitlines()]
    assert len(train) + len(heldout) == 48 and len(heldout) == 12
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    assert all(r["messages"][-1]["role"] == "assistant" for r in train)
    assert all(r["messages"][-1]["role"] == "user" and r["choices"] == ["positive", "negative"] for r in heldout)


def test_report_has_a_row_per_artifact_with_the_measured_numbers(tiny_run):
    report = (tiny_run / "report" / "report.md").read_text()
    bench = json.loads((tiny_run / "bench" / "bench.json").read_text())
    evaluation = json.loads((tiny_run / "eval" / "eval.json").read_text())
    assert len(bench) == 6  # 5 GGUF files and the int4 ONNX folder
    # and the distilled student in PyTorch, evaluated but not benchmarked
    assert [row["artifact"] for row in evaluation["artifacts"]] == [row["artifact"] for row in bench[:2]] + [
        "student (PyTorch)/"] + [row["artifact"] for row in bench[2:]]
    for row in bench:
        line = next(line for line in report.splitlines() if line.startswith(f"| `{row['artifact']}`"))
        assert f"{row['decode_tokens_per_s']:.1f}" in line and f"{row['file_mb']:.1f}" in line
    for stage in STAGES[:-1]:
        assert f"| {stage} |" in report
    page = (tiny_run / "report" / "report.html").read_text()
    assert page.count("<svg") == 3 and all(f"<code>{row['artifact']}</code>" in page for row in bench)


def test_report_command_renders_the_stage_report_again(tiny_run, tmp_path):
    assert main(["report", str(tiny_run), "--out", str(tmp_path)]) == 0
    for name in ("report.md", "report.html"):
        again = (tmp_path / name).read_bytes()
        assert again == (tiny_run / "report" / name).read_bytes(), name


def test_rerun_does_no_work(tiny_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}
    assert main(["run", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(tiny_run)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("up to date, skipped") == len(STAGES)
    assert "0 stage(s) ran" in printed
    assert {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")} == before


def test_eval_command_reproduces_the_run_scores(tiny_run, tmp_path):
    evaluation = json.loads((tiny_run / "eval" / "eval.json").read_text())
    artifact = tiny_run / "export" / "student-q4_k_m.gguf"
    out = tmp_path / "eval.json"
    assert main(["eval", str(artifact), "--data", str(tiny_run / "generate" / "heldout.jsonl"),
                 "--reference", str(tiny_run / "teacher"), "--max-new-tokens", "8", "--json", str(out)]) == 0
    again = json.loads(out.read_text())
    expected = next(r for r in evaluation["artifacts"] if r["artifact"] == artifact.name)
    assert again["artifacts"][0]["task_score"] == expected["task_score"]
    assert again["reference"]["task_score"] == evaluation["reference"]["task_score"]


def test_bench_command_measures_a_gguf(tiny_run, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny_run / "export" / "student-q4_k_m.gguf"), "--prompt-tokens", "16",
                 "--gen-tokens", "8", "--repetitions", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
    # The worker's own peak, not its parent's (this test process holds torch and more).
    assert 0 < row["peak_rss_mb"] < 1000


def test_the_quantized_student_chats_in_llama_cpp(tiny_run, capsys):
    assert main(["chat", str(tiny_run / "export" / "student-q4_k_m.gguf"), "Hello", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()


def finished_files(run: Path) -> dict[Path, int]:
    """Every file of the run's finished stages, with its modification time."""
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if PARTIAL not in p.relative_to(run).parts}


def test_bad_input_fails_at_once_and_keeps_finished_stages(tiny_run, tmp_path, capsys):
    run_copy = tmp_path / "run"
    shutil.copytree(tiny_run, run_copy)
    before = finished_files(run_copy)
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    cases = {
        "corrupt": (copy_recipe(tmp_path / "a", **{"source: random": f"source: {corrupt}",
                                                  "  random:\n": "  unused:\n"}), ["broken.gguf"]),
        "missing": (copy_recipe(tmp_path / "b", **{"source: random": "source: /no/such/model.gguf",
                                                  "  random:\n": "  unused:\n"}), ["/no/such/model.gguf"]),
        "typo": (copy_recipe(tmp_path / "c", **{"keep_layers": "keep_layer"}), ["student.keep_layer", "unknown key"]),
    }
    for name, (recipe, fragments) in cases.items():
        if name != "typo":
            # Drop the now-unused random-model block so only the model source is wrong.
            text = recipe.read_text()
            recipe.write_text(text[:text.index("  unused:\n")] + text[text.index("task:"):])
        assert main(["run", str(recipe), "--out", str(run_copy)]) == 2, name
        printed, error = capsys.readouterr()
        assert all(f in error for f in fragments), (name, error)
        # at once: no stage started but the teacher, the one that reads the model source, and not
        # a file of a finished stage was rewritten
        started = [line for line in printed.splitlines() if line.endswith("] running")]
        assert started in ([], ["[teacher] running"]), (name, printed)
        assert finished_files(run_copy) == before, name
    for stage in STAGES:
        assert is_complete(run_copy / stage), stage


def test_killed_during_distill_resumes_and_finishes(tiny_run, tmp_path):
    recipe = copy_recipe(tmp_path / "recipe")  # 2 epochs: killed after the first, resumed for the second
    out = tmp_path / "run"
    out.mkdir()
    # The stages before distill are the same as the tiny run's (same recipe sections and inputs).
    for stage in ("teacher", "generate", "logits", "student"):
        shutil.copytree(tiny_run / stage, out / stage)
    # to distill only: the resume is what this checks; the later stages are the tiny run's own
    command = [sys.executable, "-m", "edgedistill.cli", "run", str(recipe), "--out", str(out), "--to", "distill"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob(f"{PARTIAL}/distill.*/checkpoint/state.pt")):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "distill").exists()

    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[distill] resuming" in done.stdout and "resuming after epoch" in done.stdout
    for stage in ("teacher", "generate", "logits", "student"):
        assert "[%s] up to date" % stage in done.stdout
    history = json.loads((out / "distill" / "manifest.json").read_text())["result"]["epochs"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert is_complete(out / "distill") and not (out / "export").exists()


def test_exported_gguf_tokenizes_like_the_student_folder(tiny_run):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_run / "distill")
    llm = Llama(model_path=str(tiny_run / "export" / "student-q4_k_m.gguf"), vocab_only=True, verbose=False)
    texts = ["Hello world", "  leading spaces\n\n\ttabs", "digits 12345 and 3.14", "café Zürich naïve",
             "日本語のテキスト", "emoji 🚀👍🏽", "def f(x):\n    return x * 2\n",
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert hf.decode(ids) == text
    assert llm.token_eos() == hf.eos_token_id
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"


def test_export_command_writes_a_quantized_gguf_and_refuses_to_overwrite(tiny_run, tmp_path, capsys):
    out = tmp_path / "student.gguf"
    assert main(["export", str(tiny_run / "distill"), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert main(["export", str(tiny_run / "distill"), "--quant", "q8_0", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    # Nothing but the result is left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["student.gguf"]


def test_bundle_and_verify_commands_on_the_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "tiny-student.tar.gz"
    assert main(["bundle", str(tiny_run), "--out", str(out)]) == 0
    assert main(["verify", str(out), "--extract", str(tmp_path / "deploy")]) == 0
    files = {p.name for p in (tmp_path / "deploy" / "tiny-student").iterdir()}
    # the smallest verified GGUF and the int4 ONNX folder, with what a device needs beside them
    assert {"student-q4_k_m.gguf", "student-int4", "Modelfile", "README.md", "manifest.json",
            "chat_template.jinja", "tokenizer.json"} <= files
    assert "OK" in capsys.readouterr().out


def test_bench_against_a_device_target(tiny_run, tmp_path, capsys):
    gguf = str(tiny_run / "export" / "student-q4_k_m.gguf")
    fast = ["--prompt-tokens", "8", "--gen-tokens", "4", "--repetitions", "1"]
    eval_json = tiny_run / "eval" / "eval.json"
    assert main(["bench", gguf, *fast, "--target", "phone-8gb", "--eval", str(eval_json),
                 "--json", str(tmp_path / "b.json")]) == 0
    [row] = json.loads((tmp_path / "b.json").read_text())
    checks = {c["budget"]: c for c in row["target"]["checks"]}
    assert row["target"]["name"] == "phone-8gb" and checks["max_file_mb"]["passed"]
    # from the run's eval.json (the random teacher may score 0, and then there is no share: not measured)
    share = next(r for r in json.loads(eval_json.read_text())["artifacts"] if r["artifact"] == row["artifact"])
    assert checks["min_quality_share"]["value"] == share.get("share_of_reference")
    # a budget no model meets: reported, and with --strict the exit status says so
    impossible = tmp_path / "impossible.yaml"
    impossible.write_text("name: impossible\ncontext_length: 512\nbudgets:\n  min_decode_tokens_per_s: 1.0e9\n")
    assert main(["bench", gguf, *fast, "--target", str(impossible)]) == 0
    assert "FAIL" in capsys.readouterr().out
    assert main(["bench", gguf, *fast, "--target", str(impossible), "--strict"]) == 3
    assert main(["bench", gguf, "--target", "toaster"]) == 2
