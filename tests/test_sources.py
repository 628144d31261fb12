"""Model sources: resolving specs, the tokenizer repaired from GGUF metadata, HF folders written.

    .venv/bin/python -m pytest -q tests/test_sources.py            # fast tests, about 30 s
    .venv/bin/python -m pytest -q tests/test_sources.py -m slow    # + the real 135M teacher end to end

The tokenizer is checked against llama.cpp on the original GGUF file: llama.cpp is what runs the
GGUF, so its ids are the reference, not transformers' own GGUF conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from edgedistill.errors import EdgedistillError
from edgedistill.sources import ModelSource, materialize, resolve_source, tokenizer_source
from edgedistill.sources import builtin as builtin_module
from edgedistill.sources.builtin import BuiltinModel
from edgedistill.sources.gguf import tokenizer_from_gguf

BUILTIN = "smollm2-135m-instruct"
HF_FOLDER_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}
TEXTS = {
    "english": "Hello, world! How are you today? I'm fine, thanks.",
    "code": "def f(x):\n    if x:\n        return  x * 2\n\treturn None\n",
    "whitespace": "a   b\t\tc\n\n\n  d   \n \n",
    "digits": "12345 and 3.14159, 1,000,000 in 2024",
    "accents": "Café naïve résumé Ångström façade São Paulo",
    "cjk": "你好，世界。日本語のテキスト 한국어",
    "emoji": "emoji 🤗🚀👍🏽 done 🇫🇷",
    "newlines": "line1\nline2\r\nline3\n\n",
    "chat": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
}
USER_MESSAGE = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM2_USER_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def builtin_gguf() -> Path:
    return resolve_source(BUILTIN).path


@pytest.fixture(scope="module")
def repaired_tokenizer() -> PreTrainedTokenizerFast:
    return tokenizer_source(BUILTIN)


@pytest.fixture(scope="module")
def llama_vocab(builtin_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(builtin_gguf), vocab_only=True, verbose=False)


# --- the tokenizer repaired from GGUF metadata ---------------------------------------------------


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
@pytest.mark.integration
def test_repaired_tokenizer_matches_llama_cpp(repaired_tokenizer, llama_vocab, text):
    ids = repaired_tokenizer.encode(text)
    assert ids == llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
    assert repaired_tokenizer.decode(ids) == text


@pytest.mark.integration
def test_repaired_tokenizer_is_byte_level_bpe_without_bos(repaired_tokenizer):
    assert type(repaired_tokenizer) is PreTrainedTokenizerFast
    backend = json.loads(repaired_tokenizer.backend_tokenizer.to_str())
    assert backend["model"]["type"] == "BPE" and backend["model"]["byte_fallback"] is False
    assert backend["decoder"]["type"] == "ByteLevel"
    assert backend["post_processor"] is None
    assert repaired_tokenizer.decode(repaired_tokenizer.encode(" hello\n world")) == " hello\n world"
    assert not {"Ġ", "Ċ"} & set(repaired_tokenizer.decode(repaired_tokenizer.encode("a b\nc")))
    assert repaired_tokenizer.encode("hi")[0] != repaired_tokenizer.bos_token_id  # add_bos false
    assert (repaired_tokenizer.bos_token, repaired_tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (repaired_tokenizer.eos_token, repaired_tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert repaired_tokenizer.pad_token_id == 2
    assert repaired_tokenizer.decode([1, 19556, 2], skip_special_tokens=True) == "Hello"


@pytest.mark.integration
def test_chat_template_renders_like_llama_cpp(repaired_tokenizer, llama_vocab):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    prompt = repaired_tokenizer.apply_chat_template(USER_MESSAGE, tokenize=False, add_generation_prompt=True)
    assert prompt == SMOLLM2_USER_PROMPT
    # llama-cpp-python renders a GGUF's own template with this formatter when chatting.
    formatter = Jinja2ChatFormatter(
        llama_vocab.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    assert prompt == formatter(messages=USER_MESSAGE).prompt
    ids = repaired_tokenizer.apply_chat_template(USER_MESSAGE, add_generation_prompt=True)
    assert ids == llama_vocab.tokenize(prompt.encode(), add_bos=False, special=True)


@pytest.mark.integration
def test_saved_tokenizer_reloads_the_same(repaired_tokenizer, tmp_path):
    repaired_tokenizer.save_pretrained(tmp_path, save_jinja_files=False)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] is False and config["eos_token"] == "<|im_end|>"
    assert config["chat_template"] == repaired_tokenizer.chat_template
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is PreTrainedTokenizerFast
    assert set(reloaded("hi")) == {"input_ids", "attention_mask"}  # no token_type_ids for a decoder
    for text in TEXTS.values():
        assert reloaded.encode(text) == repaired_tokenizer.encode(text)


def _write_tiny_gguf(path: Path, *, pre: str, add_bos: bool) -> Path:
    """A vocabulary-only byte-level BPE GGUF: 2 control tokens, the 256 byte symbols, 2 merges."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|start|>", *bytes_to_unicode().values(), "Ġt", "he"]
    types = [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.unit
def test_tiny_gguf_tokenizer_adds_bos_when_the_gguf_says_so(tmp_path):
    tokenizer = tokenizer_from_gguf(_write_tiny_gguf(tmp_path / "tiny.gguf", pre="gpt2", add_bos=True))
    ids = tokenizer.encode("the t")
    assert ids[0] == 1 and tokenizer.decode(ids, skip_special_tokens=True) == "the t"
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == ["t", "he", "Ġt"]


@pytest.mark.unit
def test_vocab_only_gguf_has_no_weights_to_materialize(tmp_path):
    source = resolve_source(str(_write_tiny_gguf(tmp_path / "tiny.gguf", pre="gpt2", add_bos=False)))
    assert source == ModelSource("gguf", tmp_path / "tiny.gguf", "tiny")
    with pytest.raises(EdgedistillError, match="no weights"):
        materialize(source, tmp_path / "out", progress=False)


# --- resolve_source errors ----------------------------------------------------------------------


@pytest.mark.integration
def test_resolve_builtin():
    source = resolve_source(BUILTIN)
    assert source.kind == "builtin" and source.name == BUILTIN
    assert source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.path.is_file()


@pytest.mark.unit
def test_missing_path(tmp_path):
    with pytest.raises(EdgedistillError, match="no such file or folder") as error:
        resolve_source(str(tmp_path / "nowhere" / "model.gguf"))
    assert "nothing is downloaded" in error.value.hint


@pytest.mark.unit
def test_unknown_builtin_lists_known_names():
    with pytest.raises(EdgedistillError, match="smollm2-135m'") as error:
        resolve_source("smollm2-135m")
    assert BUILTIN in error.value.hint


@pytest.mark.unit
def test_builtin_whose_package_is_missing_says_what_to_install(monkeypatch):
    fake = BuiltinModel("fake-1m", "no_such_package_xyz", "no-such-package-xyz", "f.gguf", "MIT", "fake")
    monkeypatch.setitem(builtin_module.BUILTIN_MODELS, fake.name, fake)
    with pytest.raises(EdgedistillError, match="not installed") as error:
        resolve_source("fake-1m")
    assert error.value.hint == "pip install no-such-package-xyz"


@pytest.mark.unit
def test_folder_without_config(tmp_path):
    with pytest.raises(EdgedistillError, match="no config.json"):
        resolve_source(str(tmp_path))


@pytest.mark.unit
def test_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(EdgedistillError, match="no \\*.safetensors"):
        resolve_source(str(tmp_path))


@pytest.mark.unit
def test_pytorch_bin_only_folder_is_refused_with_a_hint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(EdgedistillError, match="pytorch_model.bin") as error:
        resolve_source(str(tmp_path))
    assert "safetensors only" in error.value.hint


@pytest.mark.integration
def test_truncated_gguf(builtin_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    with builtin_gguf.open("rb") as f:
        path.write_bytes(f.read(1000))
    with pytest.raises(EdgedistillError, match="truncated") as error:
        resolve_source(str(path))
    assert "again" in error.value.hint


@pytest.mark.integration
def test_gguf_cut_inside_the_tensor_data(builtin_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    with builtin_gguf.open("rb") as f:
        path.write_bytes(f.read(builtin_gguf.stat().st_size - 4096))
    with pytest.raises(EdgedistillError, match="truncated"):
        resolve_source(str(path))


@pytest.mark.unit
def test_random_bytes_named_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(EdgedistillError, match="not a GGUF file"):
        resolve_source(str(path))


# --- HF folder sources --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_folder(repaired_tokenizer, tmp_path_factory) -> Path:
    """The conftest tiny llama saved in bfloat16 with the teacher's tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer=repaired_tokenizer, dtype=torch.bfloat16)


@pytest.mark.integration
def test_hf_folder_materializes_in_its_stored_dtype(tiny_hf_folder, repaired_tokenizer, tmp_path):
    source = resolve_source(str(tiny_hf_folder))
    assert source.kind == "hf" and source.path == tiny_hf_folder
    out = materialize(source, tmp_path / "out", progress=False)
    assert {p.name for p in out.iterdir()} == HF_FOLDER_FILES
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    original = AutoModelForCausalLM.from_pretrained(tiny_hf_folder, dtype="auto")
    assert model.dtype == original.dtype == torch.bfloat16  # as stored, not widened to float32
    for (name, tensor), (_, reference) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(tensor, reference), name
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == repaired_tokenizer.chat_template
    assert tokenizer_source(str(out)).encode(TEXTS["chat"]) == repaired_tokenizer.encode(TEXTS["chat"])


@pytest.mark.integration
def test_materialize_refuses_a_non_empty_output(tiny_hf_folder, tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(EdgedistillError, match="not an empty folder"):
        materialize(resolve_source(str(tiny_hf_folder)), tmp_path, progress=False)


@pytest.mark.integration
def test_remote_code_needs_consent(tiny_hf_folder, tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    for file in tiny_hf_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgedistillError, match="auto_map") as error:
        materialize(resolve_source(str(folder)), tmp_path / "out", progress=False)
    assert "trust_remote_code" in error.value.hint


# --- the real teacher ---------------------------------------------------------------------------


@pytest.mark.slow
def test_builtin_materializes_and_answers(tmp_path):
    out = materialize(resolve_source(BUILTIN), tmp_path / "teacher", progress=False)
    assert {p.name for p in out.iterdir()} == HF_FOLDER_FILES
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 2)
    assert model.generation_config.eos_token_id == 2
    inputs = tokenizer.apply_chat_template(
        USER_MESSAGE, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert output[0, -1].item() == tokenizer.eos_token_id  # stops on <|im_end|>, not at the limit
