"""A recipe cannot do what its reader would not expect (issue 13, item 10): a key given twice, a
`name:` that leaves the run folder, an API key sent to an unexpected place, bad data found only
after the teacher stage.

    python -m pytest -q tests/test_faults_recipe.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import random_teacher_recipe

from edgedistill.cli import main
from edgedistill.errors import EdgedistillError
from edgedistill.layout import PARTIAL
from edgedistill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "recipes" / "data" / "sentiment.jsonl"


def write(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def recipe_text(*, name: str = "faults", prompts: Path = PROMPTS, generate: str = "{max_new_tokens: 8}") -> str:
    return random_teacher_recipe(name=name, prompt="Review: {text}", data=f"{{prompts: {prompts}}}", generate=generate)


@pytest.mark.unit
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = write(tmp_path, recipe_text() + "distill:\n  epochs: 1\n  lr: 0.001\n  epochs: 3\n")
    with pytest.raises(EdgedistillError) as info:
        load_recipe(path)
    assert "key 'epochs' is given twice (first at line" in info.value.problem and str(path) in info.value.problem
    assert "line" in info.value.hint


@pytest.mark.unit
def test_a_section_given_twice_is_refused(tmp_path):
    path = write(tmp_path, recipe_text() + "distill: {epochs: 1}\ndistill: {epochs: 3}\n")
    with pytest.raises(EdgedistillError, match="key 'distill' is given twice"):
        load_recipe(path)


@pytest.mark.unit
def test_a_merge_key_may_be_overridden(tmp_path):
    # `<<:` followed by the key it merges is plain YAML, not a key given twice
    text = recipe_text().replace("generate: {max_new_tokens: 8}",
                                 "generate:\n  <<: {max_new_tokens: 8, batch_size: 2}\n  batch_size: 4")
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.generate.batch_size == 4 and recipe.generate.max_new_tokens == 8


@pytest.mark.unit
@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", ".hidden", "", "x" * 101, "sp ace"])
def test_a_name_that_is_not_one_plain_path_component_is_refused(tmp_path, name):
    path = write(tmp_path, recipe_text(name=f"'{name}'"))
    with pytest.raises(EdgedistillError) as info:
        load_recipe(path)
    assert "name: Value error" in info.value.problem and "is not a plain name" in info.value.problem


@pytest.mark.unit
def test_plain_names_pass(tmp_path):
    for name in ("sentiment", "sentiment-135m_v2.1", "A"):
        assert load_recipe(write(tmp_path, recipe_text(name=name))).name == name


def endpoint_recipe(tmp_path, endpoint: str) -> Path:
    return write(tmp_path, recipe_text(generate=f"{{max_new_tokens: 8, endpoint: {endpoint}}}"))


@pytest.mark.unit
@pytest.mark.parametrize("endpoint, reason", [
    ("{url: 'http://203.0.113.7:8000/v1', api_key_env: OPENAI_API_KEY}", "plain http to another machine"),
    ("{url: 'http://teacher.example.com/v1', api_key_env: OPENAI_API_KEY}", "plain http to another machine"),
    ("{url: 'https://teacher.example.com/v1', api_key_env: AWS_SECRET_ACCESS_KEY}", "must contain API_KEY"),
    ("{url: 'https://teacher.example.com/v1', api_key_env: HOME}", "must contain API_KEY"),
    ("{url: 'ftp://teacher.example.com/v1'}", "must be an http:// or https:// URL"),
    ("{url: 'teacher:8000'}", "must be an http:// or https:// URL"),
])
def test_an_api_key_is_sent_only_under_its_name_and_only_encrypted_or_to_this_machine(tmp_path, endpoint, reason):
    with pytest.raises(EdgedistillError) as info:
        load_recipe(endpoint_recipe(tmp_path, endpoint))
    assert "generate.endpoint" in info.value.problem and reason in info.value.problem


@pytest.mark.unit
@pytest.mark.parametrize("endpoint", [
    "{url: 'https://teacher.example.com/v1', api_key_env: TEACHER_API_KEY}",
    "{url: 'http://127.0.0.1:8000/v1', api_key_env: VLLM_API_KEY}",
    "{url: 'http://localhost:8000/v1', api_key_env: OPENAI_API_KEY}",
    "{url: 'http://[::1]:8000/v1', api_key_env: OPENAI_API_KEY}",
    "{url: 'http://10.0.0.5:8000/v1'}",  # no key: plain http on a private network is the user's choice
])
def test_safe_endpoints_pass(tmp_path, endpoint):
    assert load_recipe(endpoint_recipe(tmp_path, endpoint)).generate.endpoint is not None


@pytest.mark.unit
@pytest.mark.parametrize("prompts, problem", [
    (b"", "holds no examples"),
    (b'{"text": "fine", "label": "positive"}\n{"text": "broken\n', "line 2"),
    (b'{"text": "fine", "label": "positive"}\n{"text": "meh", "label": "neutral"}\n', "has label 'neutral'"),
], ids=["empty", "cut-line", "unknown-label"])
def test_bad_data_stops_the_run_before_the_first_stage(tmp_path, capsys, prompts, problem):
    data = tmp_path / "prompts.jsonl"
    data.write_bytes(prompts)
    run = tmp_path / "run"
    assert main(["run", str(write(tmp_path, recipe_text(prompts=data))), "--out", str(run)]) == 2
    assert problem in capsys.readouterr().err
    # nothing started: no teacher folder, no partial one, not even the run folder
    assert not run.exists() and not (run / PARTIAL).exists()


@pytest.mark.unit
@pytest.mark.parametrize("text, problem", [
    (b"name: caf\xe9\n", "is not UTF-8 text (byte 9 is b'\\xe9')"),
    (b"name: x\ndeep: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nests lists or mappings too deeply"),
    (b"name: x\n" + "".join(f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 10) if i else 'x'}]\n"
                            for i in range(9)).encode(), "expands to more than 100000 values"),
    (b"name: x\nloop: &a [*a]\n", "expands to more than 100000 values"),
    (b"name: x\n# " + b"y" * (1 << 20) + b"\n", "more than a config file's 1048576"),
], ids=["not-utf8", "deep", "alias-bomb", "alias-loop", "huge"])
def test_a_damaged_or_hostile_yaml_file_is_named_without_costing_memory(tmp_path, text, problem):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text)
    with pytest.raises(EdgedistillError) as info:
        load_recipe(path)
    assert problem in info.value.problem and str(path) in info.value.problem


@pytest.mark.integration
def test_the_recipe_fuzzer_finds_no_hang_crash_or_raw_traceback(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "fuzz.json"
    subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz_recipe.py"), "--cases", "150", "--seed", "1",
                    "--out", str(out)], check=False, timeout=300)
    report = json.loads(out.read_text())
    assert report["cases"] == 150 and report["counts"]["ok"] + report["counts"]["clear"] == 150, report["examples"]
    assert report["outside_writes"] == 0 and report["peak_rss_mb"] < 300
