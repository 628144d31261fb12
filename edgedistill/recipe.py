"""Recipes: the YAML file that declares a run, validated into typed config objects.

    edgedistill run recipes/tiny.yaml --out runs/tiny

Every section is a pydantic model that forbids unknown keys, so a typo is an error that names the
file, the field and the reason instead of a silently ignored setting. Paths inside a recipe are
relative to the recipe file.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from edgedistill.errors import EdgedistillError
from edgedistill.formats import GGUF_QUANTS, ONNX_PRECISIONS
from edgedistill.targets import Target, load_target, target_path
from edgedistill.yaml_config import read_yaml_mapping, validation_problems


RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# environment variables a recipe may send as a bearer token (see EndpointConfig)
API_KEY_ENV = re.compile(r"[A-Za-z0-9_]*API_KEY[A-Za-z0-9_]*")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields added after runs were made, with their defaults: while a field holds its default it is
    # left out of the dump (a stage's cache key hashes it), so adding one leaves finished runs cached.
    ADDED_DEFAULTS: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _without_added_defaults(self, handler):
        dumped = handler(self)
        for name, default in self.ADDED_DEFAULTS.items():
            if getattr(self, name) == default:
                dumped.pop(name, None)
        return dumped


class RandomModelConfig(Section):
    """A llama-architecture model with random weights, for tests and quick tries."""

    hidden_size: Annotated[int, Field(gt=0)] = 64
    num_hidden_layers: Annotated[int, Field(gt=0)] = 2
    num_attention_heads: Annotated[int, Field(gt=0)] = 4
    num_key_value_heads: Annotated[int, Field(gt=0)] = 2
    intermediate_size: Annotated[int, Field(gt=0)] = 128
    max_position_embeddings: Annotated[int, Field(gt=0)] = 2048
    tie_word_embeddings: bool = True
    # Wider than transformers' 0.02: with small weights a random model repeats one token (often
    # "\n"), which leaves later stages nothing to do; at 0.2 it writes varied (nonsense) text.
    initializer_range: Annotated[float, Field(gt=0)] = 0.2

    @model_validator(mode="after")
    def _heads_divide(self) -> RandomModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class TeacherConfig(Section):
    # A built-in name, an HF folder or a GGUF file; "random" builds `random` with `tokenizer`;
    # "endpoint": the teacher is the model generate.endpoint serves, no weights here, and `tokenizer`
    # (an HF folder, GGUF file or built-in name) is its tokenizer and config.
    source: str = "smollm2-135m-instruct"
    random: RandomModelConfig | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _random_needs_tokenizer(self) -> TeacherConfig:
        if self.source == "random" and (self.random is None or self.tokenizer is None):
            raise ValueError("source 'random' needs both 'random' (a model config) and 'tokenizer' (a source)")
        if self.source == "endpoint" and self.tokenizer is None:
            raise ValueError("source 'endpoint' needs 'tokenizer': an HF folder, GGUF file or built-in name with the "
                             "served model's tokenizer and config (its weights are not read)")
        if self.source != "random" and self.random is not None:
            raise ValueError("'random' is only used with source: random")
        return self


class EndpointConfig(Section):
    """An OpenAI-compatible chat endpoint (vLLM, llama.cpp's server, TGI) that answers as the teacher."""

    url: str  # base URL, e.g. http://127.0.0.1:8000/v1
    model: str = "teacher"
    api_key_env: str | None = None  # name of the environment variable holding the key, if any
    concurrency: Annotated[int, Field(gt=0, le=256)] = 4
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    retries: Annotated[int, Field(ge=0)] = 3

    @model_validator(mode="after")
    def _key_goes_only_where_safe(self) -> EndpointConfig:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1 "
                             f"(got {self.url!r})")
        if self.api_key_env is None:
            return self
        # A recipe is shared like a script: it must not be able to send any secret of the person
        # running it anywhere. So the key travels only under a name that says it is an API key,
        # and only encrypted or to this machine.
        if not API_KEY_ENV.fullmatch(self.api_key_env):
            raise ValueError(f"api_key_env {self.api_key_env!r}: the variable's name must contain API_KEY "
                             "(e.g. VLLM_API_KEY), so a recipe cannot send other secrets such as "
                             "AWS_SECRET_ACCESS_KEY; export the key under such a name")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError(f"api_key_env is set but {self.url} is plain http to another machine, which would "
                             "send the key unencrypted: use https://, or drop api_key_env")
        return self


# the scorers of edgedistill.evaluate.scorers (a test checks the two lists agree; this module stays
# at the bottom of the imports, so it cannot import that one)
SCORER_NAMES = ("label", "exact_match", "regex", "chrf", "rouge_l", "json_parse", "json_schema", "json_fields",
                "custom", "judge")
TASK_KINDS = ("classification", "generation", "extraction")


class ScorerConfig(Section):
    """One scorer of the eval stage: a name, or a mapping with its options."""

    name: Literal[SCORER_NAMES]  # type: ignore[valid-type]
    pattern: str | None = None  # regex: one capture group, compared with the reference
    function: str | None = None  # custom: "module:function", run only with --allow-recipe-code
    normalize: bool = True  # exact_match, regex, json_fields: case, spaces and quotes do not count
    # judge: the rubric prompt over {prompt}, {answer}, {reference}; the scale its score is on; the
    # model asked (an OpenAI-compatible endpoint; None: the teacher)
    rubric: str | None = None
    scale: tuple[float, float] = (1, 5)
    endpoint: EndpointConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _options_fit(self) -> ScorerConfig:
        if (self.pattern is not None) != (self.name == "regex"):
            raise ValueError("pattern is the regex scorer's option, and the regex scorer needs it")
        if (self.function is not None) != (self.name == "custom"):
            raise ValueError("function is the custom scorer's option, and the custom scorer needs it")
        if (self.rubric is not None) != (self.name == "judge") or (self.endpoint is not None and self.name != "judge"):
            raise ValueError("rubric and endpoint are the judge scorer's options, and the judge needs a rubric")
        return self


class TaskConfig(Section):
    """What the student learns to do. `classification`: answer with one of `labels` (scored by
    `label`); `generation`: free text; `extraction`: JSON following `schema`. `prompt` and `system`
    are templates over the example's fields (`{question}`, `{context}`, ...; `{{` for a brace)."""

    ADDED_DEFAULTS: ClassVar[dict[str, Any]] = {"output_schema": None, "scorers": None, "answer_separator": None}

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    kind: Literal[TASK_KINDS] = "classification"  # type: ignore[valid-type]
    labels: Annotated[list[str], Field(min_length=2)] | None = None
    # The user message; None when every example is already chat messages (data.messages_field).
    prompt: str | None = None
    system: str | None = None
    # extraction: the JSON Schema answers must follow, inline or a .json file relative to the recipe
    output_schema: dict[str, Any] | Path | None = Field(None, alias="schema")
    # None: the kind's defaults (edgedistill.evaluate.scorers.default_scorers)
    scorers: list[ScorerConfig] | None = None
    # With generate.reasoning: the line that starts the final answer after the trace, e.g. "### Answer";
    # None: "Answer:" (also "Final answer:", "**Answer:**"). Only what follows it is scored.
    answer_separator: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _kind_fits(self) -> TaskConfig:
        if self.kind == "classification" and self.labels is None:
            raise ValueError("a classification task needs labels: the answers it chooses from")
        if self.kind != "classification" and self.labels is not None:
            raise ValueError(f"labels only apply to kind classification (this task is {self.kind})")
        if self.kind == "extraction" and self.output_schema is None:
            raise ValueError("an extraction task needs schema: the JSON Schema its answers follow")
        if self.kind != "extraction" and self.output_schema is not None:
            raise ValueError(f"schema only applies to kind extraction (this task is {self.kind})")
        names = [scorer.name for scorer in self.scorers or []]
        if len(names) != len(set(names)):
            raise ValueError(f"a scorer is listed twice: {names}")
        return self


class DataConfig(Section):
    ADDED_DEFAULTS: ClassVar[dict[str, Any]] = {"reference_field": "answer", "messages_field": "messages"}

    # JSONL, CSV, Parquet, .txt (one prompt a line, as text_field) or a `datasets.save_to_disk` folder
    prompts: Path
    text_field: str = "text"
    label_field: str = "label"  # classification: the gold label
    # generation, extraction: the gold answer (text, or the JSON object of gold fields), if any
    reference_field: str = "answer"
    # rows that are already a chat ([{"role", "content"}, ...]; a last assistant turn is the gold answer)
    messages_field: str = "messages"
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    limit: Annotated[int, Field(gt=0)] | None = None


class GenerateConfig(Section):
    max_new_tokens: Annotated[int, Field(gt=0, le=4096)] = 16
    batch_size: Annotated[int, Field(gt=0)] = 16
    # Answers per prompt; more than one needs temperature > 0 to differ.
    samples: Annotated[int, Field(gt=0, le=64)] = 1
    temperature: Annotated[float, Field(ge=0)] = 0.0
    # Ask the teacher to reason step by step; the trace and the final answer are stored apart.
    reasoning: bool = False
    # Answer through this endpoint instead of the local teacher model (which still gives the logits).
    endpoint: EndpointConfig | None = None
    # The share of the teacher's answers that must pass the filters, else the stage stops (the
    # answers are kept: lowering it reruns without asking the teacher again).
    min_kept: Annotated[float, Field(ge=0, le=1)] = 0.5

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> GenerateConfig:
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples > 1 needs temperature > 0, or every sample is the same greedy answer")
        return self


class WidthConfig(Section):
    """Width pruning: the most important MLP channels, attention heads and hidden (embedding)
    channels are kept."""

    ADDED_DEFAULTS: ClassVar[dict[str, Any]] = {"hidden_size": None}

    intermediate_size: Annotated[int, Field(gt=0)] | None = None
    num_attention_heads: Annotated[int, Field(gt=0)] | None = None
    # The residual stream's width: every tensor that reads or writes it (embeddings, lm_head, norms,
    # the blocks' input and output projections) keeps the same top channels (Minitron's embedding pruning).
    hidden_size: Annotated[int, Field(gt=0)] | None = None


class StudentConfig(Section):
    # prune: keep `keep_layers` of the teacher's blocks (a count or explicit indices) and optionally
    # narrow them (`width`); config: a fresh random model of the teacher's family with `config`
    # overriding the teacher's; given: an existing smaller model (`source`) sharing the tokenizer.
    method: Literal["prune", "config", "given"] = "prune"
    keep_layers: int | list[int] | None = None
    # With a count: "even" spreads the kept blocks from first to last; "importance" keeps the blocks
    # that change their input most on the training prompts (scores recorded in the manifest).
    layer_selection: Literal["even", "importance"] = "even"
    width: WidthConfig | None = None
    # Training prompts run through the teacher to score blocks, channels and heads.
    calibration_examples: Annotated[int, Field(gt=0)] = 64
    config: dict[str, Any] | None = None
    source: str | None = None

    @model_validator(mode="after")
    def _method_fields(self) -> StudentConfig:
        if self.method == "prune" and self.keep_layers is None:
            raise ValueError("method 'prune' needs keep_layers (a count or a list of layer indices)")
        if self.method == "config" and not self.config:
            raise ValueError("method 'config' needs config (keys that override the teacher's config)")
        if self.method == "given" and not self.source:
            raise ValueError("method 'given' needs source (an HF folder or GGUF file of the student)")
        if isinstance(self.keep_layers, int) and self.keep_layers < 1:
            raise ValueError("keep_layers must be at least 1")
        return self


class TrainingConfig(Section):
    """What the distill and LoRA stages share: the schedule and the loss."""

    epochs: Annotated[int, Field(gt=0)] = 3
    learning_rate: Annotated[float, Field(gt=0)] = 2e-4
    batch_size: Annotated[int, Field(gt=0)] = 8
    # loss = (1 - kl_weight) * CE(teacher's answer) + kl_weight * T^2 * divergence(teacher_T, student_T)
    kl_weight: Annotated[float, Field(ge=0, le=1)] = 0.5
    temperature: Annotated[float, Field(gt=0)] = 2.0
    # Where the divergence applies: the answer tokens only, or every position, prompt included.
    kl_positions: Literal["answer", "all"] = "all"
    # forward KL(teacher||student), reverse KL(student||teacher) or the generalized Jensen-Shannon
    # divergence with mixture weight jsd_beta (as in GKD).
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: Annotated[float, Field(gt=0, lt=1)] = 0.5
    warmup_steps: Annotated[int, Field(ge=0)] = 10
    threads: Annotated[int, Field(gt=0)] | None = None
    # Data-parallel worker processes on this machine (gloo on CPU, NCCL on GPUs): each takes a
    # share of every batch and the gradients are averaged, so the result matches one process.
    processes: Annotated[int, Field(gt=0, le=64)] = 1

    @model_validator(mode="after")
    def _batch_fits_processes(self) -> TrainingConfig:
        if self.batch_size < self.processes:
            raise ValueError("batch_size must be at least processes (each process takes part of a batch)")
        return self


class OnPolicyConfig(Section):
    """On-policy distillation, a stage after the off-policy distill (edgedistill.distill.on_policy):
    on a `fraction` of the batches (GKD's lambda) the student samples answers to the batch's prompts
    and the teacher scores every sampled token; the other batches are the teacher's own answers. The
    loss is `divergence` at T=1 on the answer positions alone."""

    fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "reverse_kl"
    jsd_beta: Annotated[float, Field(gt=0, lt=1)] = 0.5
    # of the student's sampling (top-k and top-p off: the whole distribution)
    temperature: Annotated[float, Field(gt=0)] = 1.0
    # None: generate.max_new_tokens, the bound the teacher's own answers had
    max_new_tokens: Annotated[int, Field(gt=0)] | None = None
    epochs: Annotated[int, Field(gt=0)] = 1
    # the prompts sampled together in one generate: the default student samples about 80 tokens/s
    # at 8 and 130 at 16 on one core of a shared 2-core machine (tools/bench_on_policy_sampling.py)
    batch_size: Annotated[int, Field(gt=0)] = 16
    learning_rate: Annotated[float, Field(gt=0)] = 1e-4


# quant_aware's names for the ONNX grids: export.onnx's quantized precisions
ONNX_GRIDS = {"onnx-int4": "int4", "onnx-int8": "int8"}
# GGUF types that are float: a grid only when named (no default grid rounds to them)
FLOAT_GGUF = ("F16", "BF16")


class QuantAwareConfig(Section):
    """Quantization-aware distillation (edgedistill.distill.quant_aware): during the last `epochs`
    of distill (and every on-policy epoch) the student's weights are rounded in the forward pass to
    exactly what an exported file holds, with straight-through gradients; several grids take turns,
    one per step. `grids`: GGUF types of export.quants and onnx-int4 / onnx-int8 of export.onnx;
    None: every quantized one the recipe exports. `soft_labels`: whose top-k the fake-quantized
    epochs learn: the teacher's (as distill's other epochs), or the float student's own as those
    epochs begin (float_student: the float model teaches its rounded self, NVIDIA's QAD; those
    epochs' loss is then the divergence from it alone, at temperature 1)."""

    ADDED_DEFAULTS: ClassVar[dict[str, Any]] = {"soft_labels": "teacher", "learning_rate": None}

    grids: Annotated[list[str], Field(min_length=1)] | None = None
    epochs: Annotated[int, Field(gt=0)] = 1
    soft_labels: Literal["teacher", "float_student"] = "teacher"
    # the fake-quantized distill epochs' learning rate, constant; None: distill's schedule goes on
    learning_rate: Annotated[float, Field(gt=0)] | None = None

    @field_validator("grids")
    @classmethod
    def _known_grids(cls, grids: list[str] | None) -> list[str] | None:
        known = (*GGUF_QUANTS, *ONNX_GRIDS)
        for grid in grids or []:
            if grid not in known:
                raise ValueError(f"unknown grid {grid!r}: use GGUF types ({', '.join(GGUF_QUANTS)}) or "
                                 f"{', '.join(ONNX_GRIDS)}")
        if grids is not None and len(set(grids)) != len(grids):
            raise ValueError(f"a grid is listed twice: {grids}")
        return grids


class DistillConfig(TrainingConfig):
    ADDED_DEFAULTS: ClassVar[dict[str, Any]] = {"soft_labels_from": "cache", "on_policy": None, "quant_aware": None}

    max_seq_len: Annotated[int, Field(gt=8)] = 256
    topk: Annotated[int, Field(gt=0, le=1024)] = 32
    # Examples per shard of the logits cache: the stage holds one shard's soft labels in memory and
    # a killed run resumes after the last finished shard.
    shard_examples: Annotated[int, Field(gt=0)] = 1024
    # The logits/ folder of a cache made elsewhere (by the same teacher, checked by hash) to train
    # from instead of running the teacher here.
    soft_labels: Path | None = None
    # cache: the teacher's top-k from the logits stage; online: the teacher's forward pass on every
    # batch, top-k taken as the cache takes it, and no cache is written or read
    soft_labels_from: Literal["cache", "online"] = "cache"
    on_policy: OnPolicyConfig | None = None
    quant_aware: QuantAwareConfig | None = None

    @model_validator(mode="after")
    def _one_soft_label_source(self) -> DistillConfig:
        if self.soft_labels is not None and self.soft_labels_from == "online":
            raise ValueError("soft_labels imports a logits cache, soft_labels_from 'online' reads none: "
                             "remove one of them")
        return self

    @model_validator(mode="after")
    def _quant_aware_within_epochs(self) -> DistillConfig:
        if self.quant_aware is not None and self.quant_aware.epochs > self.epochs:
            raise ValueError(f"quant_aware.epochs {self.quant_aware.epochs} is more than distill.epochs {self.epochs}: "
                             "the fake-quantized epochs are the last ones of distill; lower quant_aware.epochs or "
                             "raise epochs")
        return self

    @model_validator(mode="after")
    def _float_student_first(self) -> DistillConfig:
        if self.quant_aware is None or self.quant_aware.soft_labels != "float_student":
            return self
        if self.quant_aware.epochs >= self.epochs:
            raise ValueError(f"quant_aware.soft_labels float_student with quant_aware.epochs {self.quant_aware.epochs} "
                             f"of distill.epochs {self.epochs}: the float student that teaches its rounded self is "
                             "trained by the epochs before; raise distill.epochs above quant_aware.epochs")
        if self.on_policy is not None:
            raise ValueError("quant_aware.soft_labels float_student with on_policy: the on-policy stage learns "
                             "the teacher's corrections of the student's samples; remove one of them")
        return self


class ProgressiveStep(Section):
    """One intermediate model: pruned from the model before it, then distilled."""

    keep_layers: int | list[int]
    layer_selection: Literal["even", "importance"] = "importance"
    width: WidthConfig | None = None
    # Epochs of this step's distillation; distill.epochs if not given.
    epochs: Annotated[int, Field(gt=0)] | None = None


class ProgressiveConfig(Section):
    """teacher -> steps[0] -> steps[1] -> ... -> student, each model pruned from the one before it.

    soft_labels "teacher": every model learns from the teacher's cached top-k; "previous": each
    learns from the model before it (teacher assistants), whose top-k is cached by its own stage.
    """

    steps: Annotated[list[ProgressiveStep], Field(min_length=1, max_length=8)]
    soft_labels: Literal["teacher", "previous"] = "teacher"


class LoraConfig(TrainingConfig):
    """A LoRA adapter trained on the task data after distillation, then merged into the student."""

    epochs: Annotated[int, Field(gt=0)] = 2
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    r: Annotated[int, Field(gt=0)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Annotated[list[str], Field(min_length=1)] = [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class OnnxOptions(Section):
    """int8/int4 ONNX weights (edgedistill.export.onnx.options.QuantOptions)."""

    block_size: Literal[16, 32, 64, 128, 256] = 32
    symmetric: bool = True
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = None  # None: 4 on CPU (int8 activations)
    lm_head_bits: Literal[4, 8] | None = 8  # None: the output projection stays float
    quantize_embeddings: bool | None = None  # None: shared with a tied, quantized lm_head
    # int4: round each weight block to the least error weighted by the generate stage's training
    # text (edgedistill.export.onnx.calibrate); false: round to nearest. Off by default, like
    # export.imatrix: it brought the teacher's int4 close to fp32 on general text, but on the
    # default student's task it scored 0.703 against round-to-nearest's 0.742 (128 reviews).
    calibrate: bool = False


class ExportConfig(Section):
    quants: list[Literal[GGUF_QUANTS]] = ["Q8_0", "Q4_K_M"]  # type: ignore[valid-type]
    teacher_quants: list[Literal[GGUF_QUANTS]] = ["Q4_K_M"]  # type: ignore[valid-type]
    # quantize the student with an importance matrix computed on the generate stage's answers
    imatrix: bool = False
    # ONNX exports of the student (an export_onnx stage when not empty)
    onnx: list[Literal[ONNX_PRECISIONS]] = []  # type: ignore[valid-type]
    onnx_options: OnnxOptions = OnnxOptions()


class BenchConfig(Section):
    # Without a target the section dumps as before targets existed (the bench stage's key).
    ADDED_DEFAULTS: ClassVar[dict[str, Any]] = {"target": None}

    prompt_tokens: Annotated[int, Field(gt=0)] = 128
    gen_tokens: Annotated[int, Field(gt=0)] = 64
    repetitions: Annotated[int, Field(gt=0)] = 3
    threads: Annotated[int, Field(gt=0)] | None = None
    # A device profile (a built-in name from recipes/targets/, or a YAML file relative to the
    # recipe): every bench row is checked against its budgets, and `edgedistill run` estimates
    # before the long stages whether the student fits its memory (edgedistill.preflight).
    target: str | None = None


class ComputeConfig(Section):
    """Where and in what precision the teacher runs: generate, logits, the eval reference (and
    tools computing importance or an imatrix on it). auto device: cuda when torch sees a GPU, else
    cpu. auto dtype: bfloat16 on CUDA; on the CPU the dtype the teacher folder stores (config.json),
    so a float32 teacher runs as it always did and a bfloat16 one is never widened into a copy twice
    its size (edgedistill.runtimes.compute)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class EvalConfig(Section):
    max_new_tokens: Annotated[int, Field(gt=0)] = 16
    # Held-out records (the first ones) whose teacher answers every artifact scores: perplexity, KL,
    # top-1 (edgedistill.evaluate.scoring). A bound on eval's cost (one forward pass per record and
    # artifact) that still scores several hundred tokens; 0: none.
    score_records: Annotated[int, Field(ge=0)] = 64


class RouteConfig(Section):
    """A `route` stage after eval (edgedistill.route): when a served student hands a request to the
    teacher, calibrated on the held-out split; it writes route/route.json for `edgedistill serve --route`."""

    ADDED_DEFAULTS: ClassVar[dict[str, Any]] = {"budget": None}

    # the share of the teacher's task score that routing must keep, with the fewest teacher calls
    target: Annotated[float, Field(gt=0, le=1)] = 0.99
    # the most of the requests the teacher may take: with it, the threshold keeps the most of the
    # teacher's score within that share of calls (target is then what it is checked against);
    # a threshold fitted to just reach target falls short of it on new requests
    budget: Annotated[float, Field(gt=0, le=1)] | None = None
    # the eval row routed from, as eval.json names it (student-q8_0.gguf, student-int4/); None: the
    # student's Q4_K_M GGUF
    artifact: Annotated[str, Field(min_length=1)] | None = None


class Recipe(Section):
    # compute: at its default and an absent route: are left out of dumps and stage keys, so runs made
    # before them stay cached
    ADDED_DEFAULTS: ClassVar[dict[str, Any]] = {"compute": ComputeConfig(), "route": None}

    name: str
    seed: int = 0
    teacher: TeacherConfig = TeacherConfig()
    task: TaskConfig
    data: DataConfig
    generate: GenerateConfig = GenerateConfig()
    student: StudentConfig
    distill: DistillConfig = DistillConfig()
    progressive: ProgressiveConfig | None = None
    lora: LoraConfig | None = None
    export: ExportConfig = ExportConfig()
    bench: BenchConfig = BenchConfig()
    eval: EvalConfig = EvalConfig()
    compute: ComputeConfig = ComputeConfig()
    route: RouteConfig | None = None
    # Where the recipe came from; relative paths inside it are resolved against this folder.
    base_dir: Path = Path(".")
    # Whether the person running it allows the recipe's own code (a custom scorer): a command-line
    # flag (--allow-recipe-code), never a recipe key, since recipes are data people share.
    allow_code: bool = False

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # it names the run folder (runs/<name>) and the exported files, so one plain path component
        if not RECIPE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a plain name: use letters, digits, '.', '_' and '-' "
                             "(at most 100, starting with a letter or digit), e.g. sentiment-135m")
        return name

    @model_validator(mode="after")
    def _progressive_prunes(self) -> Recipe:
        if self.progressive is not None and self.student.method != "prune":
            raise ValueError("progressive distillation prunes each model from the one before it: "
                             "it needs student.method 'prune' (keep_layers counts the last step's blocks)")
        return self

    @model_validator(mode="after")
    def _quant_aware_grids_exported(self) -> Recipe:
        if self.distill.quant_aware is not None:
            try:
                quant_aware_grids(self.distill, self.export)
            except EdgedistillError as exc:
                raise ValueError(f"{exc.problem}; {exc.hint}") from None
        return self

    @model_validator(mode="after")
    def _endpoint_teacher_has_no_weights(self) -> Recipe:
        if self.teacher.source != "endpoint":
            return self
        if self.generate.endpoint is None:
            raise ValueError("teacher.source 'endpoint' needs generate.endpoint (the server that runs the teacher)")
        if self.student.method == "prune":
            raise ValueError("teacher.source 'endpoint': the student cannot be pruned from weights that are not "
                             "here; use student.method 'config' (a fresh model of the teacher's family) or 'given'")
        if self.distill.soft_labels is not None:
            raise ValueError("teacher.source 'endpoint': the soft labels come from the endpoint; remove "
                             "distill.soft_labels")
        return self

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def source(self, spec: str) -> str:
        """A model source as written in the recipe: a path relative to the recipe file if one is
        there, else as given (a built-in name, or a path from the working folder)."""
        relative = self.resolve(Path(spec))
        return str(relative) if relative.exists() else spec


def quant_aware_grids(distill: DistillConfig, export: ExportConfig) -> list[str]:
    """The grids distill.quant_aware trains against, each one the recipe exports and the
    exporter rounds without the trained student's activations; EdgedistillError otherwise."""
    exported = [*export.quants, *(grid for grid, precision in ONNX_GRIDS.items() if precision in export.onnx)]
    names = f"export.quants {list(export.quants)} and export.onnx {list(export.onnx)}"
    grids = distill.quant_aware.grids
    if grids is None:
        grids = [grid for grid in exported if grid not in FLOAT_GGUF]
        if not grids:
            raise EdgedistillError(f"distill.quant_aware: the recipe exports no quantized grid ({names})",
                                   "add a quantized type to export.quants or int4 to export.onnx, or remove quant_aware")
    for grid in grids:
        if grid not in exported:
            raise EdgedistillError(f"distill.quant_aware: grid {grid} is not exported by this recipe ({names})",
                                   f"list only exported grids ({', '.join(exported) or 'none'}), or export {grid}")
    if export.imatrix and any(grid in export.quants for grid in grids):
        raise EdgedistillError("distill.quant_aware with export.imatrix: llama.cpp weighs its rounding by the "
                               "trained student's activations, which do not exist while it trains, so no grid "
                               "fixed in advance is the one the GGUF gets",
                               "set export.imatrix: false, or leave the GGUF types out of quant_aware.grids")
    if export.onnx_options.calibrate and "onnx-int4" in grids:
        raise EdgedistillError("distill.quant_aware with export.onnx_options.calibrate: the int4 rounding is "
                               "weighed by the trained student's activations, which do not exist while it trains",
                               "set export.onnx_options.calibrate: false, or leave onnx-int4 out of quant_aware.grids")
    return grids


DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "default.yaml"


def default_recipe() -> Path:
    """recipes/default.yaml of the working folder, else of the checkout this package runs from."""
    for candidate in (Path("recipes/default.yaml"), DEFAULT_RECIPE):
        if candidate.is_file():
            return candidate
    raise EdgedistillError("no recipe given and recipes/default.yaml was not found",
                           "run from the edgedistill checkout or pass a recipe: edgedistill run RECIPE.yaml")


def load_recipe(path: Path | str, *, allow_code: bool = False) -> Recipe:
    """Reads and validates a recipe; every problem is an EdgedistillError naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise EdgedistillError(f"recipe {path} does not exist", "pass the path of a YAML recipe, e.g. recipes/default.yaml")
    raw = read_yaml_mapping(path, "sections")
    for key, why in (("base_dir", "is set from the recipe's location"),
                     ("allow_code", "is the command line's --allow-recipe-code, not the recipe's to give")):
        if key in raw:
            raise EdgedistillError(f"{path}: '{key}' {why} and cannot be given")
    try:
        recipe = Recipe.model_validate({**raw, "base_dir": path.resolve().parent, "allow_code": allow_code})
    except ValidationError as exc:
        raise EdgedistillError("invalid recipe\n  " + "\n  ".join(validation_problems(path, exc)),
                               "see the recipe format in README.md") from None
    prompts = recipe.resolve(recipe.data.prompts)
    if not prompts.is_file():
        raise EdgedistillError(f"{path}: data.prompts: {prompts} does not exist", "point data.prompts at a JSONL file, relative to the recipe")
    try:
        recipe_target(recipe)
    except EdgedistillError as exc:
        raise EdgedistillError(f"{path}: bench.target: {exc.problem}", exc.hint) from None
    return recipe


def recipe_target(recipe: Recipe) -> Target | None:
    """The recipe's `bench.target`: a built-in name, or a YAML path relative to the recipe file."""
    return None if recipe.bench.target is None else load_target(recipe.source(recipe.bench.target))


def recipe_target_files(recipe: Recipe) -> dict[str, Path]:
    """The target's file, for the bench stage's cache key: an edited budget checks the rows again."""
    return {} if recipe.bench.target is None else {"target": target_path(recipe.source(recipe.bench.target))}


def section_dump(recipe: Recipe, sections: tuple[str, ...]) -> dict[str, Any]:
    """The JSON-able config of the named sections (or `section.field`s): a stage's cache key."""
    dumped: dict[str, Any] = {}
    for name in sections:
        value: Any = recipe
        for part in name.split("."):
            value = None if value is None else getattr(value, part)
        if name in recipe.ADDED_DEFAULTS and value == recipe.ADDED_DEFAULTS[name]:
            continue  # a section added after runs were made, at its default: the key it had before
        dumped[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else (
            str(value) if isinstance(value, Path) else value)
    return dumped
