"""The generate stage: the teacher answers the task prompts; its answers become training data.

    edgedistill run recipes/tiny.yaml --out runs/tiny --from generate

Writes `train.jsonl` (chat format: the prompt messages plus the teacher's answer as the assistant
turn, the gold label, the sample index) and `heldout.jsonl` (the plain prompt messages, gold label
and the label choices; no teacher answer, so nothing of it can leak into training).

A prompt that does not fit the teacher's context with generate.max_new_tokens after it is skipped,
in both splits, before any answer is asked for (counts `skipped_too_long` and
`heldout_skipped_too_long` in the stage result); eval skips what still does not fit an artifact's
context (edgedistill.evaluate.task).

Reasoning mode (`generate.reasoning`) is "distilling step-by-step": the teacher is asked to reason
and end with an `Answer:` line; the trace and the final answer are stored apart (`trace`,
`answer`), and each answer gives two training rows, `task: rationale` (the reasoning prompt and
the whole reasoned answer) and `task: label` (the plain prompt and the final answer alone). The
student learns to explain and to answer directly; it is evaluated, and deployed, answering the
plain prompt, so the traces cost nothing at inference. The teacher is the local model (`generate.samples` answers per
prompt, sampled at `generate.temperature` with per-example seeds) or an OpenAI-compatible endpoint
(`generate.endpoint`, see data/remote.py). Every answer is appended to `answers.partial.jsonl` as
it is finished, so a killed run or a dead endpoint resumes at the first unanswered (prompt, sample).
An answer ends at the first token that ends the teacher's turn (edgedistill.runtimes.common.declared_stop_tokens:
its eos, its chat template's end-of-turn token, generation_config.json's eos list), and no such token
is kept in it, nor the text of one an endpoint leaves at its end.

Quality filters, applied when train.jsonl is written (counts in the stage result):
- empty: nothing left after stripping whitespace.
- repeated: degenerate loops, see `is_repeated`.
- truncated: hit max_new_tokens without an end-of-turn token (finish_reason "length"). Always counted; dropped in
  reasoning mode only, where a cut trace lacks its conclusion. A short plain answer cut off is
  still the teacher's text token by token, which is what distillation learns from.
- failed_format: reasoning mode: no parseable `Answer:` line, or (classification) an answer
  naming none of task.labels; extraction, in both modes: an answer that is not JSON following
  task.schema (the student learns only the format it is scored on). Plain answers naming no label are kept and counted
  (`answers_naming_no_label`): the recipe's own prompt sets their format, not this stage.
- duplicate: the same answer text as an earlier sample of the same prompt.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from edgedistill.data.answers import follows_schema, schema_validator
from edgedistill.data.endpoint_labels import ENDPOINT_TOPK, check_endpoint_tokenizer
from edgedistill.data.prompts import (Example, heldout_record, load_examples, named_label, prompt_messages, split_examples,
                                      task_schema, write_jsonl, write_task)
from edgedistill.data.remote import Request, answer_remote, describe_skips, without_end_tokens
from edgedistill.errors import EdgedistillError
from edgedistill.layout import (ANSWERS_PARTIAL_JSONL, HELDOUT_JSONL, HF_CONFIG, TASK_JSON, TEACHER_TOKENS_JSONL,
                                TRAIN_JSONL)
from edgedistill.recipe import Recipe
from edgedistill.runtimes.common import declared_stop_tokens
from edgedistill.runtimes.compute import resolve_compute
from edgedistill.runtimes.pytorch import TorchChatModel, load_tokenizer
from edgedistill.sources.endpoint import is_endpoint_teacher

PARTIAL_ANSWERS = ANSWERS_PARTIAL_JSONL

# Repetition: an answer of at least REPEAT_MIN_WORDS words is degenerate when one word n-gram
# (n <= REPEAT_MAX_N) occurs REPEAT_MIN_COUNT+ times and covers REPEAT_MIN_SHARE of the words
# ("the the the ...", "I am sure. I am sure. ..."). Normal prose stays far below: even "the" is
# under 10% of English words. Below 12 words a classification answer may fairly say "positive,
# positive" and is never judged.
REPEAT_MIN_WORDS = 12
REPEAT_MAX_N = 4
REPEAT_MIN_COUNT = 4
REPEAT_MIN_SHARE = 0.5
# Loops without spaces ("!!!!!!!!!!", "ababab..."): a unit of 1-20 characters repeated 10+ times
# in a row that covers half the answer; a markdown rule ("----------") inside prose does not.
CHAR_LOOP = re.compile(r"(.{1,20}?)\1{9,}", re.DOTALL)
CHAR_LOOP_MIN_SHARE = 0.5
# The reasoning mode's final line; tolerant of what small models add ("**Final answer:** X.").
ANSWER_LINE = re.compile(r"^[\s*#>_-]*(?:the\s+)?(?:final\s+)?answer\s*[*_]*\s*[:：]\s*[*_]*\s*(.+?)\s*$",
                         re.IGNORECASE | re.MULTILINE)


def is_repeated(text: str) -> bool:
    """True for degenerate repetition (thresholds above)."""
    words = text.split()
    if len(words) >= REPEAT_MIN_WORDS:
        for n in range(1, REPEAT_MAX_N + 1):
            grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            count = grams.most_common(1)[0][1]
            if count >= REPEAT_MIN_COUNT and count * n >= REPEAT_MIN_SHARE * len(words):
                return True
    loop = max((m.end() - m.start() for m in CHAR_LOOP.finditer(text)), default=0)
    return loop >= 20 and loop >= CHAR_LOOP_MIN_SHARE * len(text)


def split_reasoning(text: str, separator: str | None = None, *, open_ended: bool = False) -> tuple[str, str] | None:
    """(trace, final answer) from "...reasoning...\\nAnswer: X"; None when there is no answer line.

    The last answer line counts (a model may restate the question's format earlier). `separator`:
    the recipe's own marker, matched literally at a line's start; None: "Answer:" as small models
    write it. Open-ended answers (generation, extraction) are everything after the marker, kept as
    written; a label is the rest of its line, without decoration.
    """
    if separator is None:
        matches = list(ANSWER_LINE.finditer(text))
        starts = [(m.start(), m.start(1)) for m in matches]
    else:
        matches = list(re.finditer(rf"^[ \t]*{re.escape(separator)}[ \t]*", text, re.MULTILINE))
        starts = [(m.start(), m.end()) for m in matches]
    if not starts:
        return None
    line_start, answer_start = starts[-1]
    if open_ended:
        answer = text[answer_start:].strip()
    else:
        answer = text[answer_start:].split("\n", 1)[0].strip().strip("*_`\"'.").strip()
    if not answer:
        return None
    return text[:line_start].strip(), answer


def sample_seed(seed: int, example_id: int, sample: int) -> int:
    """One seed per (example, sample): the same answer whatever the batching or resume point."""
    return (seed * 1_000_003 + example_id * 64 + sample) % 2**31


def _answered(path: Path) -> dict[tuple[int, int], dict]:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                break  # the line a kill cut short; it is answered again
            done[row["id"], row.get("sample", 0)] = row
    return done


class SeededSampler(LogitsProcessor):
    """Temperature sampling with one torch.Generator per batch row, done as a logits processor.

    transformers' own sampling draws from the global RNG across the whole batch, so an answer would
    depend on its batch mates; here each row samples from its own seeded generator and every other
    token is masked, so greedy decoding picks the sampled one.
    """

    def __init__(self, seeds: list[int], temperature: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # drawn on the CPU, where the generators are, whatever device the teacher runs on
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        picked = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter(1, picked.to(scores.device), 0.0)


def _sample(chat: TorchChatModel, conversations: list[list[dict]], max_new_tokens: int,
            sampler: SeededSampler) -> list[tuple[str, bool]]:
    return chat.generate(conversations, max_new_tokens, logits_processor=LogitsProcessorList([sampler]))


def _generate_local(recipe: Recipe, chat: TorchChatModel, requests: list[Request], record) -> None:
    size, cfg = recipe.generate.batch_size, recipe.generate
    # Similar lengths in a batch waste less compute on padding.
    requests = sorted(requests, key=lambda r: len(r.messages[-1]["content"]))
    for start in range(0, len(requests), size):
        batch = requests[start:start + size]
        conversations = [r.messages for r in batch]
        if cfg.temperature > 0:
            sampler = SeededSampler([r.seed for r in batch], cfg.temperature)
            answers = _sample(chat, conversations, cfg.max_new_tokens, sampler)
        else:
            answers = chat.generate(conversations, cfg.max_new_tokens)
        for request, (answer, finished) in zip(batch, answers):
            record(request, answer, finished)


def _context_length(teacher: Path) -> int | None:
    config = json.loads((teacher / HF_CONFIG).read_text())
    return config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")


def _fits(recipe: Recipe, teacher: Path, examples: list[Example], *,
          reasoning: bool | None = None) -> tuple[list[Example], int]:
    """The examples whose prompt (with `reasoning` as prompt_messages takes it) plus
    generate.max_new_tokens fits the teacher's context, and the skip count."""
    context = _context_length(teacher)
    if context is None:
        return examples, 0
    tokenizer = load_tokenizer(teacher)
    fits = [ex for ex in examples
            if len(tokenizer.apply_chat_template(prompt_messages(recipe, ex, reasoning=reasoning),
                                                 add_generation_prompt=True, tokenize=True))
            + recipe.generate.max_new_tokens <= context]
    return fits, len(examples) - len(fits)


def judge(recipe: Recipe, answer: str, finished: bool, validator=None) -> tuple[str | None, dict]:
    """(drop reason or None, extra row fields) for one answer, by the filters in the module docstring."""
    if not answer:
        return "empty", {}
    if is_repeated(answer):
        return "repeated", {}
    if not recipe.generate.reasoning:
        # an extraction answer is learned only when it is the JSON the schema asks for
        return ("failed_format", {}) if validator is not None and not follows_schema(answer, validator) else (None, {})
    if not finished:
        return "truncated", {}
    parsed = split_reasoning(answer, recipe.task.answer_separator, open_ended=recipe.task.kind != "classification")
    if parsed is None:
        return "failed_format", {}
    trace, final = parsed
    if recipe.task.kind == "classification":
        label = named_label(final, recipe.task.labels)
        if label is None:
            return "failed_format", {}
        final = label
    if validator is not None and not follows_schema(final, validator):
        return "failed_format", {}
    return None, {"trace": trace, "answer": final}


def build_rows(recipe: Recipe, train: list[Example], done: dict[tuple[int, int], dict]) -> tuple[list[dict], dict]:
    """train.jsonl rows and the filter counts, from the answers of every (example, sample)."""
    counts = Counter()
    rows = []
    schema = task_schema(recipe)
    validator = schema_validator(schema) if schema is not None else None
    for ex in train:
        seen, seen_finals = set(), set()
        for sample in range(recipe.generate.samples):
            if (ex.id, sample) not in done:
                continue  # skipped prompt or endpoint failure, counted where it happened
            answer, finished = done[ex.id, sample]["answer"], done[ex.id, sample]["finished"]
            counts["truncated_answers"] += not finished
            reason, extra = judge(recipe, answer, finished, validator)
            if reason is None and answer in seen:
                reason = "duplicate"
            if reason is not None:
                counts[f"dropped_{reason}"] += 1
                continue
            seen.add(answer)
            if (not recipe.generate.reasoning and recipe.task.kind == "classification"
                    and named_label(answer, recipe.task.labels) is None):
                counts["answers_naming_no_label"] += 1
            messages = prompt_messages(recipe, ex) + [{"role": "assistant", "content": answer}]
            if not recipe.generate.reasoning:
                rows.append({"id": ex.id, "sample": sample, "messages": messages, "label": ex.label})
                continue
            rows.append({"id": ex.id, "sample": sample, "task": "rationale", "messages": messages, "label": ex.label,
                         **extra})
            if extra["answer"] not in seen_finals:
                # One label row per distinct final answer: samples that agree would only repeat it.
                seen_finals.add(extra["answer"])
                plain = prompt_messages(recipe, ex, reasoning=False)
                rows.append({"id": ex.id, "sample": sample, "task": "label", "label": ex.label,
                             "messages": plain + [{"role": "assistant", "content": extra["answer"]}]})
    return rows, counts


def generate(recipe: Recipe, out: Path, *, teacher: Path) -> dict:
    cfg = recipe.generate
    train, heldout = split_examples(recipe, load_examples(recipe))
    train_fit, skipped_too_long = _fits(recipe, teacher, train)
    # The same rule for the held-out prompts (as eval sends them, without the reasoning request),
    # checked before any answer is asked for: a prompt past the context would crash eval at the end.
    heldout_fit, heldout_skipped_too_long = _fits(recipe, teacher, heldout, reasoning=False)
    if not heldout_fit:
        raise EdgedistillError(
            f"all {len(heldout)} held-out prompts are too long for the teacher's context with "
            f"generate.max_new_tokens = {cfg.max_new_tokens}",
            "shorten the examples in data.prompts, lower generate.max_new_tokens or raise data.heldout_fraction")
    partial = out / PARTIAL_ANSWERS
    done = _answered(partial)
    # Rewrite without a possibly cut last line before appending to it.
    write_jsonl(partial, [done[k] for k in sorted(done)])
    requests = [Request((ex.id, s), prompt_messages(recipe, ex), sample_seed(recipe.seed, ex.id, s))
                for ex in train_fit for s in range(cfg.samples) if (ex.id, s) not in done]
    skipped_endpoint = []
    # soft labels from an endpoint are ids of teacher.tokenizer's vocabulary: checked before asking
    tokenizer_check = (check_endpoint_tokenizer(cfg.endpoint, teacher) if requests and is_endpoint_teacher(teacher)
                       else None)
    if requests:
        lock = threading.Lock()
        total = len(train_fit) * cfg.samples
        with open(partial, "a", encoding="utf-8") as sink, \
                tqdm(total=total, initial=total - len(requests), desc="generate", unit="answer") as bar:
            def record(request: Request, answer: str, finished: bool, tokens: list[dict] | None = None) -> None:
                row = {"id": request.key[0], "sample": request.key[1], "answer": answer, "finished": finished,
                       **({"tokens": tokens} if tokens is not None else {})}
                # Remote answers arrive from worker threads; one line per answer, whole, flushed at once.
                with lock:
                    done[request.key] = row
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                    sink.flush()
                    bar.update(1)

            if cfg.endpoint is not None:
                end_texts = [text for text in declared_stop_tokens(teacher).values() if text]
                # an endpoint teacher's soft labels are its answer tokens' top log-probs
                answer_remote(cfg.endpoint, requests, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              on_answer=lambda request, completion: record(
                                  request, without_end_tokens(completion.text, end_texts), completion.finished,
                                  completion.tokens),
                              on_skip=lambda request, error: skipped_endpoint.append(error),
                              top_logprobs=ENDPOINT_TOPK if is_endpoint_teacher(teacher) else 0)
            else:
                compute = resolve_compute(recipe.compute, teacher)
                chat = TorchChatModel(teacher, trust_remote_code=recipe.teacher.trust_remote_code,
                                      device=compute.device, dtype=compute.runtime_dtype)
                _generate_local(recipe, chat, requests, record)

    rows, counts = build_rows(recipe, train, done)
    answered = sum(1 for ex in train for s in range(cfg.samples) if (ex.id, s) in done)
    kept = sum(1 for row in rows if row.get("task") != "label")
    if not rows:
        endpoint_failures, hints = str(len(skipped_endpoint)), []
        if skipped_endpoint:
            endpoint_failures, endpoint_hint = describe_skips(skipped_endpoint)
            hints.append(endpoint_hint)
        if answered or not skipped_endpoint:  # the answers' filters, not the endpoint, dropped them
            hints.append("check the teacher with `edgedistill chat`, raise generate.max_new_tokens, "
                         "or turn off generate.reasoning")
        raise EdgedistillError(
            f"no usable teacher answer for the {len(train)} training prompts (filtered: {dict(counts)}, "
            f"too long: {skipped_too_long}, endpoint failures: {endpoint_failures})", "; ".join(hints))
    if kept < cfg.min_kept * answered:
        # A student trained on the few survivors learns little (a 135M teacher asked to reason
        # kept 4 answers of 512 and its student scored below chance).
        dropped = {key: n for key, n in counts.items() if key.startswith("dropped_") and n}
        raise EdgedistillError(
            f"only {kept} of the teacher's {answered} answers passed the filters ({dropped}), fewer than "
            f"generate.min_kept = {cfg.min_kept:g} of them",
            "look at the answers with `edgedistill chat`; in reasoning mode the teacher must end with "
            "'Answer: <label>' (a larger or remote teacher, or generate.reasoning: false); or lower "
            "generate.min_kept to train on them anyway (the answers are kept: the rerun does not ask again)")
    write_jsonl(out / TRAIN_JSONL, rows)
    write_jsonl(out / HELDOUT_JSONL, [heldout_record(recipe, ex) for ex in heldout_fit])
    write_task(out / TASK_JSON, recipe)
    if is_endpoint_teacher(teacher):
        write_jsonl(out / TEACHER_TOKENS_JSONL, [{"id": key[0], "sample": key[1], "tokens": done[key]["tokens"]}
                                                 for key in sorted(done) if "tokens" in done[key]])
    partial.unlink()
    result = {"teacher": cfg.endpoint.url if cfg.endpoint else "local", "train_prompts": len(train),
              "samples_per_prompt": cfg.samples, "answers": answered, "kept_answers": kept,
              "train_examples": len(rows), "heldout_examples": len(heldout_fit),
              "skipped_too_long": skipped_too_long, "heldout_skipped_too_long": heldout_skipped_too_long,
              "skipped_endpoint_failures": len(skipped_endpoint),
              **({"endpoint_tokenizer": tokenizer_check} if tokenizer_check else {})}
    for key in ("dropped_empty", "dropped_repeated", "dropped_truncated", "dropped_failed_format", "dropped_duplicate",
                "truncated_answers", "answers_naming_no_label"):
        result[key] = counts[key]
    return result
