"""Where every file of a run lives: the one place a file name that a stage writes or reads is spelled.

    python -c "from edgedistill import layout; print(layout.gguf_name('student', 'Q4_K_M'))"

A run folder holds one folder per stage (named after the stage) and `.partial/` for stages at
work. Modules name files through these constants, never with string literals of their own, so a
rename is one edit and a reader can see at once what a run folder holds. This module imports
nothing of the package: everything may import it.
"""

from __future__ import annotations

# every stage folder
MANIFEST = "manifest.json"
# RUN/.partial/<stage>.<key>/: a stage at work, renamed to RUN/<stage>/ when complete
PARTIAL = ".partial"
# RUN/.lock: flock-ed by the one `edgedistill run` at work on the folder (its pid, host and start time
# inside); removed when that run ends, free again whenever its process dies
RUN_LOCK = ".lock"

# stage folders (the stage's name is its folder's name)
TEACHER = "teacher"
PREFLIGHT = "preflight"
GENERATE = "generate"
LOGITS = "logits"
STUDENT = "student"
DISTILL = "distill"
ON_POLICY = "on_policy"  # with distill.on_policy: the student trained further on its own samples
# in distill/ with distill.quant_aware.soft_labels: float_student, the float student that taught
# its rounded self (an HF folder): what the files are compared with
FLOAT_STUDENT = "float_student"
LORA = "lora"
MERGE = "merge"
EXPORT = "export"
EXPORT_ONNX = "export_onnx"
TEACHER_GGUF = "teacher_gguf"
BENCH = "bench"
EVAL = "eval"
REPORT = "report"
ROUTE = "route"  # `edgedistill route RUN`: when a served student defers to the teacher

# generate/
TRAIN_JSONL = "train.jsonl"  # the teacher's answers, chat rows, the training set
HELDOUT_JSONL = "heldout.jsonl"  # held-out prompts with their gold labels or references
# the task's kind, scorers and schema, for eval; not written for a classification task with the
# default scorer, whose held-out records carry their label choices (so older runs keep their key)
TASK_JSON = "task.json"
ANSWERS_PARTIAL_JSONL = "answers.partial.jsonl"  # answers so far, while the stage is at work
# an endpoint teacher's answer tokens with their top log-probs, the logits stage's input (one row per answer)
TEACHER_TOKENS_JSONL = "teacher_tokens.jsonl"

# logits/
LOGITS_META = "meta.json"


def logits_shard_name(index: int) -> str:
    return f"cache-{index:05d}.safetensors"


# preflight/, bench/, eval/, report/
PREFLIGHT_JSON = "preflight.json"
BENCH_JSON = "bench.json"
EVAL_JSON = "eval.json"
ROUTE_JSON = "route.json"
# the judge scorer's verdicts, kept as they arrive so a killed eval asks again only the rest
JUDGE_JSONL = "judge_verdicts.jsonl"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"

# export/ and teacher_gguf/: <role>-<type>.gguf, F16 first; extras in subfolders, so that the
# top-level .gguf files are exactly the models
IMATRIX_DIR = "imatrix"
LORA_DIR = "lora"


def gguf_name(role: str, qtype: str) -> str:
    """student-q4_k_m.gguf, teacher-f16.gguf."""
    return f"{role}-{qtype.lower()}.gguf"


def imatrix_name(role: str) -> str:
    return f"{role}-imatrix.gguf"


def lora_base_name(role: str) -> str:
    return f"{role}-base-f16.gguf"


def lora_adapter_name(role: str) -> str:
    return f"{role}-lora.gguf"


# export_onnx/<role>-<precision>/: one ONNX export folder each
ONNX_MANIFEST = "onnx_export.json"  # its presence marks a folder as an ONNX export
ONNX_MODEL = "model.onnx"
ONNX_DATA = "model.onnx.data"  # weights, always external
GENAI_CONFIG = "genai_config.json"  # onnxruntime-genai's


def onnx_folder_name(role: str, precision: str) -> str:
    return f"{role}-{precision}"


# HF model folders (teacher/, student/, distill/, merge/): the files transformers reads and writes
HF_CONFIG = "config.json"
# in a teacher folder: the teacher is served by generate.endpoint, the folder holds its tokenizer and config only
ENDPOINT_TEACHER = "endpoint_teacher.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE = "chat_template.jinja"
# a tokenizer as a deployment needs it
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
