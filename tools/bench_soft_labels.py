"""Training speed and peak RSS of distilling from the logits cache vs running the teacher every step.

    .venv/bin/python tools/bench_soft_labels.py --run runs/sentiment --epochs 2 --out runs/bench/soft_labels.json
    .venv/bin/python tools/bench_soft_labels.py --examples 64 --epochs 2     # a short check on a small CPU

Reads the teacher/, student/ (pruned, untrained) and logits/ folders of a finished `edgedistill run`.
Each mode trains a fresh copy of the student in a process of its own (so the peak RSS is that mode's):
  offline  the teacher's top-k comes from the cache in logits/; the teacher is never loaded.
  online   the teacher is loaded and, every batch, its top-k log-probs are computed at the batch's
           loss positions (as the logits stage does: log_softmax at T=1, then topk(recipe topk)).
Both use the same examples in the same seeded order, the recipe's batch size, AdamW at its learning
rate (no schedule) and the same distill_loss. Per epoch: seconds and trained tokens/s (attention-mask
tokens). The issue's targets: the cache is at least 2x faster per epoch after the first (the median
of those epochs) and holds no teacher weights in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("offline", "online")
SPEEDUP_TARGET = 2.0


def _parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train_mode(mode: str, run: Path, recipe_path: Path, epochs: int, examples: int | None) -> dict:
    # Imported in the worker only: the parent just starts workers and stays small.
    import torch

    from edgedistill.bench.worker import peak_rss_kb
    from edgedistill.distill.losses import distill_loss
    from edgedistill.distill.train import collate, load_soft_labels
    from edgedistill.recipe import load_recipe
    from edgedistill.runtimes.pytorch import load_model

    recipe = load_recipe(recipe_path)
    cfg = recipe.distill
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(recipe.seed)
    data = load_soft_labels(run / "logits", run / "student")
    student = load_model(run / "student")
    student.config.use_cache = False
    student.train()
    pad_id = student.config.pad_token_id if student.config.pad_token_id is not None else 0
    teacher = load_model(run / "teacher") if mode == "online" else None
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    count = len(data) if examples is None else min(examples, len(data))

    history = []
    for epoch in range(epochs):
        order = list(range(count))
        random.Random(recipe.seed * 1000 + epoch).shuffle(order)
        tokens, loss_sum, steps, teacher_s = 0, 0.0, 0, 0.0
        started = time.perf_counter()
        for start in range(0, count, cfg.batch_size):
            batch = collate([data[i] for i in order[start:start + cfg.batch_size]], pad_id, cfg.kl_positions)
            topk_ids, topk_logprobs = batch["topk_ids"], batch["topk_logprobs"]
            if teacher is not None:
                teacher_started = time.perf_counter()
                with torch.inference_mode():
                    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    topk_logprobs, topk_ids = logits[batch["row_mask"]].float().log_softmax(-1).topk(cfg.topk, dim=-1)
                # Inference tensors cannot be saved for the student's backward: plain copies (N x k, cheap).
                topk_logprobs, topk_ids = topk_logprobs.clone(), topk_ids.clone()
                teacher_s += time.perf_counter() - teacher_started
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            losses = distill_loss(logits[batch["row_mask"]], batch["is_answer"], batch["targets"], topk_logprobs,
                                  topk_ids, kl_weight=cfg.kl_weight, temperature=cfg.temperature,
                                  divergence=cfg.divergence, jsd_beta=cfg.jsd_beta)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            loss_sum += losses["loss"].item()
            steps += 1
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "seconds": round(seconds, 3), "tokens": tokens,
                        "tokens_per_s": round(tokens / seconds, 1), "teacher_forward_s": round(teacher_s, 3),
                        "mean_loss": round(loss_sum / steps, 4)})
    return {"mode": mode, "examples": count, "batch_size": cfg.batch_size, "topk": cfg.topk,
            "kl_positions": cfg.kl_positions, "epochs": history,
            "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
            "student_parameters": _parameter_count(student),
            "teacher_parameters_in_memory": 0 if teacher is None else _parameter_count(teacher),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def _later_epochs_s(result: dict) -> float | None:
    later = [e["seconds"] for e in result["epochs"][1:]]
    return statistics.median(later) if later else None


def compare(results: dict[str, dict]) -> dict:
    if set(results) != set(MODES):
        return {}
    offline, online = results["offline"], results["online"]
    offline_s, online_s = _later_epochs_s(offline), _later_epochs_s(online)
    speedup = round(online_s / offline_s, 2) if offline_s and online_s else None
    return {"offline_speedup_after_first_epoch": speedup,
            "peak_rss_ratio_offline_over_online": round(offline["peak_rss_mb"] / online["peak_rss_mb"], 3),
            "target_met": {"offline_2x_faster_after_first_epoch": speedup is not None and speedup >= SPEEDUP_TARGET,
                           "offline_holds_no_teacher_weights": offline["teacher_parameters_in_memory"] == 0}}


def print_table(results: dict[str, dict]) -> None:
    modes = list(results)
    rows = [(f"epoch {e['epoch']} s | tok/s", [f"{r['epochs'][i]['seconds']:.1f} | {r['epochs'][i]['tokens_per_s']:.0f}"
                                               for r in results.values()])
            for i, e in enumerate(next(iter(results.values()))["epochs"])]
    rows += [(key, [str(r[key]) for r in results.values()])
             for key in ("peak_rss_mb", "teacher_parameters_in_memory", "student_parameters")]
    print(f"{'':30}" + "".join(f"{m:>20}" for m in modes))
    for name, cells in rows:
        print(f"{name:30}" + "".join(f"{c:>20}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/sentiment"))
    parser.add_argument("--recipe", type=Path, default=Path("recipes/default.yaml"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--examples", type=int, help="train on the first N cached examples only")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/soft_labels.json"))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(train_mode(args.worker, args.run, args.recipe, args.epochs, args.examples)))
        return

    missing = [name for name in ("teacher", "student", "logits") if not (args.run / name / "manifest.json").exists()]
    if missing:
        sys.exit(f"{args.run} lacks the finished stage folders {', '.join(missing)}: run `.venv/bin/edgedistill run "
                 f"{args.recipe} --out {args.run}` first (the stages before distill make them)")
    results = {}
    for mode in args.modes:
        print(f"[bench] {mode} ...", file=sys.stderr)
        command = [sys.executable, __file__, "--worker", mode, "--run", str(args.run), "--recipe", str(args.recipe),
                   "--epochs", str(args.epochs)] + (["--examples", str(args.examples)] if args.examples else [])
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            sys.exit(f"[bench] the {mode} worker failed with exit status {done.returncode} (its error is above)")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    report = {"run": str(args.run), "recipe": str(args.recipe), "results": results, **compare(results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    if "target_met" in report:
        print(f"offline speedup after the first epoch: {report['offline_speedup_after_first_epoch']}x, "
              f"peak RSS offline/online: {report['peak_rss_ratio_offline_over_online']}, "
              f"targets met: {report['target_met']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
