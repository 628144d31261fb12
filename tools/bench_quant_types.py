"""Size, quality and llama.cpp speed of every GGUF quantization type on the embedded teacher, in one run.

    .venv/bin/python tools/bench_quant_types.py                 # all types (8-16 minutes on 2 busy cores)
    .venv/bin/python tools/bench_quant_types.py --types F16 Q8_0 Q4_K_M --rounds 1 --gen-tokens 16   # a quick check
    .venv/bin/python tools/bench_quant_types.py --imatrix teacher.imatrix.gguf   # quantize with an importance matrix
    .venv/bin/python tools/bench_quant_types.py --calibration runs/sentiment/generate/train.jsonl   # both, side by side

Reads the teacher as an HF float32 folder (runs/sentiment/teacher, made by `edgedistill run --to
teacher`), writes it as F16 GGUF with edgedistill's writer (which writes F16 only, so the float32
reference is the PyTorch model itself) and makes every other type from that file with llama.cpp's
quantizer, as the export stage does. Per type:
  quality  verify_ggufs against PyTorch fp32 on HELDOUT_TEXTS (written for this benchmark, so no
           model trained on them): perplexity ratio and mean KL(PyTorch || GGUF) per position
  speed    bench_many (each file in its own process, one warm-up, median of --repetitions), repeated
           --rounds times in alternating order, the median of the rounds: prefill and decode tokens/s.
           Rounds of one file that differ by more than MAX_ROUND_SPREAD flag the speeds as disturbed
           by other work: llama.cpp on all cores slows down 10x or more when another process runs.
           Such noise only ever slows a round down, so the fastest round is reported too
Ratios are against figures from the same run: perplexity against PyTorch fp32, speed and size against
F16. The issue's targets (issue 4) are printed as pass/MISSED; the project's own export bounds
(verify.BOUNDS, looser) are reported as `passes_export_bounds`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgedistill.bench.latency import bench_many
from edgedistill.export.gguf import quantize_gguf, write_gguf
from edgedistill.export.gguf.verify import verify_ggufs
from edgedistill.export.verify import MAX_TOKENS_PER_TEXT
from edgedistill.recipe import BenchConfig

TYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
# (what, type, figure, limit, "max" or "min"): the targets
TARGETS = (
    ("Q8_0 perplexity within 1% of PyTorch fp32", "Q8_0", "perplexity_ratio", 1.01, "max"),
    ("Q4_K_M perplexity within 8% of PyTorch fp32", "Q4_K_M", "perplexity_ratio", 1.08, "max"),
    ("Q4_K_M decodes at least 1.5x as fast as F16", "Q4_K_M", "decode_vs_f16", 1.5, "min"),
)
# Other work on the cores only ever slows llama.cpp down (with all cores busy, by 10x or more), so
# rounds of one file that differ by more than this say the machine was not quiet.
MAX_ROUND_SPREAD = 1.3
# Eight paragraphs of plain English prose, each over MAX_TOKENS_PER_TEXT (128) tokens with the
# SmolLM2 tokenizer, so verify scores about 1,000 positions. Written for this benchmark rather than
# quoted: famous public-domain passages are in every training set, and a memorized text has so low a
# perplexity that the ratio measures memorization, not quantization.
HELDOUT_TEXTS = (
    "The bridge over the river had been closed for most of the spring, and the people who lived on the "
    "far bank had grown used to the long walk around by the mill. Every morning a small crowd gathered "
    "at the barrier to watch the workers lower new beams into place with a crane that looked far too "
    "delicate for the job. Children counted the rivets, old men argued about whether the original stone "
    "should have been kept, and the baker sold more bread from his cart at the crossing than he ever had "
    "from his shop. When the bridge finally reopened, several people admitted that they would miss the "
    "crowd, and the baker moved his cart to the market square, hoping that some of them would follow.",
    "Tides are caused mostly by the pull of the moon, although the sun plays a smaller part. Because the "
    "moon's gravity is slightly stronger on the side of the earth that faces it, the oceans there bulge "
    "outward, and a second bulge forms on the opposite side, where the pull is weakest. As the earth "
    "turns, a coastline passes through both bulges, which is why most places see two high tides and two "
    "low tides each day. When the sun and moon line up, their effects add together and the tides are "
    "unusually large; when they pull at right angles, the difference between high and low water is much "
    "smaller. Sailors call these neap tides, and the large ones spring tides, although they have nothing "
    "to do with the season.",
    "My grandmother kept a notebook in which she wrote down the weather every evening, a habit she began "
    "as a young woman and never gave up. The entries are short: the temperature, the direction of the "
    "wind, whether it rained, and sometimes a single remark, such as the first swallows or a frost that "
    "ruined the beans. Reading them now, I am struck less by the weather than by the rhythm of a life "
    "spent paying attention. She noticed when the lilac opened a week early, when the well ran low, and "
    "when a neighbour's chimney stopped smoking for three days, which is how she learned that he had "
    "fallen ill.",
    "Learning a second language as an adult is slow work, and most of the progress happens where no one "
    "can see it. For months a learner may feel that nothing is changing, that every conversation is as "
    "clumsy as the first, and then one day a whole sentence arrives without effort. Teachers often "
    "recommend reading simple books, listening to the radio while cooking, and speaking aloud even when "
    "alone, because the mind needs many small encounters with a word before it becomes familiar. Mistakes "
    "are not a sign of failure; they are evidence that the learner is trying to say something new. "
    "Patience and a little stubbornness take a learner much further than talent.",
    "The library on the corner of the square was built with money raised by the townspeople themselves, "
    "one concert and one bake sale at a time. For the first few years it held more empty shelves than "
    "books, and the librarian, a retired schoolteacher, wrote to publishers asking for any copies they "
    "could spare. Parcels arrived from all over the country, some with letters tucked inside the covers. "
    "Today the building is crowded on winter afternoons, when students come to study in the warmth, and "
    "the original letters are kept in a glass case by the door, where visitors stop to read them. "
    "A few of the people who wrote them have since come to see the library for themselves.",
    "Before the storm arrived, the harbour master walked the length of the quay and checked every "
    "mooring line himself. The fishermen had already doubled their ropes and lashed down whatever could "
    "be blown into the water, but he trusted his own hands more than their assurances. By evening the "
    "wind was strong enough to lift spray over the sea wall, and the small boats knocked against one "
    "another like nervous animals. Nobody slept much that night. In the morning the damage turned out to "
    "be slight: a broken railing, a lost crate of nets, and a dinghy found upside down in the car park. "
    "The harbour master had it carried back to the slipway before breakfast.",
    "Starting a vegetable garden requires less land than most people imagine and more patience than they "
    "expect. A single raised bed, placed where it receives at least six hours of sunlight, can supply "
    "lettuce, beans and tomatoes for a family through much of the summer. The soil matters more than "
    "anything else, so it is worth mixing in compost before planting and adding a layer of straw to keep "
    "the moisture in. Beginners usually plant too much at once and then struggle to keep up with the "
    "watering and weeding, so it is better to start small and expand the garden in the following year. "
    "A notebook of what grew well, and what did not, is the most useful tool of all.",
    "The train was late, as it usually was on Fridays, and the platform filled with commuters who stood "
    "in the careful silence of people pretending not to be annoyed. A woman with a cello case tried to "
    "find a place where it would not be knocked over, while a boy in a school uniform practised a card "
    "trick on his younger sister. When the announcement finally came, it said only that the delay was due "
    "to an earlier problem further down the line. Someone laughed, a few people sighed, and the boy "
    "produced the right card from behind his sister's ear, which she pretended not to find impressive. "
    "The train, when it came, was crowded, and nobody got a seat.",
)


def quantize_all(f16: Path, out_dir: Path, types: list[str], imatrix: Path | None = None) -> dict[str, Path]:
    """Every type of `types` made from the F16 GGUF `f16` into `out_dir`, by type; F16 is `f16` itself.

    `imatrix`, when given, is passed to every quantization (llama.cpp ignores it for F16 and BF16).
    """
    paths = {}
    for qtype in types:
        if qtype == "F16":
            paths[qtype] = f16
            continue
        extra = {"imatrix": imatrix} if imatrix is not None else {}
        paths[qtype] = quantize_gguf(f16, out_dir / f"teacher-{qtype.lower()}.gguf", qtype, overwrite=True, **extra)
    return paths


CALIBRATED = "+imatrix"  # suffix of the rows quantized with --calibration's importance matrix


def quantize_calibrated(teacher: Path, f16: Path, out_dir: Path, types: list[str], calibration: Path) -> dict[str, Path]:
    """`types` again, with an importance matrix of the teacher on `calibration` (imatrix rows)."""
    from transformers import AutoTokenizer

    from edgedistill.data.calibration import calibration_texts
    from edgedistill.export.gguf.imatrix import compute_imatrix

    texts = calibration_texts(calibration, AutoTokenizer.from_pretrained(teacher))
    imatrix = compute_imatrix(teacher, texts, out_dir / "teacher-imatrix.gguf", dataset=calibration.name)
    # F16/BF16 are not quantized, so an importance matrix cannot change them
    weighted = [t for t in types if t not in ("F16", "BF16")]
    return {t + CALIBRATED: quantize_gguf(f16, out_dir / f"teacher-{t.lower()}-imatrix.gguf", t, imatrix=imatrix)
            for t in weighted}


def measure_speed(paths: dict[str, Path], cfg: BenchConfig, rounds: int) -> dict[str, dict]:
    """bench_many over all files `rounds` times, reversing the order each round so that neither end
    of the list always runs on a busier machine; per type and figure the median over the rounds,
    and every round's figures under `rounds`."""
    order = list(paths)
    runs: dict[str, list[dict]] = {qtype: [] for qtype in order}
    for i in range(rounds):
        types = order if i % 2 == 0 else order[::-1]
        for qtype, result in zip(types, bench_many([paths[t] for t in types], cfg)):
            runs[qtype].append(result.to_dict())
    figures = ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "peak_rss_mb")
    return {qtype: {**{f: round(statistics.median(r[f] for r in results), 2) for f in figures},
                    "decode_tokens_per_s_best": max(r["decode_tokens_per_s"] for r in results),
                    "rounds": [{f: r[f] for f in figures} for r in results]}
            for qtype, results in runs.items()}


def combine(paths: dict[str, Path], quality: list[dict], speed: dict[str, dict]) -> list[dict]:
    f16_size = paths["F16"].stat().st_size if "F16" in paths else None
    f16 = speed.get("F16")
    rows = []
    for (qtype, path), verified in zip(paths.items(), quality):
        # an importance matrix changes which values are stored, not the types: same speed as the plain file
        bench = speed[qtype.removesuffix(CALIBRATED)]
        size = path.stat().st_size
        rows.append({
            "type": qtype, "file_type_in_file": verified["file_type"], "file_bytes": size,
            "size_vs_f16": round(size / f16_size, 3) if f16_size else None,
            "perplexity_ratio": round(verified["perplexity_ratio"], 4), "mean_kl": round(verified["mean_kl"], 5),
            "top1_agreement": round(verified["top1_agreement"], 4), "perplexity_gguf": verified["perplexity_gguf"],
            "passes_export_bounds": verified["passed"],
            "prefill_tokens_per_s": bench["prefill_tokens_per_s"], "decode_tokens_per_s": bench["decode_tokens_per_s"],
            "decode_vs_f16": round(bench["decode_tokens_per_s"] / f16["decode_tokens_per_s"], 2) if f16 else None,
            "decode_tokens_per_s_best": bench["decode_tokens_per_s_best"],
            "decode_vs_f16_best": (round(bench["decode_tokens_per_s_best"] / f16["decode_tokens_per_s_best"], 2)
                                   if f16 else None),
            "peak_rss_mb": bench["peak_rss_mb"], "ttft_ms": bench["ttft_ms"], "speed_rounds": bench["rounds"],
        })
    return rows


def disturbed_types(rows: list[dict]) -> list[str]:
    """The types whose decode speed varied across rounds by more than MAX_ROUND_SPREAD."""
    def spread(row: dict) -> float:
        speeds = [r["decode_tokens_per_s"] for r in row["speed_rounds"]]
        return max(speeds) / min(speeds)

    return [row["type"] for row in rows if spread(row) > MAX_ROUND_SPREAD]


def check_targets(rows: list[dict], disturbed: list[str]) -> list[dict]:
    by_type = {row["type"]: row for row in rows}
    checks = []
    for what, qtype, figure, limit, kind in TARGETS:
        value = by_type.get(qtype, {}).get(figure)
        met = None if value is None else value <= limit if kind == "max" else value >= limit
        # quality figures are deterministic; a speed ratio is only as good as both speeds
        reliable = figure != "decode_vs_f16" or not {qtype, "F16"} & set(disturbed)
        checks.append({"target": what, "value": value, "limit": limit, "kind": kind, "met": met,
                       "reliable": reliable})
    return checks


def print_table(report: dict) -> None:
    ref = report["reference"]
    print("| type | file MB | size vs F16 | PPL ratio vs fp32 | mean KL | top-1 | prefill tok/s | decode tok/s "
          "| decode vs F16 | fastest round: decode tok/s, vs F16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| PyTorch fp32 | {ref['file_bytes'] / 1e6:.1f} | | 1 (PPL {ref['perplexity']:.3f}) | 0 | 1 | | | | |")
    for r in report["types"]:
        print(f"| {r['type']} | {r['file_bytes'] / 1e6:.1f} | {r['size_vs_f16']} | {r['perplexity_ratio']:.4f} "
              f"| {r['mean_kl']:.4f} | {r['top1_agreement']:.3f} | {r['prefill_tokens_per_s']:.0f} "
              f"| {r['decode_tokens_per_s']:.1f} | {r['decode_vs_f16']} "
              f"| {r['decode_tokens_per_s_best']:.1f}, {r['decode_vs_f16_best']} |")
    print(f"\nload average (1 min) {report['load_average_1m'][0]:.1f} at start, "
          f"{report['load_average_1m'][1]:.1f} at end on {report['cpu_count']} cores")
    if report["speed_disturbed"]:
        print(f"WARNING: decode speed varied by more than {MAX_ROUND_SPREAD}x across rounds for "
              f"{', '.join(report['speed_disturbed'])}: other work shared the cores, so the speeds and the speed "
              "target are not reliable; rerun when the machine is quiet")
    for check in report["targets"]:
        verdict = {True: "pass", False: "MISSED", None: "not measured"}[check["met"]]
        verdict += "" if check["reliable"] else " (unreliable: the machine was busy)"
        print(f"{check['target']}: {check['value']} ({check['kind']} {check['limit']}) {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("runs/sentiment/teacher"),
                        help="the teacher as an HF float32 folder")
    parser.add_argument("--types", nargs="+", type=str.upper, choices=TYPES, default=list(TYPES))
    calibration = parser.add_mutually_exclusive_group()
    calibration.add_argument("--imatrix", type=Path, help="an importance matrix for the quantizer")
    calibration.add_argument("--calibration", type=Path,
                             help="also quantize every type with an importance matrix of the teacher on this task "
                                  "text (e.g. runs/sentiment/generate/train.jsonl): '+imatrix' rows beside the plain ones")
    parser.add_argument("--rounds", type=int, default=3, help="speed passes over all files")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3, help="timed runs per file and pass")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench"),
                        help="a temporary folder for the GGUF files is made in it and removed")
    parser.add_argument("--keep", action="store_true", help="keep the GGUF files (their folder is printed)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/quant_types.json"))
    args = parser.parse_args()
    if not (args.teacher / "config.json").is_file():
        sys.exit(f"{args.teacher} is not an HF model folder (no config.json): make the teacher folder with "
                 "`.venv/bin/edgedistill run --to teacher` (it writes runs/sentiment/teacher), or pass --teacher")
    if args.imatrix is not None and not args.imatrix.is_file():
        sys.exit(f"--imatrix {args.imatrix}: no such file")

    load_before = os.getloadavg()[0]
    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="quant-types-", dir=args.work))
    try:
        print(f"[bench] writing F16 and quantizing {', '.join(args.types)} in {work}", file=sys.stderr)
        seconds, started = {}, time.perf_counter()
        f16 = write_gguf(args.teacher, work / "teacher-f16.gguf")
        paths = quantize_all(f16, work, args.types, imatrix=args.imatrix)
        calibrated = (quantize_calibrated(args.teacher, f16, work, args.types, args.calibration)
                      if args.calibration else {})
        seconds["write_and_quantize"], started = time.perf_counter() - started, time.perf_counter()
        print("[bench] scoring against PyTorch fp32", file=sys.stderr)
        quality = verify_ggufs([*paths.values(), *calibrated.values()], args.teacher, texts=list(HELDOUT_TEXTS),
                               threads=args.threads, raise_on_failure=False)
        seconds["verify"], started = time.perf_counter() - started, time.perf_counter()
        cfg = BenchConfig(prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                          repetitions=args.repetitions, threads=args.threads)
        rows = combine({**paths, **calibrated}, quality, measure_speed(paths, cfg, args.rounds))
        seconds["speed"] = time.perf_counter() - started
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "teacher": str(args.teacher), "imatrix": str(args.imatrix) if args.imatrix else None,
        "calibration": str(args.calibration) if args.calibration else None,
        # a load above the core count means other work shared the cores: speeds are then low and noisy
        "cpu_count": os.cpu_count(), "load_average_1m": [load_before, os.getloadavg()[0]],
        "reference": {"runtime": "PyTorch fp32", "perplexity": quality[0]["perplexity_torch"],
                      "file_bytes": sum(p.stat().st_size for p in args.teacher.glob("*.safetensors")),
                      "texts": quality[0]["texts"], "positions": quality[0]["positions"],
                      "max_tokens_per_text": MAX_TOKENS_PER_TEXT},
        "bench": {**cfg.model_dump(), "rounds": args.rounds},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "types": rows, "speed_disturbed": disturbed_types(rows),
    }
    report["targets"] = check_targets(rows, report["speed_disturbed"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {args.out}" + (f"; GGUF files kept in {work}" if args.keep else ""))


if __name__ == "__main__":
    main()
