"""Generation stops at every token that ends the model's turn, not only at the tokenizer's eos.

    .venv/bin/python -m pytest -q tests/test_stop_ids.py

The unit tests read the stop ids of Llama-3-, Gemma- and ChatML-like tokenizer folders (their real
templates and special ids, no vocabulary). The integration tests build a tiny random llama whose
tokenizer's eos is <|im_end|>, whose chat template closes a turn with <|turn_end|> and whose
generation_config.json lists [<|im_end|>, <|halt|>] (names llama.cpp does not know), with weights
shaped into a bigram table (attention and MLP write nothing, so each token's successor is fixed):
the chat prompt's last token → A → B → one stop token. One model per stop token; each must end the
answer "A B" in PyTorch, in the GGUF export under llama.cpp and in the ONNX export under
onnxruntime-genai.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_model, make_tiny_tokenizer, tokenizer_corpus
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from edgedistill.data.remote import without_end_tokens
from edgedistill.runtimes.common import declared_stop_tokens

CHAT = [{"role": "user", "content": "ka lo mi"}]


def _tokenizer_folder(folder: Path, *, added: dict[str, int], eos: str, template: str,
                      generation_eos: int | list[int] | None = None, bos: str | None = None) -> Path:
    """A tokenizer folder as transformers saves it, of special tokens only: enough for the stop ids."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": i, "content": token, "special": True} for token, i in added.items()],
        "model": {"type": "BPE", "vocab": {}, "merges": []}}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": eos, "bos_token": bos, "chat_template": template}))
    if generation_eos is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return folder


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.unit
def test_llama3_list_eos_and_eot(tmp_path):
    added = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
             "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009}
    # Llama 3's first instruct release: the tokenizer's eos is <|end_of_text|>, the turn ends with <|eot_id|>
    folder = _tokenizer_folder(tmp_path / "llama3", added=added, eos="<|end_of_text|>", bos="<|begin_of_text|>",
                               template=LLAMA3_TEMPLATE, generation_eos=[128001, 128008, 128009])
    assert declared_stop_tokens(folder) == {128001: "<|end_of_text|>", 128009: "<|eot_id|>", 128008: "<|eom_id|>"}


@pytest.mark.unit
def test_gemma_end_of_turn_from_the_template(tmp_path):
    added = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 106, "<end_of_turn>": 107}
    folder = _tokenizer_folder(tmp_path / "gemma", added=added, eos="<eos>", bos="<bos>", template=GEMMA_TEMPLATE,
                               generation_eos=1)
    assert declared_stop_tokens(folder) == {1: "<eos>", 107: "<end_of_turn>"}


@pytest.mark.unit
def test_chatml_im_end_besides_endoftext(tmp_path):
    added = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    # a Qwen base model: the tokenizer ends text with <|endoftext|>, its template ends turns with <|im_end|>
    base = _tokenizer_folder(tmp_path / "base", added=added, eos="<|endoftext|>", template=CHATML_TEMPLATE)
    assert list(declared_stop_tokens(base)) == [151643, 151645]
    instruct = _tokenizer_folder(tmp_path / "instruct", added=added, eos="<|im_end|>", template=CHATML_TEMPLATE,
                                 generation_eos=[151645, 151643])
    assert list(declared_stop_tokens(instruct)) == [151645, 151643]


@pytest.mark.unit
def test_templates_declaring_no_end_token(tmp_path):
    added = {"<s>": 1, "</s>": 2}
    # Mistral closes a turn with the eos itself; a plain-text template with no token; one that cannot render
    mistral = "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]" \
              "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    plain = "{% for m in messages %}### {{ m['role'] }}\n{{ m['content'] }}\n\n{% endfor %}"
    broken = "{{ raise_exception('tools only') }}"
    for name, template in (("mistral", mistral), ("plain", plain), ("broken", broken)):
        folder = _tokenizer_folder(tmp_path / name, added=added, eos="</s>", template=template)
        assert declared_stop_tokens(folder) == {2: "</s>"}, name


@pytest.mark.unit
def test_the_default_tokenizer_declares_only_its_eos(tmp_path):
    # SmolLM2's layout (eos <|im_end|>, ChatML): the default recipe stops exactly where it did before
    make_tiny_tokenizer(tmp_path)
    assert declared_stop_tokens(tmp_path) == {2: "<|im_end|>"}


@pytest.mark.unit
def test_remote_answers_lose_trailing_end_tokens():
    assert without_end_tokens(" Paris.<end_of_turn>\n", ["<eos>", "<end_of_turn>"]) == "Paris."
    assert without_end_tokens("Paris.<end_of_turn><eos>", ["<eos>", "<end_of_turn>"]) == "Paris."
    assert without_end_tokens("say <eos> once", ["<eos>"]) == "say <eos> once"


# -- a tiny model that ends its turn with each stop token in turn -------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|turn_end|>", "<|halt|>"]
EOS, TURN_END, HALT = 2, 3, 4
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|turn_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
A, B = 263, 281  # "ka", " mi": the two answer tokens before the stop


def _tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=450, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=TEMPLATE)


def _bigram_chain(chain: list[int]):
    """An edit that makes the model a bigram table in which chain[i] is followed by chain[i + 1]."""
    def edit(model):
        for layer in model.model.layers:  # the residual stream stays the token's own embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.mul_(0.05)  # every other token well below, and no two tied
        for source, target in zip(chain, chain[1:]):
            head[target] = (30 * embed[source] / embed[source].norm()).half().float()
    return edit


@pytest.fixture(scope="module")
def stop_models(tmp_path_factory) -> dict[int, Path]:
    """stop id → an HF folder whose chat answer is A B and then that stop token."""
    tokenizer = _tokenizer()
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    last = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)[-1]
    assert last not in (A, B)
    folders = {}
    for stop in (EOS, TURN_END, HALT):
        folder = make_tiny_model(tmp_path_factory.mktemp(f"stop-{stop}"), tokenizer=tokenizer,
                                 tie_word_embeddings=False, edit=_bigram_chain([last, A, B, stop]))
        generation = json.loads((folder / "generation_config.json").read_text())
        (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [EOS, HALT]}))
        folders[stop] = folder
    return folders


def _expected_answer(folder: Path) -> str:
    return PreTrainedTokenizerFast.from_pretrained(folder).decode([A, B]).strip()


@pytest.mark.integration
def test_tiny_model_declares_three_stop_ids(stop_models):
    assert declared_stop_tokens(stop_models[HALT]) == {EOS: "<|im_end|>", TURN_END: "<|turn_end|>", HALT: "<|halt|>"}


@pytest.mark.integration
@pytest.mark.parametrize("stop", [EOS, TURN_END, HALT])
def test_pytorch_stops_at_each(stop_models, stop):
    from edgedistill.runtimes.pytorch import TorchChatModel

    chat = TorchChatModel(stop_models[stop])
    assert chat.generate([CHAT, CHAT], max_new_tokens=8) == [(_expected_answer(stop_models[stop]), True)] * 2
    assert list(chat.greedy_ids(chat.prompt_ids(CHAT), 8)) == [A, B, stop]
    assert "".join(chat.stream(CHAT, 8)) == "ka mi"


@pytest.mark.integration
@pytest.mark.parametrize("stop", [EOS, TURN_END, HALT])
def test_gguf_under_llama_cpp_stops_at_each(stop_models, stop, tmp_path):
    pytest.importorskip("llama_cpp")
    import gguf

    from edgedistill.export.gguf import write_gguf
    from edgedistill.runtimes.llamacpp import LlamaCppChatModel

    path = write_gguf(stop_models[stop], tmp_path / "model.gguf")
    fields = {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}
    assert (fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.eot_token_id"],
            fields["tokenizer.ggml.eom_token_id"]) == (EOS, TURN_END, HALT)
    chat = LlamaCppChatModel(path, threads=1)
    assert list(chat.greedy_ids(chat.prompt_ids(CHAT), 8)) == [A, B, stop]
    assert chat.generate([CHAT], max_new_tokens=8) == [(_expected_answer(stop_models[stop]), True)]


@pytest.mark.integration
def test_gguf_of_the_default_layout_gains_no_keys(tiny_llama_dir, tmp_path):
    import gguf

    from edgedistill.export.gguf import write_gguf

    fields = gguf.GGUFReader(write_gguf(tiny_llama_dir, tmp_path / "model.gguf")).fields
    assert "tokenizer.ggml.eot_token_id" not in fields and "tokenizer.ggml.eom_token_id" not in fields


@pytest.mark.integration
@pytest.mark.parametrize("stop", [EOS, TURN_END, HALT])
def test_onnx_export_under_onnxruntime_genai_stops_at_each(stop_models, stop, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    import numpy as np

    from edgedistill.export.onnx import OnnxExportOptions, export_onnx
    from edgedistill.runtimes.onnx import OnnxChatModel

    out = tmp_path / "onnx"
    export_onnx(stop_models[stop], out, OnnxExportOptions("fp32", threads=1))
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert sorted(genai["eos_token_id"]) == [EOS, TURN_END, HALT]
    chat = OnnxChatModel(out, threads=1)
    assert chat.generate([CHAT], max_new_tokens=8) == [(_expected_answer(stop_models[stop]), True)]
    # onnxruntime-genai stops by itself, from genai_config.json, as a user of the export runs it
    params = og.GeneratorParams(chat.model)
    params.set_search_options(do_sample=False, max_length=64)
    generator = og.Generator(chat.model, params)
    prompt = chat.prompt_ids(CHAT)
    generator.append_tokens(np.array([prompt], np.int32))
    answer = []
    while not generator.is_done():
        generator.generate_next_token()
        answer.append(int(generator.get_next_tokens()[0]))
    assert answer == [A, B, stop]
