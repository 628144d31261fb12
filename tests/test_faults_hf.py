"""A damaged HF model folder gets one clear EdgedistillError, wherever it is opened (issue 13, item 2):
resolve_source (run, export, the stages) and the PyTorch runtime behind chat, eval and bench.

    .venv/bin/python -m pytest -q tests/test_faults_hf.py

Each test copies the session's tiny llama (2 layers, width 64, 450 tokens) and damages one thing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from edgedistill.cli import main
from edgedistill.errors import EdgedistillError
from edgedistill.runtimes import open_runtime
from edgedistill.sources import resolve_source
from edgedistill.sources.hf import check_hf_folder


def damaged_copy(folder: Path, out: Path, **config_changes) -> Path:
    """A copy of `folder` whose config.json has `config_changes` (None: the key removed)."""
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


def truncated_copy(folder: Path, out: Path) -> Path:
    shutil.copytree(folder, out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return out


@pytest.mark.integration
def test_valid_folders_resolve(tiny_llama_dir, tiny_llama_untied_dir):
    for folder in (tiny_llama_dir, tiny_llama_untied_dir):
        assert resolve_source(str(folder)).kind == "hf"
    checked = check_hf_folder(tiny_llama_dir)
    assert checked.architecture_checked and checked.tokenizer_vocab_size == 450
    assert checked.weight_files == (tiny_llama_dir / "model.safetensors",)
    assert checked.tensor_shapes["model.embed_tokens.weight"] == (450, 64)


@pytest.mark.integration
def test_config_without_num_hidden_layers(tiny_llama_dir, tmp_path):
    folder = damaged_copy(tiny_llama_dir, tmp_path / "m", num_hidden_layers=None)
    with pytest.raises(EdgedistillError, match=r"says 32 layers \(num_hidden_layers is missing.*holds layers 0-1") as error:
        resolve_source(str(folder))
    assert error.value.hint == "set num_hidden_layers: 2 in config.json"


@pytest.mark.integration
def test_config_with_fewer_layers_than_the_weights(tiny_llama_dir, tmp_path):
    folder = damaged_copy(tiny_llama_dir, tmp_path / "m", num_hidden_layers=1)
    with pytest.raises(EdgedistillError, match="says 1 layer but model.safetensors holds layers 0-1") as error:
        resolve_source(str(folder))
    assert error.value.hint == "set num_hidden_layers: 2 in config.json"


@pytest.mark.integration
def test_config_without_hidden_size(tiny_llama_dir, tmp_path):
    folder = damaged_copy(tiny_llama_dir, tmp_path / "m", hidden_size=None)
    with pytest.raises(EdgedistillError, match=r"\[450, 64\] in the weights.*\[450, 4096\].*hidden_size is 4096 "
                                               r"\(missing from config.json") as error:
        resolve_source(str(folder))
    assert error.value.hint == "set hidden_size: 64 in config.json"


@pytest.mark.integration
def test_config_with_wrong_hidden_size(tiny_llama_dir, tmp_path):
    folder = damaged_copy(tiny_llama_dir, tmp_path / "m", hidden_size=128)
    with pytest.raises(EdgedistillError, match=r"model.embed_tokens.weight is \[450, 64\]") as error:
        resolve_source(str(folder))
    assert error.value.problem.endswith("; hidden_size is 128")
    assert error.value.hint == "set hidden_size: 64 in config.json"


@pytest.mark.integration
def test_config_with_wrong_key_value_heads(tiny_llama_dir, tmp_path):
    folder = damaged_copy(tiny_llama_dir, tmp_path / "m", num_key_value_heads=4)
    with pytest.raises(EdgedistillError, match=r"k_proj.weight is \[32, 64\]") as error:
        resolve_source(str(folder))
    assert error.value.hint == "set num_key_value_heads: 2 in config.json"


@pytest.mark.integration
def test_unknown_model_type(tiny_llama_dir, tmp_path):
    folder = damaged_copy(tiny_llama_dir, tmp_path / "m", model_type="lama")
    with pytest.raises(EdgedistillError, match="model_type 'lama', which transformers .* does not know") as error:
        resolve_source(str(folder))
    assert "(did you mean 'llama'?)" in error.value.problem and "llama, qwen2" in error.value.hint


@pytest.mark.integration
def test_truncated_safetensors(tiny_llama_dir, tmp_path):
    folder = truncated_copy(tiny_llama_dir, tmp_path / "m")
    size = (folder / "model.safetensors").stat().st_size
    with pytest.raises(EdgedistillError, match=f"model.safetensors is truncated: its tensors end at byte {2 * size} "
                                               f"but the file has {size} bytes") as error:
        resolve_source(str(folder))
    assert error.value.hint.endswith("again")


@pytest.mark.integration
def test_truncated_safetensors_in_the_pytorch_runtime(tiny_llama_dir, tmp_path):
    folder = truncated_copy(tiny_llama_dir, tmp_path / "m")
    with pytest.raises(EdgedistillError, match="truncated"):
        open_runtime(folder)


@pytest.mark.integration
def test_chat_on_truncated_safetensors(tiny_llama_dir, tmp_path, capsys):
    folder = truncated_copy(tiny_llama_dir, tmp_path / "m")
    assert main(["chat", str(folder), "Hi"]) == 2
    assert "model.safetensors is truncated" in capsys.readouterr().err


@pytest.mark.integration
def test_index_naming_a_missing_shard(tiny_llama_dir, tmp_path):
    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(folder, max_shard_size="100KB")
    for tokenizer_file in tiny_llama_dir.glob("tokenizer*"):
        shutil.copy(tokenizer_file, folder)
    assert resolve_source(str(folder)).kind == "hf"
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(EdgedistillError, match=f"lists {shard.name}, which .* does not hold"):
        resolve_source(str(folder))


@pytest.mark.integration
def test_tokenizer_json_that_is_not_json(tiny_llama_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(EdgedistillError, match=r"tokenizer.json is not a valid tokenizer file \(EOF while parsing"):
        resolve_source(str(folder))


@pytest.mark.integration
def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    folder = make_tiny_model(tmp_path / "m", vocab_size=300)
    with pytest.raises(EdgedistillError, match="token ids up to 449, but the model's embedding has 300 rows") as error:
        resolve_source(str(folder))
    assert "another model" in error.value.hint
