"""Peak memory of the teacher stages on a teacher of about 1B parameters stored in bfloat16.

    nice -n 10 .venv/bin/python tools/bench_teacher_memory.py --out runs/bench/teacher_memory.json
    nice -n 10 .venv/bin/python tools/bench_teacher_memory.py --folder /tmp/teacher-1b --keep   # build once, reuse

Builds (once; kept with --keep) a random Llama-shaped model in `--folder` (default: a temporary
folder): hidden 2048, 16 blocks, MLP 5632, 32 heads in 8 KV groups, untied output matrix, the
embedded teacher's SmolLM2 tokenizer (49,152 tokens, rebuilt offline from its GGUF): 0.92B
parameters, a 1.85 GB bf16 model.safetensors, written tensor by tensor. Then each measurement runs
in a fresh process of its own, so its peak resident memory (VmHWM) is that stage's alone:
  teacher  the teacher stage (edgedistill.sources.materialize through the pipeline) on that folder;
  logits   the logits stage (edgedistill.data.logits.cache_teacher_logits) on a few training
           examples, reading the teacher stage's folder, with the recipe's default compute: section.
The JSON gives, per stage, the peak RSS, the RSS right after the imports (python, torch,
transformers: what any stage costs before it reads a byte of the model), the peaks of RssAnon (the
process's own memory) and RssFile (mapped file pages: weights read through mmap, which the kernel
can drop and read again), the ratios to the weights file's size, the least a stage that touches
every weight can peak at (imports plus the file), and the issue's target (peak at most 1.3x the
file) met or not; also the machine, the versions, the load average and the share of the CPUs other
processes kept busy just before each measurement (memory is what this measures; on a shared
machine the seconds are only a note). `--layers 32` builds a 1.6B model, to see the ratio fall as
the fixed cost of the imports weighs less.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.3
SHAPE = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False)
TOKENIZER_SOURCE = "smollm2-135m-instruct"
WEIGHTS = "model.safetensors"
INIT_STD = 0.02
STAGES = ("teacher", "logits")
EXAMPLES = 8
PROMPTS = ["Is this review positive or negative? The battery lasts two days and the screen is sharp.",
           "Is this review positive or negative? It broke after a week and support never answered.",
           "Is this review positive or negative? Good value, though the case feels cheap.",
           "Is this review positive or negative? I would buy it again without a second thought."]


def write_random_safetensors(model_config, out: Path, seed: int = 0) -> int:
    """model.safetensors of random bf16 weights for `model_config`, one tensor in memory at a time
    (safetensors' own writer wants every tensor at once). Returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(out, "wb") as sink:
        sink.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(shape, generator=generator) * INIT_STD).to(torch.bfloat16)
            sink.write(tensor.view(torch.int16).numpy().tobytes())
    return sum(torch.Size(shape).numel() for shape in shapes.values())


def build_teacher(folder: Path, layers: int) -> dict:
    """The random bf16 teacher folder (config, weights, tokenizer) with `layers` blocks, unless
    `folder` already holds it (whatever its size: built.json says)."""
    import torch
    from transformers import LlamaConfig

    from edgedistill.sources import tokenizer_source

    done = folder / "built.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_source(TOKENIZER_SOURCE)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         dtype=torch.bfloat16, **{**SHAPE, "num_hidden_layers": layers})
    config.save_pretrained(folder)
    started = time.perf_counter()
    parameters = write_random_safetensors(config, folder / WEIGHTS)
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    built = {"parameters": parameters, "file_bytes": (folder / WEIGHTS).stat().st_size, "dtype": "bfloat16",
             "shape": {**SHAPE, "num_hidden_layers": layers, "vocab_size": len(tokenizer)}, "build_seconds": round(time.perf_counter() - started, 1)}
    done.write_text(json.dumps(built, indent=2) + "\n")
    return built


def write_recipe(work: Path, teacher: Path) -> Path:
    """A recipe whose teacher is the random folder, with a few prompts and their training rows."""
    rows = [{"text": PROMPTS[i % len(PROMPTS)], "label": "positive" if i % 2 == 0 else "negative"}
            for i in range(2 * EXAMPLES)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    generate = work / "generate"
    generate.mkdir(exist_ok=True)
    train = [{"id": i, "sample": 0, "label": row["label"],
              "messages": [{"role": "user", "content": row["text"]},
                           {"role": "assistant", "content": f"The review is {row['label']}."}]}
             for i, row in enumerate(rows[:EXAMPLES])]
    (generate / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train))
    recipe = work / "recipe.yaml"
    recipe.write_text(f"""name: teacher-memory
teacher: {{source: {json.dumps(str(teacher))}}}
task: {{labels: [positive, negative], prompt: "{{text}}"}}
data: {{prompts: prompts.jsonl}}
student: {{method: prune, keep_layers: 1}}
""")
    return recipe


class RssSampler:
    """The peaks of RssAnon (the process's own memory) and RssFile (mapped file pages, a model file
    read through mmap) from /proc/self/status, sampled every 20 ms: where the memory went."""

    def __init__(self):
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            for key, kb in _status_kb(tuple(self.peaks)).items():
                self.peaks[key] = max(self.peaks[key], kb)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _status_kb(keys: tuple[str, ...]) -> dict[str, int]:
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in keys:
                found[name] = int(value.split()[0])
    return found


def child(stage: str, work: Path) -> dict:
    """One stage in this (fresh) process; its peak and after-import RSS in bytes."""
    from edgedistill.bench.worker import peak_rss_kb
    from edgedistill.data.logits import cache_teacher_logits
    from edgedistill.pipeline import Pipeline
    from edgedistill.recipe import load_recipe
    from edgedistill.stages import stages_for

    recipe = load_recipe(work / "recipe.yaml")
    stages = stages_for(recipe)
    run = work / "run"
    baseline_kb = _status_kb(("VmRSS",))["VmRSS"]
    started = time.perf_counter()
    with RssSampler() as sampler:
        if stage == "teacher":
            if (run / "teacher").exists():
                shutil.rmtree(run / "teacher")
            # the stage alone, without its export check (which reads only config.json)
            Pipeline([dataclasses.replace(stages[0], check=None)], recipe, run, log=lambda line: None).run()
        else:
            out = work / "logits"
            if out.exists():
                shutil.rmtree(out)
            out.mkdir()
            logits = next(s for s in stages if s.name == "logits")
            cache_teacher_logits(Pipeline(stages, recipe, run).view(logits), out, teacher=run / "teacher",
                                 generate=work / "generate")
    return {"peak_rss_bytes": peak_rss_kb() * 1024, "after_imports_rss_bytes": baseline_kb * 1024,
            "peak_rss_anon_bytes": sampler.peaks["RssAnon"] * 1024,
            "peak_rss_file_bytes": sampler.peaks["RssFile"] * 1024,
            "seconds": round(time.perf_counter() - started, 1)}


def cpu_busy_share(seconds: float = 2.0) -> float:
    """The share of all cores' time spent busy over `seconds` while this benchmark waits: the other
    processes' load (the load average also remembers this benchmark's previous minute)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return round((busy1 - busy0) / max(total1 - total0, 1), 3)


def measure(stage: str, work: Path, file_bytes: int) -> dict:
    others_busy_share = cpu_busy_share()
    load_before = os.getloadavg()
    done = subprocess.run([sys.executable, __file__, "--child", stage, "--work", str(work)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {stage} stage failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peak, base = result["peak_rss_bytes"], result["after_imports_rss_bytes"]
    return {**result, "peak_over_file": round(peak / file_bytes, 3),
            "peak_above_imports_over_file": round((peak - base) / file_bytes, 3),
            # the least any stage can peak at: the imports plus one copy of the weights
            "imports_plus_file_over_file": round((base + file_bytes) / file_bytes, 3),
            "met": peak <= TARGET_RATIO * file_bytes, "other_processes_cpu_share_before": others_busy_share,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def machine() -> dict:
    from importlib.metadata import version

    flags = set()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    with open("/proc/meminfo") as meminfo:
        total_kb = int(meminfo.readline().split()[1])
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "memory_bytes": total_kb * 1024,
            "native_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}), "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "transformers", "safetensors")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="where the random teacher is built (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep --folder's model for the next run")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"],
                        help="blocks of the model built (16: 0.92B parameters; each adds 45M)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        print(json.dumps(child(args.child, args.work)))
        return
    scratch = Path(tempfile.mkdtemp(prefix="bench-teacher-memory-"))
    folder = args.folder or scratch / "teacher-1b"
    built_here = not (folder / "built.json").is_file()
    try:
        built = build_teacher(folder, args.layers)
        work = scratch / "work"
        work.mkdir()
        write_recipe(work, folder.resolve())
        results = {stage: measure(stage, work, built["file_bytes"]) for stage in args.stages}
        report = {"teacher": built, "target_peak_over_file": TARGET_RATIO,
                  "met": all(r["met"] for r in results.values()), "stages": results, "machine": machine(),
                  # over a quarter of the cores busy while the benchmark waited: its seconds are not a figure
                  "others_busy": any(r["other_processes_cpu_share_before"] > 0.25 for r in results.values())}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if args.folder is not None and built_here and not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
