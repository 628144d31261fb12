"""The `edgedistill` command: one console script, a subcommand per public verb.

    edgedistill run                                   # the default recipe on the embedded teacher
    edgedistill run recipes/tiny.yaml --out runs/tiny
    edgedistill export runs/tiny/distill --format gguf --quant q4_k_m --out model.gguf
    edgedistill bench model.gguf --json bench.json
    edgedistill eval model.gguf --data runs/tiny/generate/heldout.jsonl --reference runs/tiny/teacher
    edgedistill verify-export runs/tiny/export/student-q4_k_m.gguf --reference runs/tiny/distill
    edgedistill chat model.gguf "What is the capital of France?"

Problems with the user's input are printed as one message with the fix, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgedistill.errors import EdgedistillError

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "default.yaml"


def _default_recipe() -> Path:
    for candidate in (Path("recipes/default.yaml"), DEFAULT_RECIPE):
        if candidate.is_file():
            return candidate
    raise EdgedistillError("no recipe given and recipes/default.yaml was not found",
                           "run from the edgedistill checkout or pass a recipe: edgedistill run RECIPE.yaml")


def cmd_run(args: argparse.Namespace) -> None:
    from edgedistill.layout import REPORT, REPORT_HTML, REPORT_MD
    from edgedistill.pipeline import Pipeline, launched
    from edgedistill.recipe import load_recipe
    from edgedistill.stages import stages_for

    recipe = load_recipe(args.recipe or _default_recipe())
    out = args.out or Path("runs") / recipe.name
    results = Pipeline(stages_for(recipe), recipe, out).run(force=args.force, from_stage=args.from_stage,
                                                            to_stage=args.to_stage)
    if launched()[0] > 0:
        return  # another process of a launch: the first one reports
    report = out / REPORT / REPORT_MD
    done = [r for r in results if not r.cached]
    print(f"\n{len(done)} stage(s) ran, {len(results) - len(done)} up to date; "
          f"total {sum(r.seconds for r in done):.1f} s. " + (f"Report: {report} and {report.with_name(REPORT_HTML)}"
                                                              if report.exists() else f"Stage folders: {out}"))


def cmd_export(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.overwrite:
        raise EdgedistillError(f"{args.out} exists", "choose another --out or pass --overwrite")
    if args.format == "onnx":
        from edgedistill.export.onnx import OnnxExportOptions, export_onnx
        from edgedistill.layout import ONNX_MODEL

        gguf_only = [flag for flag, value in (("--quant", args.quant), ("--max-size", args.max_size),
                     ("--imatrix", args.imatrix), ("--lora", args.lora)) if value]
        if gguf_only:
            raise EdgedistillError(f"{', '.join(gguf_only)} only apply to --format gguf",
                                   "for ONNX, choose the weights with --precision (fp32, fp16, int8, int4)")
        export_onnx(args.model, args.out, OnnxExportOptions(
            precision=args.precision or "int4", path=args.onnx_path or "auto", block_size=args.block_size,
            symmetric=not args.asymmetric, accuracy_level=args.accuracy_level,
            lm_head_bits=None if args.lm_head_bits == "float" else int(args.lm_head_bits),
            quantize_embeddings=args.quantize_embeddings, calibration=args.calibration, overwrite=args.overwrite,
            progress=True))
        size = sum(p.stat().st_size for p in args.out.glob(f"{ONNX_MODEL}*"))
        print(f"wrote {args.out}/ ({size / 1e6:.1f} MB of weights), verified against {args.model}")
        return
    if args.precision or args.onnx_path:
        raise EdgedistillError("--precision and --onnx-path only apply to --format onnx", "use --quant for GGUF")
    from edgedistill.export.gguf import GgufExportOptions, export_gguf
    from edgedistill.export.gguf.quantize import format_size

    done = export_gguf(args.model, args.out, GgufExportOptions(
        quant=args.quant, max_size=args.max_size, imatrix=args.imatrix, calibration=args.calibration, lora=args.lora,
        overwrite=args.overwrite, progress=True))
    for tried, size_bytes in done.tried_bytes.items():
        print(f"{tried}: {format_size(size_bytes)}, over {args.max_size}" if tried != done.qtype else
              f"chose {tried}: {format_size(size_bytes)} ({size_bytes} bytes), within {args.max_size}")
    print(f"wrote {args.out} ({done.size_bytes / 1e6:.1f} MB)"
          + (f", a LoRA for the GGUF of {args.model}" if args.lora is not None else ""))


def _write_json(path: Path | None, value) -> None:
    if path is not None:
        path.write_text(json.dumps(value, indent=2) + "\n")
        print(f"wrote {path}")


def cmd_bench(args: argparse.Namespace) -> int:
    from edgedistill.bench.latency import bench_many, check_rows, failed_rows, format_bench_table, read_eval_rows
    from edgedistill.recipe import BenchConfig
    from edgedistill.runtimes import resolve_artifact
    from edgedistill.targets import load_target

    cfg = BenchConfig(prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                      repetitions=args.repetitions, threads=args.threads)
    # before the measurement, so that a misspelt profile or a missing eval file fails at once
    target = load_target(args.target) if args.target else None
    if args.eval is not None and target is None:
        raise EdgedistillError("--eval only feeds the quality budget of a --target", "add --target NAME")
    evals = read_eval_rows(args.eval) if args.eval is not None else {}
    rows = bench_many([resolve_artifact(m) for m in args.models], cfg, device=args.device, dtype=args.dtype)
    print(format_bench_table(rows))
    if target is not None:
        print("\n" + check_rows(target, rows, evals))
    _write_json(args.json, [row.to_dict() for row in rows])
    return 3 if failed_rows(rows) and args.strict else 0


def cmd_eval(args: argparse.Namespace) -> None:
    from edgedistill.evaluate.task import evaluate, format_eval
    from edgedistill.runtimes import resolve_artifact

    reference = resolve_artifact(args.reference) if args.reference else None
    report = evaluate([resolve_artifact(m) for m in args.models], args.data, reference,
                      max_new_tokens=args.max_new_tokens, score_records=args.score_records,
                      device=args.device, dtype=args.dtype)
    print(format_eval(report))
    _write_json(args.json, report.to_dict())


def cmd_verify_export(args: argparse.Namespace) -> None:
    from edgedistill.runtimes import artifact_kind, resolve_artifact

    texts = None
    if args.texts is not None:
        if not args.texts.is_file():
            raise EdgedistillError(f"{args.texts} does not exist", "pass a text file with one text per line")
        texts = [line for line in args.texts.read_text(encoding="utf-8").splitlines() if line.strip()]
    artifact = resolve_artifact(args.gguf)
    if artifact_kind(artifact) == "onnx":
        if args.lora is not None:
            raise EdgedistillError("--lora applies a GGUF LoRA in llama.cpp", "verify an ONNX export without --lora")
        from edgedistill.export.onnx import verify as checks

        result = checks.verify_onnx(artifact, args.reference, texts=texts, threads=args.threads, raise_on_failure=False)
    else:
        from edgedistill.export.gguf import verify as checks

        result = checks.verify_gguf(artifact, args.reference, texts=texts, threads=args.threads,
                                    raise_on_failure=False, lora=args.lora)
    print(checks.format_verification([result]))
    _write_json(args.json, result)
    checks.raise_if_failed([result])


def cmd_bundle(args: argparse.Namespace) -> None:
    from edgedistill.bundle import make_bundle

    result = make_bundle(args.run, args.out, artifacts=args.artifacts, overwrite=args.overwrite)
    print(f"wrote {result['file']}: {len(result['files'])} files, {result['bytes'] / 1e6:.1f} MB "
          f"({', '.join(result['artifacts'])})")


def cmd_verify_bundle(args: argparse.Namespace) -> None:
    from edgedistill.bundle import verify_bundle

    summary = verify_bundle(args.file, extract_to=args.extract)
    print(f"{summary['file']}: OK, {summary['files']} files match manifest.json (run {summary['run']})"
          + (f"; extracted to {summary['extracted_to']}" if summary["extracted_to"] else ""))


def cmd_report(args: argparse.Namespace) -> None:
    from edgedistill.report.data import load_run
    from edgedistill.report.stage import write_report

    data = load_run(args.run)
    for path in write_report(data, args.out or args.run):
        print(f"wrote {path}")


def cmd_chat(args: argparse.Namespace) -> None:
    from edgedistill.runtimes import open_chat_model

    model = open_chat_model(args.model)
    print(model.generate([[{"role": "user", "content": args.prompt}]], args.max_new_tokens)[0][0])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgedistill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=f"{help_text}\n\nexample:\n  {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    run = add("run", "distill, export, benchmark and evaluate as a recipe says",
              "edgedistill run recipes/tiny.yaml --out runs/tiny")
    run.add_argument("recipe", nargs="?", type=Path, help="YAML recipe (default: recipes/default.yaml)")
    run.add_argument("--out", type=Path, help="run folder (default: runs/<recipe name>)")
    run.add_argument("--force", action="store_true", help="re-run every stage")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run this stage and all after it")
    run.add_argument("--to", dest="to_stage", metavar="STAGE", help="stop after this stage")
    run.set_defaults(fn=cmd_run)

    export = add("export", "export a model to GGUF (quantized by llama.cpp) or ONNX (for ONNX Runtime)",
                 "edgedistill export runs/tiny/distill --format gguf --quant q4_k_m --out model.gguf\n"
                 "  edgedistill export runs/tiny/distill --format gguf --max-size 60MB --out model.gguf\n"
                 "  edgedistill export runs/tiny/distill --quant q4_k_m --calibration runs/tiny/generate/train.jsonl "
                 "--out model.gguf\n"
                 "  edgedistill export runs/tiny-lora/distill --lora runs/tiny-lora/lora --out task-lora.gguf\n"
                 "  edgedistill export runs/tiny/distill --format onnx --precision int4 "
                 "--calibration runs/tiny/generate/train.jsonl --out student-int4")
    export.add_argument("model", help="built-in name, HF folder, GGUF file or stage folder")
    export.add_argument("--format", default="gguf", choices=["gguf", "onnx"],
                        help="gguf: one file for llama.cpp; onnx: a folder for ONNX Runtime (GenAI)")
    choice = export.add_mutually_exclusive_group()
    choice.add_argument("--quant", help="f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m or q4_0 (default: q4_k_m)")
    choice.add_argument("--max-size", metavar="SIZE",
                        help="instead of --quant: the most precise of f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0 whose "
                             "file is at most SIZE (60MB, 1.5GB, 512MiB; KB/MB/GB are powers of 1000, "
                             "KiB/MiB/GiB of 1024)")
    calibration = export.add_mutually_exclusive_group()
    calibration.add_argument("--calibration", type=Path, metavar="FILE",
                             help="quantize with an importance matrix computed on this task text: a run's "
                                  "generate/train.jsonl (chat rows), a .jsonl of {\"text\": ...} rows or a .txt file; "
                                  "for ONNX int4, round each block to the least importance-weighted error")
    calibration.add_argument("--imatrix", type=Path, metavar="FILE",
                             help="quantize with this importance matrix (GGUF, from edgedistill or llama-imatrix)")
    export.add_argument("--lora", type=Path, metavar="ADAPTER",
                        help="write this PEFT adapter (a run's lora stage) as a GGUF LoRA for MODEL, its base, "
                             "instead of the model")
    onnx = export.add_argument_group("ONNX (--format onnx)")
    onnx.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4"], help="weights (default: int4)")
    onnx.add_argument("--onnx-path", choices=["auto", "builder", "optimum"],
                      help="onnxruntime-genai's model builder, optimum's exporter, or auto (the builder when it "
                           "supports the architecture; the default)")
    onnx.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128, 256],
                      help="int4/int8: weights per quantization block (default: 32)")
    onnx.add_argument("--asymmetric", action="store_true", help="int4/int8: blocks with a zero point")
    onnx.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                      help="MatMulNBits accuracy level (default: 4 on CPU, int8 activations); verification "
                           "catches a level that flips the model's argmax")
    onnx.add_argument("--lm-head-bits", choices=["8", "4", "float"], default="8",
                      help="bits of the output projection (default: 8)")
    onnx.add_argument("--quantize-embeddings", action=argparse.BooleanOptionalAction, default=None,
                      help="quantize the embedding table (default: shared with a tied quantized lm_head)")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(fn=cmd_export)

    bench = add("bench", "time to first token, prefill and decode tokens/s against the memory-bandwidth bound, "
                "peak memory, in llama.cpp, ONNX Runtime or PyTorch",
                "edgedistill bench model.gguf --json bench.json\n  edgedistill bench model.gguf --target phone-8gb --eval eval.json --strict"
                "\n  edgedistill bench runs/tiny/distill --device cuda --dtype bf16")
    bench.add_argument("models", nargs="+", help="GGUF files, ONNX export folders, HF folders or built-in names")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="where HF folders run (GGUF and ONNX always run on the CPU)")
    bench.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="HF folders' weights")
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--gen-tokens", type=int, default=64)
    bench.add_argument("--repetitions", type=int, default=3)
    bench.add_argument("--threads", type=int)
    bench.add_argument("--json", type=Path, help="write the results here")
    bench.add_argument("--target", metavar="PROFILE",
                       help="check the results against a device profile: laptop-cpu, raspberry-pi-5, phone-8gb, "
                            "consumer-gpu (recipes/targets/) or a YAML file")
    bench.add_argument("--eval", type=Path, metavar="EVAL_JSON",
                       help="eval.json of `edgedistill eval --json`, for the profile's quality budget")
    bench.add_argument("--strict", action="store_true", help="exit with status 3 when a budget fails")
    bench.set_defaults(fn=cmd_bench)

    evaluate = add("eval", "task score on held-out prompts and its share of a reference's; perplexity, KL to the "
                   "reference and top-1 agreement on the reference's answers",
                   "edgedistill eval model.gguf --data runs/tiny/generate/heldout.jsonl --reference runs/tiny/teacher")
    evaluate.add_argument("models", nargs="+", help="GGUF files, ONNX export folders, HF folders or built-in names")
    evaluate.add_argument("--data", type=Path, required=True, help="heldout.jsonl of a run's generate stage")
    evaluate.add_argument("--reference", help="the teacher (HF folder, GGUF or built-in name) to compare with")
    evaluate.add_argument("--max-new-tokens", type=int, default=16)
    evaluate.add_argument("--score-records", type=int, default=64, metavar="N",
                          help="score the reference's answers to the first N held-out records in every model "
                               "(perplexity, KL, top-1; needs --reference; 0: task score only)")
    evaluate.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                          help="where HF folders (the reference too) run in PyTorch; GGUF and ONNX run on the CPU")
    evaluate.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                          help="the precision HF folders run in (default: fp32)")
    evaluate.add_argument("--json", type=Path, help="write the results here")
    evaluate.set_defaults(fn=cmd_eval)

    verify = add("verify-export", "compare a GGUF (llama.cpp) or ONNX export (ONNX Runtime) with its HF model in "
                 "PyTorch, within per-type bounds",
                 "edgedistill verify-export runs/tiny/export/student-q4_k_m.gguf --reference runs/tiny/distill")
    verify.add_argument("gguf", metavar="MODEL", help="GGUF file, ONNX export folder or built-in name")
    verify.add_argument("--reference", type=Path, required=True, help="the HF folder the GGUF was exported from")
    verify.add_argument("--texts", type=Path, help="score these texts (one per line) instead of the built-in ones")
    verify.add_argument("--lora", type=Path, metavar="ADAPTER.gguf",
                        help="apply this GGUF LoRA to the file in llama.cpp; --reference is then the merged model")
    verify.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    verify.add_argument("--json", type=Path, help="write the results here")
    verify.set_defaults(fn=cmd_verify_export)

    bundle = add("bundle", "pack a finished run into a deployable .tar.gz: artifacts, tokenizer, chat template, "
                 "model card, Ollama Modelfile and a sha256 manifest",
                 "edgedistill bundle runs/sentiment --out sentiment-student.tar.gz")
    bundle.add_argument("run", type=Path, help="run folder written by `edgedistill run`")
    bundle.add_argument("--out", type=Path, required=True, help="the .tar.gz to write")
    bundle.add_argument("--artifact", dest="artifacts", action="append", metavar="NAME",
                        help="a GGUF in export/ or an ONNX folder in export_onnx/ (repeatable; default: the "
                             "smallest verified GGUF and every ONNX folder)")
    bundle.add_argument("--overwrite", action="store_true")
    bundle.set_defaults(fn=cmd_bundle)

    verify_bundle = add("verify", "check a bundle (not a model: see verify-export): every path, size and sha256, "
                        "then optionally extract it safely",
                        "edgedistill verify sentiment-student.tar.gz --extract deploy/")
    verify_bundle.add_argument("file", type=Path, help="a .tar.gz written by `edgedistill bundle`")
    verify_bundle.add_argument("--extract", type=Path, metavar="DIR", help="extract to DIR/<name>/ after the checks")
    verify_bundle.set_defaults(fn=cmd_verify_bundle)

    report = add("report", "render report.md and report.html (tables, plots, sources with sha256) again from a "
                 "finished run's JSON files, without re-running anything",
                 "edgedistill report runs/sentiment && chromium runs/sentiment/report.html")
    report.add_argument("run", type=Path, help="run folder written by `edgedistill run`")
    report.add_argument("--out", type=Path, metavar="DIR", help="write the two files here (default: RUN)")
    report.set_defaults(fn=cmd_report)

    chat = add("chat", "one greedy chat answer from a GGUF, an ONNX export or an HF folder",
               'edgedistill chat model.gguf "What is the capital of France?"')
    chat.add_argument("model", help="GGUF file, HF folder or built-in name")
    chat.add_argument("prompt")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.set_defaults(fn=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.fn(args)  # None, or a status of its own (bench --strict: 3 when a budget fails)
    except EdgedistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
