"""HF folders of the five teacher families, each with its real tokenizer layout, through the toolchain.

Llama 3.2 (llama3 rope scaling), Qwen2.5, Qwen3, Gemma 3 (text-only, and the Gemma3ForConditionalGeneration
class of the 4B and larger checkpoints, vision tower included) and Mistral: a tiny random model of each
(4 layers, width 64) with a tokenizer built here in the family's layout, nothing downloaded:
- Llama 3: byte-level BPE behind Llama 3's split regex, whole-word tokens before merges,
  <|begin_of_text|> added by the post-processor, <|start_header_id|>/<|eot_id|> chat template with the
  system header, generation_config eos [<|end_of_text|>, <|eom_id|>, <|eot_id|>];
- Qwen2.5 / Qwen3: byte-level BPE behind Qwen's regex, no BOS, ChatML (<|im_start|>/<|im_end|>, the
  default system prompt; Qwen3's <think> tokens and enable_thinking), eos [<|im_end|>, <|endoftext|>];
- Gemma 3: SentencePiece BPE with byte fallback (trained here, converted by transformers: spaces
  become ▁, no ▁ before the text), <pad> <eos> <bos> <unk> at 0-3, <start_of_turn>/<end_of_turn> at
  105/106 as in the real vocabulary, eos [1, 106]; the multimodal class also has its image tokens and
  linear rope scaling (factor 8) on its full-attention layers, as the 4B checkpoint does;
- Mistral: SentencePiece BPE with byte fallback (Llama 2's layout: ▁ before the text), <unk> <s> </s>
  then the v0.3 control tokens [INST] [/INST] ..., [INST] chat template closing turns with </s>.

The fast tests (one per family, seconds) run the teacher stage, the export check, the teacher's GGUF
in llama.cpp (text and chat-prompt token ids against the HF tokenizer's, logits against PyTorch on
a 64-token prompt) and the runtimes' stop ids. The slow tests run `edgedistill run` on each family
to the end (a 2-block pruned student, distilled, GGUF and ONNX exports, bench, eval, report).

    .venv/bin/python -m pytest -q tests/test_hf_families.py -m "not slow"
    .venv/bin/python -m pytest -q tests/test_hf_families.py -m slow -s    # prints the parity figures
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import TINY_SHAPE, tokenizer_corpus
from test_export_preflight import recipe_with
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from edgedistill.export.check import check_exports
from edgedistill.export.gguf import write_gguf
from edgedistill.export.gguf.tokenizer import LLAMA3_REGEX, QWEN2_REGEX
from edgedistill.export.onnx.paths import choose_path
from edgedistill.runtimes.common import declared_stop_tokens

llama_cpp = pytest.importorskip("llama_cpp")
spm = pytest.importorskip("sentencepiece")

ROOT = Path(__file__).resolve().parent.parent
CHAT = [{"role": "user", "content": "Read the review: the soup was cold and the waiter rude. Positive or negative?"}]
CHAT_WITH_ANSWER = [*CHAT, {"role": "assistant", "content": "negative"}, {"role": "user", "content": "Why?"}]
TEXTS = ("Hello world, the food was great!", "  spaces   and\n\ttabs\n\n", "digits 12345 and 3.14159",
         "café naïve Zürich 🚀", "I'm sure they'll say it's fine")
CORPUS = [*tokenizer_corpus(), "Hello world, the quick brown fox jumps over the lazy dog.",
          "Read the review and say whether the opinion is positive or negative. Answer with one word.",
          "the food was great, the service slow; I'm sure they'll say it's fine. 12345 3.14159",
          "café naïve Zürich façade", "The soup was cold and the waiter rude. Why? Positive or negative?"]
# four blocks; the run keeps two of them
LAYERS = 4

# --- tokenizers ------------------------------------------------------------------------------------


def byte_level_bpe(regex: str, *, ignore_merges: bool, specials: list[str], extra: list[str] = (),
                   vocab_size: int = 600) -> Tokenizer:
    """A byte-level BPE behind `regex` (as Llama 3 and Qwen split text), its special tokens after the
    learned vocabulary as in the real ones, `extra` added tokens that are not special (Qwen's <think>)."""
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    tokenizer.add_special_tokens(specials)
    tokenizer.add_tokens(list(extra))
    return tokenizer


def sentencepiece_bpe(folder: Path, *, specials: dict[str, int], user_defined: list[str], dummy_prefix: bool,
                      vocab_size: int) -> Path:
    """A SentencePiece BPE model with byte fallback (what Gemma's and Mistral's tokenizer.model are),
    trained here; `specials`: pad/eos/bos/unk piece -> id."""
    model = io.BytesIO()
    ids = {f"{kind}_id": specials.get(piece, -1) for kind, piece in
           (("pad", "<pad>"), ("eos", "<eos>"), ("bos", "<bos>"), ("unk", "<unk>"))}
    pieces = {f"{kind}_piece": piece for kind, piece in (("pad", "<pad>"), ("eos", "<eos>"), ("bos", "<bos>"),
                                                          ("unk", "<unk>")) if piece in specials}
    if "<s>" in specials:  # Llama 2 / Mistral names
        ids.update(unk_id=specials["<unk>"], bos_id=specials["<s>"], eos_id=specials["</s>"], pad_id=-1)
        pieces = {"unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>"}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", character_coverage=1.0, split_digits=True,
        add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=user_defined, minloglevel=2, **ids, **pieces)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder / "tokenizer.model"


def _mark_special(folder: Path, tokens: list[str]) -> None:
    """Make `tokens` special in tokenizer.json (the real files mark their turn tokens so)."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    for entry in data["added_tokens"]:
        if entry["content"] in tokens:
            entry["special"] = True
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for entry in config.get("added_tokens_decoder", {}).values():
        if entry["content"] in tokens:
            entry["special"] = True
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        data.pop(key)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2))


LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\") %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
QWEN3_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if message.role == \"assistant\" %}\n"
    "        {%- set content = message.content %}\n"
    "        {%- if '</think>' in content %}\n"
    "            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {{- message['content'] | trim }}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n")
MISTRAL_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {{- '[INST] ' + message['content'] + '[/INST]' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content']|trim + eos_token}}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_EXTRA = ["<tool_call>", "</tool_call>"]
GEMMA_USER_DEFINED = ["<mask>", "[multimodal]", *[f"<unused{i}>" for i in range(99)], "<start_of_turn>",
                      "<end_of_turn>"]
GEMMA_IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
MISTRAL_CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                   "[/TOOL_RESULTS]"]


def llama3_tokenizer(folder: Path) -> dict[str, int]:
    tokenizer = byte_level_bpe(LLAMA3_REGEX, ignore_merges=True, specials=LLAMA3_SPECIALS)
    ids = {t: tokenizer.token_to_id(t) for t in LLAMA3_SPECIALS}
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])]),
    ])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            clean_up_tokenization_spaces=True, model_input_names=["input_ids", "attention_mask"],
                            chat_template=LLAMA3_TEMPLATE).save_pretrained(folder)
    return ids


def qwen_tokenizer(folder: Path, *, template: str, extra: list[str]) -> dict[str, int]:
    tokenizer = byte_level_bpe(QWEN2_REGEX, ignore_merges=False, specials=QWEN_SPECIALS, extra=extra)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            clean_up_tokenization_spaces=False, chat_template=template).save_pretrained(folder)
    _edit_json(folder / "tokenizer_config.json", tokenizer_class="Qwen2Tokenizer", bos_token=None,
               errors="replace", split_special_tokens=False, add_prefix_space=False)
    return {t: tokenizer.token_to_id(t) for t in [*QWEN_SPECIALS, *extra]}


def gemma3_tokenizer(folder: Path, *, image_tokens: bool) -> dict[str, int]:
    from transformers import GemmaTokenizerFast

    model_file = sentencepiece_bpe(folder / "spm", specials={"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3},
                                   user_defined=GEMMA_USER_DEFINED, dummy_prefix=False, vocab_size=700)
    tokenizer = GemmaTokenizerFast(vocab_file=str(model_file), from_slow=True, chat_template=GEMMA3_TEMPLATE,
                                   add_bos_token=True, add_eos_token=False)
    if image_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": GEMMA_IMAGE_TOKENS})
    tokenizer.save_pretrained(folder)
    shutil.rmtree(folder / "spm")
    _mark_special(folder, ["<start_of_turn>", "<end_of_turn>"])
    vocab = json.loads((folder / "tokenizer.json").read_text())
    ids = {e["content"]: e["id"] for e in vocab["added_tokens"]}
    assert (ids["<start_of_turn>"], ids["<end_of_turn>"]) == (105, 106)  # the real ids
    return ids


def mistral_tokenizer(folder: Path) -> dict[str, int]:
    from transformers import LlamaTokenizerFast

    model_file = sentencepiece_bpe(folder / "spm", specials={"<unk>": 0, "<s>": 1, "</s>": 2},
                                   user_defined=MISTRAL_CONTROL, dummy_prefix=True, vocab_size=600)
    tokenizer = LlamaTokenizerFast(vocab_file=str(model_file), from_slow=True, legacy=True, add_bos_token=True,
                                   add_eos_token=False, chat_template=MISTRAL_TEMPLATE)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(folder / "spm")
    _mark_special(folder, MISTRAL_CONTROL)
    vocab = json.loads((folder / "tokenizer.json").read_text())
    return {e["content"]: e["id"] for e in vocab["added_tokens"]}


# --- the families -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A teacher family: its tiny folder's maker and what its exports must show."""

    name: str
    end_of_turn: str  # the token its chat template closes an assistant turn with
    gguf_arch: str
    onnx_path: str  # what the run's "auto" ONNX export takes for the pruned student


def _save_model(folder: Path, config, seed: int = 0) -> None:
    """A random model of `config`, every weight a float16 value, norms jittered, saved into `folder`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and "vision" not in name:
                param.add_(0.2 * torch.randn_like(param))
            param.copy_(param.half().float())
    model.save_pretrained(folder, safe_serialization=True)


def _text_config(model_type: str, vocab: int, **overrides) -> dict:
    return {**TINY_SHAPE, "num_hidden_layers": LAYERS, "vocab_size": vocab, "model_type": model_type, **overrides}


def make_llama3(folder: Path) -> Path:
    from transformers import LlamaConfig

    ids = llama3_tokenizer(folder)
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    config = _text_config("llama", len(AutoTokenizer.from_pretrained(folder)), rope_theta=500000.0,
                          bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eos, pad_token_id=None,
                          # Llama 3.2's rope scaling, its original context shrunk so that it matters here
                          rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    config.pop("model_type")
    _save_model(folder, LlamaConfig(**config))
    _edit_json(folder / "generation_config.json", bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eos,
               do_sample=True, temperature=0.6, top_p=0.9, pad_token_id=None)
    return folder


def make_qwen(folder: Path, *, version: str) -> Path:
    from transformers import Qwen2Config, Qwen3Config

    qwen3 = version == "3"
    ids = qwen_tokenizer(folder, template=QWEN3_TEMPLATE if qwen3 else QWEN25_TEMPLATE,
                         extra=[*QWEN_EXTRA, "<think>", "</think>"] if qwen3 else QWEN_EXTRA)
    config = _text_config("qwen3" if qwen3 else "qwen2", len(AutoTokenizer.from_pretrained(folder)),
                          rope_theta=1000000.0, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                          pad_token_id=None, use_sliding_window=False, sliding_window=None, max_window_layers=LAYERS,
                          **({"head_dim": 32} if qwen3 else {}))
    config.pop("model_type")
    _save_model(folder, (Qwen3Config if qwen3 else Qwen2Config)(**config))
    _edit_json(folder / "generation_config.json", bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
               eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=True, temperature=0.7,
               top_p=0.8, top_k=20, repetition_penalty=1.05)
    return folder


GEMMA3_TEXT = dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=8, rope_theta=1000000.0,
                   rope_local_base_freq=10000.0, max_position_embeddings=256, hidden_activation="gelu_pytorch_tanh",
                   layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
                   bos_token_id=2, eos_token_id=1, pad_token_id=0)


def make_gemma3(folder: Path, *, multimodal: bool) -> Path:
    from transformers import Gemma3Config, Gemma3TextConfig

    ids = gemma3_tokenizer(folder, image_tokens=multimodal)
    text = _text_config("gemma3_text", len(AutoTokenizer.from_pretrained(folder)), **GEMMA3_TEXT)
    text.pop("model_type")
    text.pop("tie_word_embeddings")
    if not multimodal:
        config = Gemma3TextConfig(**text)
    else:
        # the 4B checkpoint's layout: linear rope scaling on the full-attention layers, a SigLIP tower
        text["rope_scaling"] = {"rope_type": "linear", "factor": 8.0}
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                              boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                              image_token_index=ids["<image_soft_token>"], eos_token_id=[1, 106])
    _save_model(folder, config)
    _edit_json(folder / "generation_config.json", bos_token_id=2, pad_token_id=0, eos_token_id=[1, 106],
               cache_implementation="hybrid", do_sample=True, top_k=64, top_p=0.95)
    return folder


def make_mistral(folder: Path) -> Path:
    from transformers import MistralConfig

    mistral_tokenizer(folder)
    config = _text_config("mistral", len(AutoTokenizer.from_pretrained(folder)), rope_theta=1000000.0,
                          sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                          pad_token_id=None)
    config.pop("model_type")
    _save_model(folder, MistralConfig(**config))
    _edit_json(folder / "generation_config.json", bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return folder


FAMILIES = {
    "llama3": (make_llama3, Family("llama3", "<|eot_id|>", "llama", "optimum")),
    "qwen2.5": (lambda f: make_qwen(f, version="2.5"), Family("qwen2.5", "<|im_end|>", "qwen2", "builder")),
    "qwen3": (lambda f: make_qwen(f, version="3"), Family("qwen3", "<|im_end|>", "qwen3", "builder")),
    "gemma3": (lambda f: make_gemma3(f, multimodal=False), Family("gemma3", "<end_of_turn>", "gemma3", "optimum")),
    "gemma3-mm": (lambda f: make_gemma3(f, multimodal=True), Family("gemma3-mm", "<end_of_turn>", "gemma3",
                                                                    "optimum")),
    "mistral": (make_mistral, Family("mistral", "</s>", "llama", "builder")),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_folder(request, tmp_path_factory) -> tuple[Family, Path]:
    make, family = FAMILIES[request.param]
    return family, make(tmp_path_factory.mktemp(request.param) / "hf")


def family_recipe(folder: Path, **sections):
    return recipe_with(teacher={"source": str(folder), "random": None, "tokenizer": None},
                       student={"method": "prune", "keep_layers": 2}, **sections)


def _hf_chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def token_parity(hf_dir: Path, gguf_file: Path) -> dict:
    """The GGUF's llama.cpp tokenizer against the HF folder's: plain texts and rendered chat prompts
    (as edgedistill's llama.cpp runtime makes them), and the ids the runtimes stop at."""
    from edgedistill.runtimes.llamacpp import LlamaCppChatModel

    hf = AutoTokenizer.from_pretrained(hf_dir)
    chat = LlamaCppChatModel(gguf_file, n_ctx=256, threads=2)
    texts = {text: (chat.llm.tokenize(text.encode(), add_bos=False, special=False),
                    hf.encode(text, add_special_tokens=False)) for text in TEXTS}
    chats = {str(messages): (chat.prompt_ids(messages), _hf_chat_ids(hf, messages))
             for messages in (CHAT, CHAT_WITH_ANSWER)}
    stops = {i: chat.is_end(i) for i in declared_stop_tokens(hf_dir)}
    chat.llm.close()
    return {"texts": texts, "chats": chats, "stops": stops}


def logit_parity(hf_dir: Path, gguf_file: Path, n_tokens: int = 64) -> dict:
    """llama.cpp's logits of the F16 GGUF against PyTorch's on one prompt of `n_tokens` random ids."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt = [int(i) for i in np.random.default_rng(0).integers(3, model.config.vocab_size - 20, n_tokens)]
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(gguf_file), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    llm.eval(prompt)
    got = np.array(llm.scores[:n_tokens])
    llm.close()
    return {"max_abs_logit_diff": float(np.abs(got - expected).max()), "logit_range": float(np.abs(expected).max()),
            "argmax_agreement": float((got.argmax(-1) == expected.argmax(-1)).mean())}


@pytest.fixture(scope="module")
def teacher_dir(family_folder, tmp_path_factory) -> Path:
    """The family's folder after the teacher stage (float32, text decoder only)."""
    from edgedistill.stages import teacher_stage

    teacher = tmp_path_factory.mktemp(family_folder[0].name) / "teacher"
    teacher.mkdir()
    teacher_stage(family_recipe(family_folder[1]), teacher)
    return teacher


@pytest.mark.integration
def test_teacher_stage_export_check_and_gguf_tokenizer(family_folder, teacher_dir, tmp_path):
    family, folder = family_folder
    recipe, teacher = family_recipe(folder), teacher_dir
    config = json.loads((teacher / "config.json").read_text())
    # a multimodal checkpoint is written as its text decoder
    assert config["architectures"][0].endswith("ForCausalLM") and "vision_config" not in config
    assert check_exports(recipe, teacher) == [
        "teacher_gguf: teacher GGUF", "export: student GGUF", "export_onnx: student ONNX int4"]
    # the student keeps blocks 0 and 3 (keep_layers 2, spread evenly)
    student_config = {**config, "num_hidden_layers": 2}
    if "layer_types" in config:
        student_config["layer_types"] = [config["layer_types"][i] for i in (0, 3)]
    assert choose_path(student_config, "auto", "student") == family.onnx_path

    gguf_file = write_gguf(teacher, tmp_path / "teacher-f16.gguf")
    assert gguf.GGUFReader(gguf_file).get_field("general.architecture").contents() == family.gguf_arch
    parity = token_parity(teacher, gguf_file)
    for got, want in parity["texts"].values():
        assert got == want
    end_id = AutoTokenizer.from_pretrained(teacher).convert_tokens_to_ids(family.end_of_turn)
    assert end_id in parity["stops"] and all(parity["stops"].values()), parity["stops"]
    logits = logit_parity(teacher, gguf_file)
    print(family.name, logits)
    assert logits["max_abs_logit_diff"] < 1e-2 * logits["logit_range"] + 1e-3
    assert logits["argmax_agreement"] >= 0.95


@pytest.mark.integration
def test_llama_cpp_chat_prompts_equal_the_hf_tokenizers(family_folder, teacher_dir, tmp_path):
    # Llama 3, Gemma 3 and Mistral templates write the BOS themselves: llama.cpp must not add a second
    parity = token_parity(teacher_dir, write_gguf(teacher_dir, tmp_path / "f16.gguf"))
    for got, want in parity["chats"].values():
        assert got == want


# --- edgedistill run, end to end -------------------------------------------------------------------

# Mistral's SentencePiece tokenizer.json (Llama 2 layout, <s> added by its post-processor): the builder's
# int4 export tokenizes without the <s> in onnxruntime-genai, and its verification refuses the export
ONNX_TOKENIZER_DROPS_BOS = {"mistral"}
STAGES = ["teacher", "generate", "logits", "student", "distill", "export", "export_onnx", "teacher_gguf", "bench",
          "eval", "report"]


def _run_recipe(folder: Path, teacher: Path) -> Path:
    """The tiny recipe with `teacher` as its teacher and a smaller workload, in `folder`."""
    from test_run_tiny import copy_recipe

    recipe = copy_recipe(folder)
    text = recipe.read_text()
    start, end = text.index("teacher:\n"), text.index("task:\n")
    text = text[:start] + f"teacher:\n  source: {json.dumps(str(teacher))}\n" + text[end:]
    # these vocabularies are small (600-700 tokens): a chat prompt takes about 200 of them
    for old, new in (("limit: 48", "limit: 24"), ("epochs: 2", "epochs: 1"), ("repetitions: 2", "repetitions: 1"),
                     ("max_seq_len: 128", "max_seq_len: 256")):
        assert old in text
        text = text.replace(old, new)
    recipe.write_text(text)
    return recipe


def _llama_cpp_stops_at(gguf_file: Path, prompt: list[int], stop: int) -> bool:
    """Whether llama.cpp's own completion loop ends a greedy answer at `stop` (its logit raised above
    every other token after two free tokens), as llama-server and llama-cli users see it."""
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, n_threads=2, verbose=False)

    def force_stop(ids, scores):
        if len(ids) >= len(prompt) + 2:
            scores[stop] = scores.max() + 100.0
        return scores

    out = llm.create_completion(prompt, max_tokens=8, temperature=0.0,
                                logits_processor=llama_cpp.LogitsProcessorList([force_stop]))
    llm.close()
    return out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] <= 3


@pytest.mark.slow
def test_edgedistill_run_end_to_end(family_folder, tmp_path, request):
    from edgedistill.cli import main
    from edgedistill.pipeline import is_complete
    from edgedistill.runtimes.onnx import OnnxChatModel
    from edgedistill.runtimes.pytorch import TorchChatModel

    family, folder = family_folder
    run, recipe = tmp_path / "run", _run_recipe(tmp_path / "recipe", folder)
    if family.name in ONNX_TOKENIZER_DROPS_BOS:
        assert main(["run", str(recipe), "--out", str(run), "--to", "export"]) == 0  # the GGUF export included
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
            "onnxruntime-genai's tokenizer adds no BOS for this tokenizer.json: export_onnx's verification fails")))
    assert main(["run", str(recipe), "--out", str(run), "--to", "bench"]) == 0
    for stage in STAGES[:-2]:
        assert is_complete(run / stage), stage
    student = json.loads((run / "student" / "manifest.json").read_text())
    assert json.loads((run / "distill" / "config.json").read_text())["num_hidden_layers"] == 2, student
    onnx = json.loads((run / "export_onnx" / "student-int4" / "onnx_export.json").read_text())
    assert onnx["path"] == family.onnx_path

    student_gguf = run / "export" / "student-f16.gguf"
    parity = token_parity(run / "distill", student_gguf)
    for got, want in parity["texts"].values():
        assert got == want
    end_id = AutoTokenizer.from_pretrained(run / "distill").convert_tokens_to_ids(family.end_of_turn)
    torch_chat, onnx_chat = TorchChatModel(run / "distill"), OnnxChatModel(run / "export_onnx" / "student-int4")
    assert parity["stops"][end_id] and torch_chat.is_end(end_id) and onnx_chat.is_end(end_id)
    for gguf_file in (student_gguf, run / "teacher_gguf" / "teacher-f16.gguf"):
        assert _llama_cpp_stops_at(gguf_file, _hf_chat_ids(AutoTokenizer.from_pretrained(run / "distill"), CHAT),
                                   end_id), gguf_file

    export = json.loads((run / "export" / "manifest.json").read_text())
    figures = {"family": family.name, "onnx_path": onnx["path"],
               "student_f16": _figures(export), "teacher_f16": _figures(json.loads(
                   (run / "teacher_gguf" / "manifest.json").read_text())),
               "onnx_int4": {k: onnx["verification"].get(k) for k in ("tokenization_identical", "top1_agreement",
                                                                      "mean_kl", "greedy_verdict")}}
    print(json.dumps(figures))
    assert figures["student_f16"]["tokenization_identical"] and figures["teacher_f16"]["tokenization_identical"]

    assert main(["run", str(recipe), "--out", str(run)]) == 0
    assert is_complete(run / "eval") and is_complete(run / "report")
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    print(json.dumps({"family": family.name, "eval_artifacts": [row["artifact"] for row in evaluation["artifacts"]]}))


def _figures(manifest: dict) -> dict:
    """The F16 file's verification against its PyTorch folder, from an export stage's manifest."""
    def find(node):
        if isinstance(node, dict):
            if "F16" in node and isinstance(node["F16"], dict) and "verification" in node["F16"]:
                return node["F16"]["verification"]
            for value in node.values():
                found = find(value)
                if found is not None:
                    return found
        return None

    check = find(manifest) or {}
    return {key: check.get(key) for key in ("tokenization_identical", "max_abs_logprob_diff", "top1_agreement",
                                            "greedy_verdict")}
