"""How well a model (by default the embedded teacher) answers a candidate task: greedy answers to a
JSONL of examples, scored against their gold answers with the task kind's scorers, each mean with
its 95% bootstrap interval, plus a few sample answers. For choosing a task and a prompt the
teacher can do before writing a recipe around them, and for the teacher's agreement with gold on
a recipe's held-out split.

    .venv/bin/python tools/probe_teacher_task.py --data /tmp/candidates.jsonl --kind generation \\
        --prompt "Rewrite with correct capitalization and punctuation: {text}" --limit 60 \\
        --max-new-tokens 48 --json /tmp/probe.json
    .venv/bin/python tools/probe_teacher_task.py --data /tmp/orders.jsonl --kind extraction \\
        --schema /tmp/order.schema.json --prompt "Extract the fields as JSON: {message}" --json /tmp/probe.json
    .venv/bin/python tools/probe_teacher_task.py --recipe recipes/contacts.yaml --split heldout \\
        --baseline-field message --json /tmp/contacts-heldout.json

With --recipe the kind, prompt, system prompt, schema, scorers and data come from the recipe, the
examples are its held-out split (or train, or all) as the generate stage splits them, and
--max-new-tokens defaults to the recipe's eval.max_new_tokens. The model runs greedily in its own
runtime: the built-in teacher's Q4_1 GGUF in llama.cpp by default, the fastest on a CPU (100
held-out answers in 28 s for recipes/past-tense.yaml, 64 s for recipes/contacts.yaml, on 2 idle
cores). The pipeline's teacher is the same weights dequantized in PyTorch (pass its HF folder,
RUN/teacher, as --model to score exactly that; about 4x slower here): greedy answers of a model this
small differ between the two on near ties (7 of 100 past-tense training prompts, about a third of
the contacts ones, mostly in text after the JSON), so compare scores with their intervals, not
answers. `--answers FILE` writes every example's prompt, answer, reference and scores as JSONL;
`--baseline-field FIELD` scores copying that input field as the answer, the floor a task must beat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgedistill.data.prompts import Example, load_examples, prompt_messages, split_examples, task_schema
from edgedistill.data.readers import read_rows
from edgedistill.data.templates import check_template, render
from edgedistill.evaluate.scorers import ScoreInput, build_scorers, default_scorers, score_all
from edgedistill.recipe import load_recipe
from edgedistill.runtimes import open_runtime

SAMPLE_ANSWERS = 8


def candidate_examples(args: argparse.Namespace, rows: list) -> list[Example]:
    """Examples of a bare data file: the prompt (and system) templates filled from each row."""
    check_template(args.prompt, rows)
    if args.system:
        check_template(args.system, rows, name="--system")
    examples = []
    for index, row in enumerate(rows):
        system = [{"role": "system", "content": render(args.system, row.fields, row.where, name="--system")}] \
            if args.system else []
        messages = system + [{"role": "user", "content": render(args.prompt, row.fields, row.where)}]
        examples.append(Example(index, messages, reference=row.fields.get(args.reference_field), where=row.where))
    return examples


def load_task(args: argparse.Namespace) -> tuple[str, list[Example], list[dict], dict | None, list, Path, int]:
    """(kind, examples, each example's row fields, schema, scorer specs, base folder, max_new_tokens)
    from a recipe or from the flags."""
    if args.recipe:
        recipe = load_recipe(args.recipe)
        examples = load_examples(recipe)
        rows = read_rows(recipe.resolve(recipe.data.prompts), text_field=recipe.data.text_field)
        train, heldout = split_examples(recipe, examples)
        chosen = {"heldout": heldout, "train": train, "all": examples}[args.split]
        # the prompt eval sends: no reasoning request
        chosen = [Example(ex.id, prompt_messages(recipe, ex, reasoning=False), ex.label, ex.reference, ex.where)
                  for ex in chosen]
        specs = recipe.task.scorers or default_scorers(recipe.task.kind)
        return (recipe.task.kind, chosen, [rows[ex.id].fields for ex in chosen], task_schema(recipe), specs,
                recipe.base_dir, args.max_new_tokens or recipe.eval.max_new_tokens)
    if not (args.data and args.prompt and args.kind):
        sys.exit("give --recipe, or --data, --prompt and --kind")
    schema = None
    if args.schema:
        text = args.schema if args.schema.lstrip().startswith("{") else Path(args.schema).read_text(encoding="utf-8")
        schema = json.loads(text)
    rows = read_rows(args.data)
    return (args.kind, candidate_examples(args, rows), [row.fields for row in rows], schema,
            default_scorers(args.kind), Path("."), args.max_new_tokens or 64)


def scored(scorers: list, predictions: list[str], examples: list[Example]) -> dict:
    items = [ScoreInput(prediction, example.reference, {"id": example.id, "messages": example.messages})
             for prediction, example in zip(predictions, examples)]
    return score_all(scorers, items)


def summary_line(name: str, result) -> str:
    s = result.summary
    return f"{name:24s} {s.mean:.3f} [{s.low:.3f}, {s.high:.3f}] n={s.n}" if s.mean is not None else f"{name:24s} -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, help="take the task, prompt, schema and data from this recipe")
    parser.add_argument("--split", choices=("heldout", "train", "all"), default="heldout",
                        help="with --recipe: which examples (default: the held-out split)")
    parser.add_argument("--data", type=Path, help="JSONL (or any data file) of candidate examples")
    parser.add_argument("--prompt", help="the user-turn template over the example's fields")
    parser.add_argument("--system", help="an optional system-turn template")
    parser.add_argument("--kind", choices=("generation", "extraction"))
    parser.add_argument("--schema", help="extraction: a JSON Schema file, or the schema as JSON text")
    parser.add_argument("--reference-field", default="answer")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a built-in name, GGUF, ONNX or HF folder")
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path, help="write the results here (else to stdout)")
    parser.add_argument("--answers", type=Path, help="write every answer with its scores here (JSONL)")
    parser.add_argument("--baseline-field", help="also score this field of each example, copied as the answer: "
                                                  "a task the model does not beat by copying its input is no task")
    args = parser.parse_args()

    kind, examples, fields, schema, specs, base_dir, max_new_tokens = load_task(args)
    if args.limit:
        examples, fields = examples[: args.limit], fields[: args.limit]
    scorers = build_scorers(specs, base_dir=base_dir, allow_code=False, schema=schema, labels=None)
    runtime = open_runtime(args.model, threads=args.threads)
    started = time.perf_counter()
    answers = []
    for number, example in enumerate(examples, 1):
        answers.extend(runtime.generate([example.messages], max_new_tokens))
        print(f"\r{number}/{len(examples)} answered", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    seconds = time.perf_counter() - started
    results = scored(scorers, [answer for answer, _ in answers], examples)
    report = {
        "model": str(args.model), "kind": kind,
        "source": f"{args.recipe} ({args.split})" if args.recipe else str(args.data),
        "prompt": examples[0].messages[-1]["content"] if examples else None,
        "examples": len(examples), "with_reference": sum(ex.reference is not None for ex in examples),
        "max_new_tokens": max_new_tokens, "cut_at_max_new_tokens": sum(not ended for _, ended in answers),
        "generate_seconds": round(seconds, 1), "answers_per_s": round(len(examples) / seconds, 3) if seconds else None,
        "scores": {name: result.as_dict() for name, result in results.items()},
        "samples": [{"prompt": ex.messages[-1]["content"], "answer": answer, "reference": ex.reference}
                    for ex, (answer, _) in list(zip(examples, answers))[:SAMPLE_ANSWERS]],
    }
    if args.baseline_field:
        copied = [str(row.get(args.baseline_field, "")) for row in fields]
        baseline = scored(scorers, copied, examples)
        report["baseline"] = {"field": args.baseline_field,
                              "scores": {name: result.as_dict() for name, result in baseline.items()}}
    if args.answers:
        with open(args.answers, "w", encoding="utf-8") as handle:
            for index, (example, (answer, ended)) in enumerate(zip(examples, answers)):
                row = {"where": example.where, "prompt": example.messages[-1]["content"], "answer": answer,
                       "ended": ended, "reference": example.reference,
                       "scores": {name: result.values[index] for name, result in results.items()}}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    for name, result in results.items():
        print(summary_line(name, result), file=sys.stderr)
    if args.baseline_field:
        for name, result in baseline.items():
            print(summary_line(f"copy {args.baseline_field}: {name}", result), file=sys.stderr)
    print(f"{len(examples)} answers in {seconds:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
