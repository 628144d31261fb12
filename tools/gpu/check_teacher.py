"""Do the teacher stages run on CUDA in bf16, and how much faster are the teacher's logits than on 2 CPU cores? One JSON.

    PYTHONPATH=. python3 tools/gpu/check_teacher.py --json /tmp/teacher_check.json        # on the GPU machine
    .venv/bin/python tools/gpu/check_teacher.py --device cpu --layers 2 --examples 16     # its CPU-safe parts, here

Builds a random-weight teacher of SmolLM2-135M's shape (the default recipe's teacher: 30 layers,
width 576) stored in bf16, with the SmolLM2 tokenizer of tools/gpu/tokenizer, and training rows
shaped as the default recipe's (a sentiment prompt and a short answer, from
recipes/data/sentiment.jsonl). Then, through the stage functions themselves:
- generate: the teacher answers --examples prompts with `compute: auto` (bf16 on CUDA), batched
  with left padding, timed;
- logits: the top-32 cache of those rows with `compute: auto`, timed, and the same rows on the
  CPU in float32 with 2 threads (the development machine's 2 cores; a subset, --cpu-examples)
  in the same run, so the speed-up is measured, not quoted; the issue's target is at least 20x;
- agreement of the CUDA bf16 cache with the CPU float32 one on the shared rows (top-1, top-k overlap).
Without CUDA and --device cuda it writes {"cuda_available": false, "ok": false, ...} and exits 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from check_cuda import emit  # the same JSON report and exit status as the other GPU checks

ROOT = Path(__file__).resolve().parent.parent.parent
TOKENIZER = Path(__file__).resolve().parent / "tokenizer"
TARGET_SPEEDUP = 20.0
SMOLLM2_SHAPE = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                     max_position_embeddings=2048, tie_word_embeddings=True)
PROMPT = ("Read the review and say whether the opinion is positive or negative. Answer with one word: positive or "
          "negative.\n\nReview: {text}")


def build_teacher(out: Path, layers: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgedistill.recipe import RandomModelConfig
    from edgedistill.sources.random_model import build_random_model

    if not (TOKENIZER / "tokenizer.json").is_file():
        sys.exit(f"{TOKENIZER} is missing: make it with tools/gpu/make_tokenizer.py (tools/gpu/prepare.sh does)")
    shutil.rmtree(out, ignore_errors=True)
    build_random_model(RandomModelConfig(num_hidden_layers=layers, **SMOLLM2_SHAPE),
                       AutoTokenizer.from_pretrained(TOKENIZER), out, seed=0)
    # stored in bf16, as the checkpoints people distill from are
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(torch.bfloat16).save_pretrained(out)
    # the logits cache records the teacher's identity from its stage manifest: a stand-in of the files' sizes
    files = {p.name: {"bytes": p.stat().st_size} for p in sorted(out.iterdir()) if p.is_file()}
    (out / "manifest.json").write_text(json.dumps({"stage": "teacher", "files": files}) + "\n")
    return out


def recipe_for(folder: Path, examples: int, device: str, dtype: str):
    from edgedistill.recipe import Recipe

    data = folder / "prompts.jsonl"
    if not data.exists():
        rows = [json.loads(line) for line in (ROOT / "recipes" / "data" / "sentiment.jsonl").read_text().splitlines()]
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Recipe.model_validate({
        "name": "teacher-check", "seed": 0, "base_dir": folder,
        "task": {"labels": ["positive", "negative"], "prompt": PROMPT},
        "data": {"prompts": str(data), "heldout_fraction": 0.1, "limit": examples},
        "generate": {"max_new_tokens": 12, "batch_size": 32},
        "student": {"method": "prune", "keep_layers": 1},
        "distill": {"topk": 32, "max_seq_len": 256},
        "compute": {"device": device, "dtype": dtype}})


def timed_logits(recipe, teacher: Path, generate: Path, out: Path) -> tuple[float, dict]:
    from edgedistill.data.logits import cache_teacher_logits

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    result = cache_teacher_logits(recipe, out, teacher=teacher, generate=generate)
    return time.perf_counter() - started, result


def agreement(gpu: Path, cpu: Path, examples: int) -> dict:
    from edgedistill.data.logits import SoftLabelSet

    a, b = SoftLabelSet.from_cache(gpu), SoftLabelSet.from_cache(cpu)
    top1 = overlap = rows = 0
    for i in range(min(examples, len(a), len(b))):
        ids_a, ids_b = a[i][2], b[i][2]
        rows += len(ids_a)
        top1 += int((ids_a[:, 0] == ids_b[:, 0]).sum())
        overlap += sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ids_a, ids_b)) / ids_a.shape[1]
    return {"rows": rows, "top1_agreement": round(top1 / rows, 4), "topk_overlap": round(overlap / rows, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--examples", type=int, default=512, help="training prompts (the default recipe has 512)")
    parser.add_argument("--cpu-examples", type=int, default=32, help="of those, scored on 2 CPU threads too")
    parser.add_argument("--work", type=Path, default=Path("/tmp/teacher-check"))
    parser.add_argument("--json", type=Path, help="write the JSON here instead of printing it")
    args = parser.parse_args()

    import torch

    from edgedistill.data.generate import generate
    from edgedistill.errors import EdgedistillError

    started = time.perf_counter()
    report: dict = {"device": args.device, "cuda_available": torch.cuda.is_available(),
                    "cuda_device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "shape": {**SMOLLM2_SHAPE, "num_hidden_layers": args.layers},
                    "examples": args.examples, "cpu_examples": args.cpu_examples,
                    "target_logits_speedup_vs_2_cpu_threads": TARGET_SPEEDUP}
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise EdgedistillError("torch sees no CUDA device", "run this on the GPU machine, or pass --device cpu")
        args.work.mkdir(parents=True, exist_ok=True)
        teacher = build_teacher(args.work / "teacher", args.layers)
        dtype = "auto"  # bf16 on CUDA; on the CPU the stored bf16
        recipe = recipe_for(args.work, args.examples, args.device, dtype)
        gen = args.work / "generate"
        shutil.rmtree(gen, ignore_errors=True)
        gen.mkdir()
        began = time.perf_counter()
        result = generate(recipe, gen, teacher=teacher)
        report["generate"] = {"seconds": round(time.perf_counter() - began, 2), "answers": result["answers"]}
        seconds, logits = timed_logits(recipe, teacher, gen, args.work / "logits-device")
        report["logits_device"] = {"seconds": round(seconds, 2), "examples": logits["examples"],
                                   "tokens": logits["tokens"], "examples_per_s": round(logits["examples"] / seconds, 2),
                                   "compute": {"device": args.device, "dtype": dtype}}
        # the same rows, the first cpu_examples of them, as the 2-core development machine computes them
        torch.set_num_threads(2)
        subset = args.work / "generate-subset"
        shutil.rmtree(subset, ignore_errors=True)
        shutil.copytree(gen, subset)
        lines = (gen / "train.jsonl").read_text().splitlines()[: args.cpu_examples]
        (subset / "train.jsonl").write_text("".join(line + "\n" for line in lines))
        cpu_recipe = recipe_for(args.work, args.examples, "cpu", "float32")
        seconds, cpu_logits = timed_logits(cpu_recipe, teacher, subset, args.work / "logits-cpu")
        report["logits_cpu_2_threads_float32"] = {"seconds": round(seconds, 2), "examples": cpu_logits["examples"],
                                                 "examples_per_s": round(cpu_logits["examples"] / seconds, 2)}
        speedup = report["logits_device"]["examples_per_s"] / report["logits_cpu_2_threads_float32"]["examples_per_s"]
        report["logits_speedup"] = round(speedup, 1)
        report["agreement_with_cpu_float32"] = agreement(args.work / "logits-device", args.work / "logits-cpu",
                                                         cpu_logits["examples"])
        report["ok"] = args.device != "cuda" or speedup >= TARGET_SPEEDUP
    except (EdgedistillError, OSError, RuntimeError, ValueError) as exc:
        report.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    return emit(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
