"""Task quality: each artifact answers the held-out prompts; the score is the share it gets right.
With a reference, each artifact also scores the reference's answers token by token: perplexity,
KL to the reference and top-1 agreement (edgedistill.evaluate.scoring says exactly what is scored).

    edgedistill eval runs/sentiment/export/student-q4_k_m.gguf --data runs/sentiment/generate/heldout.jsonl \\
        --reference runs/sentiment/teacher --json eval.json

A held-out record carries its prompt messages, the gold label and the label choices. The answer's
label is the choice named first in it (whole words, case-insensitive), or on its last "Answer:"
line when it reasons step by step; an answer naming none counts as wrong and as unparsed. Generation is greedy, so the same artifact gives the
same score every time, in any runtime that computes the same logits.

eval.json (edgedistill.records.EvalReport): "reference" (task score, and "perplexity" and
"scored_tokens" on its own answers), "artifacts" (per artifact: task score, "share_of_reference",
"perplexity", "perplexity_ratio", "kl_to_reference" (with "kl_to_reference_interval", records
resampled), "top1_agreement", "scored_tokens"),
"scored_records" (how many held-out records were scored, the first ones) and "scored_text" (what
was scored, in words). Every row's "scores" holds each scorer's mean with its 95% bootstrap
interval, and "task_score_interval" the task score's; an artifact's "share_of_reference_interval"
and "within_noise_of_reference" compare it with the reference on the same examples. `format_eval`
is what `edgedistill eval` prints.

Open-ended records without a gold answer take the reference's answer as theirs
(edgedistill.evaluate.references): eval.json then counts them ("teacher_built_references"), each
artifact's scores say how many examples were scored against gold ("n_gold") and against the
teacher's answers ("n_teacher_built"), the reference's row is scored on the gold examples alone and
carries that as "agreement_with_gold", and shares of the reference are taken over the gold examples,
the only ones both are scored on. `build_reference_set` makes such a set from a prompt file alone.

Prompts too long are skipped, as the generate stage skips them: before any answer is generated,
every artifact (and the reference) is opened once to count each record's prompt tokens, and a
record whose prompt plus max_new_tokens does not fit one of their contexts (the runtime's
`context_length`: llama.cpp's n_ctx, ONNX Runtime GenAI's, else max_position_embeddings) is left
out for all of them,
so that their scores stay comparable. stderr names each one and eval.json counts them
("skipped_too_long"); when none fits, eval refuses. A file that is not JSONL of held-out records
is refused with its line number (edgedistill.data.prompts.numbered_jsonl).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from edgedistill import layout
from edgedistill.data.generate import split_reasoning
from edgedistill.data.prompts import named_label
from edgedistill.data.readers import numbered_jsonl
from edgedistill.errors import EdgedistillError
from edgedistill.evaluate.intervals import bootstrap_ratio, within_noise
from edgedistill.evaluate.judge import Chat, JudgeScorer, runtime_chat
from edgedistill.evaluate.references import (GOLD, TEACHER_BUILT, agreement_with_gold, answer_validator, check_save,
                                             fill_references, gold_only, prompt_records, reference_source,
                                             save_reference_set, with_sources)
from edgedistill.evaluate.scorers import ScoreInput, Scorer, ScorerSpec, build_scorers, default_scorers, score_all
from edgedistill.evaluate.scoring import SCORED_TEXT, check_vocabulary, reference_row, score_against, score_reference
from edgedistill.recipe import EvalConfig, Recipe
from edgedistill.records import (STUDENT_ROW, EvalReference, EvalReport, EvalRow, format_interval, format_score,
                                 score_basis)
from edgedistill.runtimes import Runtime, artifact_kind, gguf_artifacts, open_runtime, require_device
from edgedistill.runtimes.compute import resolve_compute
from edgedistill.sources.endpoint import is_endpoint_teacher

SCORE_RECORDS = EvalConfig().score_records
MAX_NEW_TOKENS = EvalConfig().max_new_tokens


def parse_label(answer: str, choices: list[str]) -> str | None:
    """The label of an answer: the one named on its last "Answer:" line if it reasons, else named first."""
    reasoned = split_reasoning(answer)
    return named_label(reasoned[1] if reasoned else answer, choices)


def _numbered_heldout(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) per held-out record of `path`, each checked for its keys."""
    numbered = numbered_jsonl(path)
    for line_no, row in numbered:
        messages, choices = row.get("messages"), row.get("choices")
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise EdgedistillError(f"{path}:{line_no}: a held-out record needs messages (a list of chat messages)",
                                   "use the heldout.jsonl written by the generate stage")
        if "choices" in row and not (isinstance(choices, list) and choices and "label" in row):
            raise EdgedistillError(f"{path}:{line_no}: a classification record needs label and choices (a list "
                                   "of labels)", "use the heldout.jsonl written by the generate stage")
        if "reference_source" in row and (row["reference_source"] not in (GOLD, TEACHER_BUILT)
                                          or row.get("reference") is None):
            raise EdgedistillError(f"{path}:{line_no}: reference_source is {row['reference_source']!r}: it is "
                                   f"\"{TEACHER_BUILT}\" or \"{GOLD}\", beside a reference",
                                   "use the file that `edgedistill eval --build-references` saved")
    if not numbered:
        raise EdgedistillError(f"{path} holds no held-out records", "use the heldout.jsonl written by the generate stage")
    return numbered


def read_task(data: Path) -> dict | None:
    """The task.json beside a held-out file (its generate stage's, or --build-references'), if any."""
    task_path = data.parent / layout.TASK_JSON
    return json.loads(task_path.read_text(encoding="utf-8")) if task_path.is_file() else None


def scorers_of(task: dict, *, allow_code: bool, judge_chat: Chat | None = None,
               judge_cache: Path | None = None) -> list[Scorer]:
    """The scorers a task.json names, else its kind's defaults; a judge without an endpoint asks
    `judge_chat` (the teacher), caching its verdicts in `judge_cache`."""
    specs = task["scorers"] if task.get("scorers") is not None else default_scorers(task["kind"])
    specs = [ScorerSpec(**spec) if isinstance(spec, dict) else spec for spec in specs]
    return build_scorers(specs, base_dir=Path(task.get("base_dir") or "."), allow_code=allow_code,
                         schema=task.get("schema"), labels=task.get("labels"), judge_chat=judge_chat,
                         judge_cache=judge_cache)


def task_scorers(data: Path, rows: list[dict], *, allow_code: bool = False, judge_chat: Chat | None = None,
                 judge_cache: Path | None = None) -> list[Scorer]:
    """The scorers of the task `data` was written for: its generate stage's task.json beside it, or
    for records with label choices the label scorer alone, else generation's defaults."""
    task = read_task(data)
    if task is not None:
        return scorers_of(task, allow_code=allow_code, judge_chat=judge_chat, judge_cache=judge_cache)
    if all("choices" in row for row in rows):
        return build_scorers(["label"], base_dir=Path("."), allow_code=False, schema=None,
                             labels=rows[0]["choices"])
    return build_scorers(default_scorers("generation"), base_dir=Path("."), allow_code=False, schema=None, labels=None)


def load_heldout(path: Path) -> list[dict]:
    return [row for _, row in _numbered_heldout(path)]


def too_long(model: Runtime, name: str, numbered: list[tuple[int, dict]], max_new_tokens: int) -> dict[int, str]:
    """line number -> why, for each record whose prompt plus max_new_tokens does not fit the model's context."""
    context = model.context_length
    if context is None:
        return {}
    found = {}
    for line_no, row in numbered:
        needed = len(model.prompt_ids(row["messages"])) + max_new_tokens
        if needed > context:
            found[line_no] = (f"id {row.get('id')}: {needed} tokens with {max_new_tokens} new ones, "
                              f"{name} holds {context}")
    return found


def artifact_name(artifact: Path) -> str:
    return artifact.name if artifact.is_file() else artifact.name + "/"


def final_answer(answer: str, task: dict | None = None) -> str:
    """What is scored of an answer: the part after its last "Answer:" line (task.answer_separator)
    when it reasons, all of it for an open-ended task; else the whole answer."""
    task = task or {}
    reasoned = split_reasoning(answer, task.get("answer_separator"),
                               open_ended=task.get("kind", "classification") != "classification")
    return reasoned[1] if reasoned else answer


def task_score(artifact: Path, rows: list[dict], *, max_new_tokens: int, batch_size: int = 16,
               model: Runtime | None = None, scorers: list[Scorer] | None = None,
               name: str | None = None, task: dict | None = None) -> tuple[EvalRow, dict]:
    """The artifact's greedy answers to `rows`, their score and every scorer's result by name;
    `model`: the artifact already open; `name`: its row's name (default: the file or folder name).
    The task score is the first scorer's mean (for label choices: the share answered right, as
    `correct` counts it), with that scorer's interval."""
    model = model or open_runtime(artifact)
    scorers = scorers if scorers is not None else build_scorers(["label"], base_dir=Path("."), allow_code=False,
                                                                 schema=None, labels=rows[0]["choices"])
    correct = unparsed = 0
    answers_out, items = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc=f"eval {name or artifact.name}", unit="batch"):
        batch = rows[start:start + batch_size]
        answers = model.generate([row["messages"] for row in batch], max_new_tokens)
        for row, (answer, _) in zip(batch, answers):
            items.append(ScoreInput(final_answer(answer, task), row.get("reference"), row))
            if "choices" in row:
                label = parse_label(answer, row["choices"])
                unparsed += label is None
                correct += label == row["label"]
                answers_out.append({"id": row.get("id"), "answer": answer, "predicted": label, "label": row["label"]})
            else:
                answers_out.append({"id": row.get("id"), "answer": answer, "reference": row.get("reference"),
                                    **({"reference_source": TEACHER_BUILT}
                                       if reference_source(row) == TEACHER_BUILT else {})})
    results = score_all(scorers, items)
    primary = results[scorers[0].name]
    labelled = all("choices" in row for row in rows)
    score = round(correct / len(rows), 4) if labelled else (
        round(primary.mean, 4) if primary.mean is not None else None)
    row = EvalRow(artifact=name or artifact_name(artifact), path=str(artifact), examples=len(rows),
                  **({"correct": correct, "unparsed": unparsed} if labelled else {}),
                  task_score=score, answers=answers_out,
                  scores={scorer: _rounded(result.as_dict()) for scorer, result in results.items()})
    if primary.summary.low is not None:
        row.task_score_interval = [round(primary.summary.low, 4), round(primary.summary.high, 4)]
    return row, results


def _rounded(values: dict) -> dict:
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in values.items()}


def _open(artifact: Path, device: str, dtype: str) -> Runtime:
    """`artifact` on `device`; `dtype` chooses how PyTorch runs an HF folder (GGUF and ONNX run as stored)."""
    return open_runtime(artifact, device=device, dtype=dtype if artifact_kind(artifact) == "hf" else "fp32")


def _check_device(device: str, paths: list[Path]) -> None:
    for path in paths:
        require_device(path, device)  # each artifact's runtime, before hours of work, not after


def _fitting(numbered: list[tuple[int, dict]], skipped: dict[int, str], data: Path) -> list[dict]:
    """The records not in `skipped`, saying on stderr which were left out; none left is an error."""
    rows = [row for line_no, row in numbered if line_no not in skipped]
    if skipped:
        listed = "; ".join(f"{data}:{line_no} ({why})" for line_no, why in sorted(skipped.items())[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        if not rows:
            raise EdgedistillError(f"no held-out record fits the context: {listed}{more}",
                                   "shorten the prompts or lower --max-new-tokens (eval.max_new_tokens in a recipe)")
        print(f"eval: skipping {len(skipped)} of {len(numbered)} held-out records whose prompt does not fit the "
              f"context: {listed}{more}", file=sys.stderr, flush=True)
    return rows


def evaluate(artifacts: list[Path], data: Path, reference: Path | None, *, max_new_tokens: int,
             score_records: int = SCORE_RECORDS, device: str = "cpu", dtype: str = "fp32",
             allow_code: bool = False, names: dict[Path, str] | None = None,
             judge_cache: Path | None = None, runtimes: dict[Path, Runtime] | None = None,
             reference_compute: tuple[str, str] | None = None) -> EvalReport:
    """Task scores of `artifacts` (and `reference`) on the held-out records in `data`; with a
    reference, the first `score_records` records' reference answers are scored too (0: not), and
    its answers become the references of records that have none (edgedistill.evaluate.references).
    Every artifact runs on `device`, HF folders in PyTorch in `dtype`, the reference too unless
    `reference_compute` (device, dtype) says otherwise. `names`: rows named
    otherwise than after their file or folder. A judge scorer without an endpoint asks the
    reference, which then stays open while the artifacts are scored; its verdicts are cached in
    `judge_cache` so a killed eval asks again only what was not answered. `runtimes`: paths that are
    not opened but answered by the runtime given (an endpoint teacher's folder)."""
    if score_records < 0:
        raise EdgedistillError(f"score_records is {score_records}", "pass 0 (task score only) or more records")
    _check_device(device, artifacts + ([reference] if reference is not None and not reference_compute else []))
    numbered = _numbered_heldout(data)
    task = read_task(data)
    judge: dict[str, Runtime] = {}  # the reference, once open, for a judge scorer without an endpoint
    judge_chat = (lambda conversations, on_reply: runtime_chat(judge["model"])(conversations, on_reply)
                  ) if reference is not None else None
    scorers = task_scorers(data, [row for _, row in numbered], allow_code=allow_code,  # before any model work
                           judge_chat=judge_chat, judge_cache=judge_cache)
    asks_reference = any(isinstance(s, JudgeScorer) and s.chat is judge_chat for s in scorers)
    validator = answer_validator(task) if reference is not None else None

    names = names or {}

    def name_of(path: Path) -> str:
        return names.get(path) or artifact_name(path)

    runtimes = runtimes or {}

    def open_one(path: Path) -> Runtime:
        if path in runtimes:
            return runtimes[path]
        return _open(path, *(reference_compute if path == reference and reference_compute else (device, dtype)))

    order = ([reference] if reference is not None else []) + artifacts
    skipped: dict[int, str] = {}
    held = None
    for path in reversed(order):  # the last one checked is the first used: it stays open
        held = None  # one model in memory at a time
        held = open_one(path)
        skipped = too_long(held, name_of(path), numbered, max_new_tokens) | skipped
    rows = _fitting(numbered, skipped, data)
    ref = records = ref_results = None
    unusable = 0
    if reference is not None:
        model, held = held, None
        # scored against gold alone: against references built from its own answers it would agree with itself
        judge["model"] = model
        ref_row, ref_results = task_score(reference, gold_only(rows), max_new_tokens=max_new_tokens, model=model,
                                          scorers=scorers, name=names.get(reference), task=task)
        ref = EvalReference(**ref_row.to_dict())
        if score_records:
            scored = rows[:score_records]
            records = score_reference(model, ref.artifact, [row["messages"] for row in scored],
                                      [answer["answer"] for answer in ref.answers[:len(scored)]])
            ref.update(reference_row(records))
        del model  # one model in memory at a time (but a judge's, which keeps the reference)
        if not asks_reference:
            judge.clear()
        rows, unusable = fill_references(rows, [final_answer(answer["answer"], task) for answer in ref.answers],
                                         validator)
    teacher_built = sum(reference_source(row) == TEACHER_BUILT for row in rows)
    if ref is not None and teacher_built and any(reference_source(row) == GOLD for row in rows):
        ref.agreement_with_gold = agreement_with_gold(ref_results, rows, scorers)
    results = []
    for artifact in artifacts:
        model, held = held if held is not None else open_one(artifact), None
        if records is not None:
            check_vocabulary(model, name_of(artifact), records)  # before the work, not after it
        result, scored = task_score(artifact, rows, max_new_tokens=max_new_tokens, model=model, scorers=scorers,
                                    name=names.get(artifact), task=task)
        if teacher_built:
            result.scores = with_sources(result.scores, scored, rows)
        if ref is not None:
            result.share_of_reference = (round(result.task_score / ref.task_score, 4)
                                         if ref.task_score and result.task_score is not None else None)
            result.update(_against_reference(scored, ref_results, scorers[0].name, over_pairs=bool(teacher_built)))
        if records is not None:
            result.update(score_against(model, result.artifact, records))
        del model
        results.append(result)
    report = EvalReport(data=str(data), device=device, dtype=dtype, reference=ref, artifacts=results)
    if records is not None:
        report.update({"scored_records": len(records.ids), "scored_text": SCORED_TEXT})
    if skipped:
        report.update({"skipped_too_long": len(skipped)})
    if teacher_built:
        report.teacher_built_references = teacher_built
    if unusable:
        report.unusable_teacher_answers = unusable
    return report


def _against_reference(results: dict, ref_results: dict, primary: str, *, over_pairs: bool = False) -> dict:
    """The share of the reference's score with its 95% interval (examples resampled in pairs, since
    both answered the same ones), and whether the two differ by more than that noise. `over_pairs`:
    the share itself over the examples both were scored on too (with teacher-built references, the
    reference is scored on the gold ones only)."""
    mine, theirs = results[primary].values, ref_results[primary].values
    paired = [(a, b) for a, b in zip(mine, theirs) if a is not None and b is not None]
    a, b = [p[0] for p in paired], [p[1] for p in paired]
    share = bootstrap_ratio(a, b)
    found = {"share_of_reference": round(share.mean, 4) if share.mean is not None else None} if over_pairs else {}
    if len(paired) < 2:
        return found
    return found | {"share_of_reference_interval": [round(share.low, 4), round(share.high, 4)]
                    if share.low is not None else None, "within_noise_of_reference": within_noise(a, b)}


def _scorer_means(scores: dict[str, dict]) -> str:
    return ", ".join(f"{name} {format_score(entry.get('mean'))}{format_interval([entry.get('low'), entry.get('high')])}"
                     for name, entry in scores.items())


def format_eval(report: EvalReport) -> str:
    """What `edgedistill eval` prints: the reference's task score, then each artifact's, each with its interval."""
    lines = []
    ref = report.reference
    if ref:
        scored = (f"; perplexity {ref.perplexity:.4g} on its answers ({ref.scored_tokens} tokens of "
                  f"{report.scored_records} records)") if ref.perplexity is not None else ""
        lines.append(f"reference {ref.artifact}: task score {format_score(ref.task_score)}"
                     f"{format_interval(ref.task_score_interval)} ({score_basis(ref.to_dict())})" + scored)
    if report.teacher_built_references:
        examples = report.artifacts[0].examples if report.artifacts else None
        agreement = (f"; the reference's agreement with the gold ones: {_scorer_means(ref.agreement_with_gold)}"
                     if ref and ref.agreement_with_gold else "")
        lines.append(f"teacher-built references: {report.teacher_built_references} of {examples} held-out "
                     f"examples are scored against the teacher's answers{agreement}")
    for r in report.artifacts:
        share = (f", {100 * r.share_of_reference:.1f}%"
                 f"{format_interval(r.share_of_reference_interval, scale=100, digits=1)} of reference"
                 + (" (within the noise)" if r.within_noise_of_reference else "")
                 if r.share_of_reference is not None else "")
        kl_range = format_interval(r.kl_to_reference_interval, digits=3, significant=True)
        scored = (f"; perplexity {r.perplexity:.4g} (x{r.perplexity_ratio:.3f}), KL {r.kl_to_reference:.4g}{kl_range}, "
                  f"top-1 {r.top1_agreement:.3f}") if r.perplexity is not None else ""
        lines.append(f"{r.artifact}: task score {format_score(r.task_score)}{format_interval(r.task_score_interval)} "
                     f"({score_basis(r.to_dict())}){share}{scored}")
    return "\n".join(lines)


def build_reference_set(prompts: Path, reference: Path, save: Path, *, recipe: Recipe | None = None,
                        max_new_tokens: int = MAX_NEW_TOKENS, device: str = "cpu", dtype: str = "fp32",
                        allow_code: bool = False) -> dict:
    """Held-out records from a prompt file (through the recipe's task, else a plain {text} prompt),
    the reference's answers as the references of those without gold, saved to `save` with the
    task.json that scores them; returns what was built and the reference's agreement with the gold
    references the file had."""
    _check_device(device, [reference])
    records, task = prompt_records(prompts, recipe)
    check_save(save, task)
    scorers = scorers_of(task, allow_code=allow_code)  # before any model work
    validator = answer_validator(task)
    model = _open(reference, device, dtype)
    name = artifact_name(reference)
    numbered = list(enumerate(records, 1))
    rows = _fitting(numbered, too_long(model, name, numbered, max_new_tokens), prompts)
    row, results = task_score(reference, rows, max_new_tokens=max_new_tokens, model=model, scorers=scorers, task=task)
    del model
    built, unusable = fill_references(rows, [final_answer(answer["answer"], task) for answer in row.answers], validator)
    save_reference_set(save, built, task)
    gold = sum(reference_source(record) == GOLD for record in rows)
    return {"saved": str(save), "records": len(built), "gold_references": gold,
            "teacher_built_references": sum(reference_source(record) == TEACHER_BUILT for record in built),
            "unusable_teacher_answers": unusable, "skipped_too_long": len(numbered) - len(rows),
            "reference": name, "agreement_with_gold": agreement_with_gold(results, rows, scorers) if gold else {}}


def format_built(built: dict) -> str:
    """What `edgedistill eval --build-references` prints."""
    lines = [f"wrote {built['saved']} ({layout.TASK_JSON} beside it): {built['records']} held-out records, "
             f"{built['gold_references']} with a gold reference, {built['teacher_built_references']} with "
             f"{built['reference']}'s answer as theirs (reference_source: {TEACHER_BUILT})"
             + (f", {built['unusable_teacher_answers']} without a reference (the teacher's answer was empty, or "
                "not JSON following the schema)" if built["unusable_teacher_answers"] else "")
             + (f"; {built['skipped_too_long']} prompts too long, left out" if built["skipped_too_long"] else "")]
    if built["agreement_with_gold"]:
        lines.append(f"{built['reference']}'s agreement with the {built['gold_references']} gold references, "
                     f"how far its references can be trusted: {_scorer_means(built['agreement_with_gold'])}")
    return "\n".join(lines)


def eval_stage(recipe: Recipe, out: Path, *, teacher: Path, generate: Path, teacher_gguf: Path, export: Path,
               distill: Path | None = None, merge: Path | None = None, export_onnx: Path | None = None) -> dict:
    from edgedistill.runtimes.onnx import onnx_artifacts

    # the model the exports were made from, run in PyTorch fp32: what quantization and export cost is
    # the distance from its row to theirs
    student = merge if merge is not None else distill
    artifacts = [*gguf_artifacts(teacher_gguf), student, *gguf_artifacts(export),
                 *(onnx_artifacts(export_onnx) if export_onnx else [])]
    runtimes, score_records, compute = {}, recipe.eval.score_records, None
    if not is_endpoint_teacher(teacher):
        # the teacher in the recipe's compute: section (its own dtype on the CPU, bf16 on a GPU)
        compute = resolve_compute(recipe.compute, teacher)
    else:
        from edgedistill.evaluate.endpoint_reference import EndpointRuntime

        # the reference is the endpoint's answers; a chat API cannot score ids, so no KL against it
        runtimes, score_records = {teacher: EndpointRuntime(recipe.generate.endpoint, teacher)}, 0
    report = evaluate(artifacts, generate / layout.HELDOUT_JSONL, teacher,
                      max_new_tokens=recipe.eval.max_new_tokens, score_records=score_records,
                      allow_code=recipe.allow_code, names={student: STUDENT_ROW}, judge_cache=out / layout.JUDGE_JSONL,
                      runtimes=runtimes, reference_compute=compute and (compute.device, compute.runtime_dtype))
    (out / layout.EVAL_JSON).write_text(report.to_json())
    return {"reference_task_score": report.reference.task_score,
            "heldout_skipped_too_long": report.to_dict().get("skipped_too_long", 0),
            **({"reference_compute": compute.as_dict()} if compute else {})}
