"""The generate stage: the teacher answers the task prompts; its answers become training data.

    edgedistill run recipes/tiny.yaml --out runs/tiny --from generate

Writes `train.jsonl` (chat format: the prompt messages plus the teacher's answer as the assistant
turn, and the gold label) and `heldout.jsonl` (prompt messages, gold label and the label choices;
no teacher answer, so nothing of it can leak into training). Answers are appended to
`answers.partial.jsonl` batch by batch, so a killed run resumes at the first unanswered example.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from edgedistill.data.prompts import load_examples, prompt_messages, split_examples, write_jsonl
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import Recipe
from edgedistill.runtimes.pytorch import TorchChatModel

PARTIAL_ANSWERS = "answers.partial.jsonl"


def _answered(path: Path) -> dict[int, dict]:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                break  # the line a kill cut short; it is answered again
            done[row["id"]] = row
    return done


def generate(recipe: Recipe, out: Path, *, teacher: Path) -> dict:
    train, heldout = split_examples(recipe, load_examples(recipe))
    partial = out / PARTIAL_ANSWERS
    done = _answered(partial)
    # Rewrite without a possibly cut last line before appending to it.
    write_jsonl(partial, [done[k] for k in sorted(done)])
    todo = [ex for ex in train if ex.id not in done]
    if todo:
        chat = TorchChatModel(teacher, trust_remote_code=recipe.teacher.trust_remote_code)
        size = recipe.generate.batch_size
        # Similar lengths in a batch waste less compute on padding.
        todo.sort(key=lambda ex: len(ex.text))
        with open(partial, "a", encoding="utf-8") as sink, \
                tqdm(total=len(train), initial=len(train) - len(todo), desc="generate", unit="ex") as bar:
            for start in range(0, len(todo), size):
                batch = todo[start:start + size]
                answers = chat.generate([prompt_messages(recipe, ex.text) for ex in batch],
                                        recipe.generate.max_new_tokens)
                for ex, (answer, finished) in zip(batch, answers):
                    row = {"id": ex.id, "answer": answer, "finished": finished}
                    done[ex.id] = row
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
                bar.update(len(batch))

    rows, empty = [], 0
    for ex in train:
        answer = done[ex.id]["answer"]
        if not answer:
            empty += 1
            continue
        messages = prompt_messages(recipe, ex.text) + [{"role": "assistant", "content": answer}]
        rows.append({"id": ex.id, "messages": messages, "label": ex.label})
    if not rows:
        raise EdgedistillError(f"the teacher gave an empty answer to all {len(train)} training prompts",
                               "check the teacher with `edgedistill chat` and raise generate.max_new_tokens")
    write_jsonl(out / "train.jsonl", rows)
    write_jsonl(out / "heldout.jsonl", [
        {"id": ex.id, "messages": prompt_messages(recipe, ex.text), "label": ex.label, "choices": recipe.task.labels}
        for ex in heldout])
    partial.unlink()
    truncated = sum(1 for ex in train if not done[ex.id]["finished"])
    return {"train_examples": len(rows), "heldout_examples": len(heldout),
            "dropped_empty": empty, "truncated_answers": truncated}
