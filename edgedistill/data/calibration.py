"""Calibration text for quantization: a task's own text, read once for every export format.

    python -c "from edgedistill.data.calibration import calibration_texts; from transformers import \
AutoTokenizer as T; print(len(calibration_texts('runs/tiny/generate/train.jsonl', T.from_pretrained('runs/tiny/distill'))))"

llama.cpp's importance matrix (edgedistill.export.gguf.imatrix) and ONNX's importance-weighted int4
rounding (edgedistill.export.onnx.calibrate) both measure activations on these texts, packed into
token chunks.
"""

from __future__ import annotations

from pathlib import Path

from edgedistill.data.readers import numbered_jsonl, utf8_lines
from edgedistill.errors import EdgedistillError

# llama-imatrix's default context: activations are collected over chunks this many tokens long
CHUNK_TOKENS = 512


def calibration_texts(path: Path, tokenizer) -> list[str]:
    """Texts to calibrate on: a .jsonl of chat rows ({"messages": [...]}, rendered with the model's
    chat template, as in distillation) or text rows ({"text": ...}), or a plain .txt file."""
    path = Path(path)
    if not path.is_file():
        raise EdgedistillError(f"calibration file {path} not found",
                               "pass a run's generate/train.jsonl or a .txt file of task text")
    if path.suffix != ".jsonl":
        return ["".join(text for _, text in utf8_lines(path))]
    texts = []
    for number, row in numbered_jsonl(path):
        if "messages" in row:
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif isinstance(row.get("text"), str):
            texts.append(row["text"])
        else:
            raise EdgedistillError(f"{path}:{number} has neither 'messages' nor 'text'",
                                   "write one {\"messages\": [...]} or {\"text\": \"...\"} object per line")
    return texts


def token_chunks(tokenizer, texts: list[str], max_tokens: int, chunk_tokens: int = CHUNK_TOKENS) -> list[list[int]]:
    """The texts' tokens, concatenated, cut to `max_tokens` and packed into `chunk_tokens`-token chunks."""
    stream = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]][:max_tokens]
    n_chunks = len(stream) // chunk_tokens
    # a short calibration set still counts: one chunk of whatever there is
    chunks = [stream[i * chunk_tokens:(i + 1) * chunk_tokens] for i in range(n_chunks)] or [stream]
    if not chunks[0]:
        raise EdgedistillError("the calibration texts are empty", "pass task text (e.g. generate/train.jsonl)")
    return chunks
