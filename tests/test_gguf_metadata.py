"""GGUF metadata a user of the file needs (general.*, source, license), and export to a size budget.

Tiny random llama models built as in test_export_gguf; every file is opened in llama.cpp, whose
load log (captured from file descriptor 2) must carry no warning about the metadata.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest -q tests/test_gguf_metadata.py
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest
from safetensors.torch import load_file

from edgedistill.cli import main
from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import quantize_gguf, write_gguf
from edgedistill.export.gguf.quantize import BUDGET_LADDER, parse_size, quantize_to_budget

llama_cpp = pytest.importorskip("llama_cpp")

HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
CARD = """---
license: apache-2.0
language:
- en
- no
tags: [edge, distilled]
---
# tiny-chat

A model card's text, not metadata.
"""
# llama.cpp log lines that would mean a key is missing, misread or ignored
SUSPICIOUS = re.compile(r"\b(missing|not found|unknown|warn(ing)?|deprecated|degraded|incorrect|invalid|fail(ed)?)\b",
                        re.IGNORECASE)
# llama.cpp prints "unknown" here for every model whose rope was not YaRN-finetuned
BENIGN = ("rope_finetuned        = unknown",)


@pytest.fixture(scope="module")
def hf_dir(tiny_llama_dir) -> Path:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def carded(hf_dir, tmp_path_factory) -> dict[str, Path]:
    """F16 and Q8_0 files of a folder with a model card and a hub repo in config.json."""
    folder = tmp_path_factory.mktemp("carded") / "student"
    shutil.copytree(hf_dir, folder)
    (folder / "README.md").write_text(CARD)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": HUB_REPO}))
    f16 = write_gguf(folder, folder.parent / "tiny-chat-f16.gguf", name="tiny-chat")
    return {"F16": f16, "Q8_0": quantize_gguf(f16, folder.parent / "tiny-chat-q8_0.gguf", "Q8_0", threads=2)}


def _fields(gguf_file: Path) -> dict:
    return {name: field.contents() for name, field in gguf.GGUFReader(gguf_file).fields.items()}


@contextlib.contextmanager
def _stderr_into(log: list[str]) -> Iterator[None]:
    """File descriptor 2 into a temporary file, where llama.cpp's C code writes; llama-cpp-python's
    log callback prints to sys.stderr (which pytest replaces), so that is pointed at fd 2 too."""
    sys.stderr.flush()
    saved_fd, saved_stream = os.dup(2), sys.stderr
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - closed below, fd 2 left open
        try:
            yield
        finally:
            sys.stderr.close()
            sys.stderr = saved_stream
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            sink.seek(0)
            log.append(sink.read().decode(errors="replace"))


def _load_verbose(gguf_file: Path) -> tuple[dict[str, str], list[str]]:
    """llama.cpp's metadata of `gguf_file` and its load log, one entry per line."""
    log: list[str] = []
    with _stderr_into(log):
        llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=64, n_threads=1, verbose=True)
        metadata = dict(llm.metadata)
        llm.close()
    return metadata, log[0].splitlines()


@pytest.mark.integration
def test_general_metadata_and_provenance(carded, hf_dir):
    n_params = sum(t.numel() for t in load_file(hf_dir / "model.safetensors").values())
    for qtype, gguf_file in carded.items():
        fields = _fields(gguf_file)
        assert fields["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}")
        # llama.cpp's quantizer copies these from the F16 file
        assert fields["general.architecture"] == "llama"
        assert fields["general.type"] == "model"
        assert fields["general.name"] == "tiny-chat"
        assert fields["general.size_label"] == gguf.size_label(n_params, n_params, 0, 0) == "103K"
        assert fields["general.quantized_by"] == "edgedistill"
        assert fields["general.source.url"] == f"https://huggingface.co/{HUB_REPO}"
        assert fields["general.source.huggingface.repository"] == HUB_REPO
        assert fields["general.license"] == "apache-2.0"
        assert fields["general.languages"] == ["en", "no"]  # Norwegian, not YAML's False
        assert fields["general.tags"] == ["edge", "distilled"]
        assert fields["llama.context_length"] == 256
        assert fields["llama.rope.freq_base"] == 10000.0
        assert fields["llama.rope.dimension_count"] == 16
        assert fields["llama.rope.scaling.type"] == "none"


@pytest.mark.integration
def test_llama_cpp_reads_it_without_warnings(carded):
    for gguf_file in carded.values():
        metadata, log = _load_verbose(gguf_file)
        assert metadata["general.name"] == "tiny-chat"
        assert metadata["general.license"] == "apache-2.0"
        # the capture holds the load log: the key dump and llama.cpp's own reading of the name
        assert any("general.license" in line and "apache-2.0" in line for line in log)
        assert any(re.match(r"print_info: general.name\s+= tiny-chat$", line) for line in log)
        assert any(re.match(r"print_info: rope scaling\s+= none$", line) for line in log)
        flagged = [line for line in log if SUSPICIOUS.search(line) and not any(b in line for b in BENIGN)]
        assert not flagged, f"{gguf_file.name}: {flagged}"


@pytest.mark.integration
def test_nothing_is_claimed_without_a_card_or_a_hub_repo(hf_dir, tmp_path):
    # a relative local path in _name_or_path looks like a repo id; the folder's own path says otherwise
    folder = tmp_path / "models" / "student"
    shutil.copytree(hf_dir, folder)
    (folder / "README.md").write_text("# student\n\nlicense: mit (prose, not front matter)\n")
    config = json.loads((folder / "config.json").read_text())
    for name_or_path in ("models/student", str(folder)):
        (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
        fields = _fields(write_gguf(folder, tmp_path / "out.gguf", overwrite=True))
        assert fields["general.name"] == "student"
        assert fields["general.quantized_by"] == "edgedistill"
        assert not {k for k in fields if k.startswith(("general.license", "general.source", "general.languages",
                                                       "general.tags"))}


@pytest.mark.parametrize("card, problem", [
    ("---\nlicense:\n  id: mit\n---\n", "`license` = {'id': 'mit'} is not a string or a list of strings"),
    ("---\nlicense: mit\n", "never closed"),
])
@pytest.mark.integration
def test_a_broken_card_is_refused(hf_dir, tmp_path, card, problem):
    folder = tmp_path / "student"
    shutil.copytree(hf_dir, folder)
    (folder / "README.md").write_text(card)
    with pytest.raises(EdgedistillError, match=re.escape(problem)) as err:
        write_gguf(folder, tmp_path / "out.gguf")
    assert str(folder / "README.md") in err.value.problem and err.value.hint
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.partial"))


@pytest.mark.unit
def test_parse_size():
    assert parse_size("60MB") == 60_000_000
    assert parse_size("60 MiB") == 60 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1.5gib") == 3 * 2**29
    assert parse_size("512KiB") == 524_288
    assert parse_size("0.1KB") == 100  # exact: no float rounding down to 99
    assert parse_size("1234B") == 1234
    for bad in ("60", "60XB", "MB", "-5MB", "0MB", "1e3MB"):
        with pytest.raises(EdgedistillError, match="size"):
            parse_size(bad)


@pytest.fixture(scope="module")
def f16_file(hf_dir, tmp_path_factory) -> Path:
    return write_gguf(hf_dir, tmp_path_factory.mktemp("f16") / "student-f16.gguf")


@pytest.mark.integration
def test_budget_keeps_the_most_precise_type_that_fits(f16_file, tmp_path):
    budget = f16_file.stat().st_size // 2
    choice = quantize_to_budget(f16_file, tmp_path / "fit.gguf", budget, threads=2)
    # tried from the most precise down, stopping at the first that fits
    assert list(choice.tried_bytes) == list(BUDGET_LADDER[: len(choice.tried_bytes)])
    assert choice.qtype == list(choice.tried_bytes)[-1] and choice.qtype not in ("F16", "Q8_0")
    assert all(size > budget for qtype, size in choice.tried_bytes.items() if qtype != choice.qtype)
    assert choice.size_bytes == choice.tried_bytes[choice.qtype] == (tmp_path / "fit.gguf").stat().st_size <= budget
    assert _fields(tmp_path / "fit.gguf")["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{choice.qtype}")
    assert [p.name for p in tmp_path.iterdir()] == ["fit.gguf"]

    roomy = quantize_to_budget(f16_file, tmp_path / "f16.gguf", parse_size("1GB"))
    assert (roomy.qtype, list(roomy.tried_bytes)) == ("F16", ["F16"])
    assert (tmp_path / "f16.gguf").read_bytes() == f16_file.read_bytes()


@pytest.mark.integration
def test_cli_max_size(hf_dir, f16_file, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    # binary units as written: 55% of the F16 file in KiB rules out F16 and lands at Q8_0 or below
    budget = f"{f16_file.stat().st_size * 0.55 / 1024:.2f}KiB"
    assert main(["export", str(hf_dir), "--format", "gguf", "--max-size", budget, "--out", str(out)]) == 0
    chosen = re.search(r"^chose (\S+): .* \((\d+) bytes\), within ", capsys.readouterr().out, re.MULTILINE)
    assert chosen and chosen[1] in BUDGET_LADDER[1:]
    assert out.stat().st_size == int(chosen[2]) <= parse_size(budget)
    assert _fields(out)["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{chosen[1]}")
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no candidates, no scratch folder
    assert _load_verbose(out)[0]["general.name"] == hf_dir.name

    nowhere = tmp_path / "small.gguf"
    assert main(["export", str(hf_dir), "--max-size", "1KB", "--out", str(nowhere)]) == 2
    err = capsys.readouterr().err
    assert "no GGUF type fits in 1.0 KB (1000 bytes): the smallest, Q4_0, is" in err
    assert re.search(r"fix: allow at least \d+ bytes", err)
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]

    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(hf_dir), "--quant", "q8_0", "--max-size", "60MB", "--out", str(nowhere)])
    assert exit_info.value.code == 2
    assert "--max-size: not allowed with argument --quant" in capsys.readouterr().err
    assert main(["export", str(hf_dir), "--max-size", "60 parsecs", "--out", str(nowhere)]) == 2
    assert "size '60 parsecs' is not a number with a unit" in capsys.readouterr().err
