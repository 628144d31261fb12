"""The `edgedistill` command: one console script, a subcommand per public verb, each with an example
in its --help. It only parses arguments and prints; the work is done by the stage and feature modules.

    edgedistill run                                   # the default recipe on the embedded teacher
    edgedistill run recipes/tiny.yaml --out runs/tiny
    edgedistill export --help

Problems with the user's input are printed as one message with the fix, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edgedistill.cli_args import build_parser
from edgedistill.errors import EdgedistillError

def cmd_run(args: argparse.Namespace) -> None:
    from edgedistill.data.prompts import check_data
    from edgedistill.layout import REPORT, REPORT_HTML, REPORT_MD
    from edgedistill.pipeline import Pipeline, launched
    from edgedistill.recipe import default_recipe, load_recipe
    from edgedistill.stages import stages_for

    recipe = load_recipe(args.recipe or default_recipe(), allow_code=args.allow_recipe_code)
    check_data(recipe)
    out = args.out or Path("runs") / recipe.name
    results = Pipeline(stages_for(recipe), recipe, out).run(force=args.force, from_stage=args.from_stage,
                                                            to_stage=args.to_stage, verify=args.verify)
    if launched()[0] > 0:
        return  # another process of a launch: the first one reports
    report = out / REPORT / REPORT_MD
    done = [r for r in results if not r.cached]
    print(f"\n{len(done)} stage(s) ran, {len(results) - len(done)} up to date; "
          f"total {sum(r.seconds for r in done):.1f} s. " + (f"Report: {report} and {report.with_name(REPORT_HTML)}"
                                                              if report.exists() else f"Stage folders: {out}"))


# export flags that only one format takes, and what to use in the other
FORMAT_FLAGS = {"gguf": (("--quant", "--max-size", "--imatrix", "--lora"),
                         "for ONNX, choose the weights with --precision (fp32, fp16, int8, int4)"),
                "onnx": (("--precision", "--onnx-path"), "use --quant for GGUF")}


def cmd_export(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.overwrite:
        raise EdgedistillError(f"{args.out} exists", "choose another --out or pass --overwrite")
    for fmt, (flags, hint) in FORMAT_FLAGS.items():
        given = [flag for flag in flags if getattr(args, flag[2:].replace("-", "_"))]
        if given and fmt != args.format:
            raise EdgedistillError(f"{', '.join(given)} only apply to --format {fmt}", hint)
    if args.format == "onnx":
        from edgedistill.export.onnx import OnnxExportOptions, export_onnx
        from edgedistill.layout import ONNX_MODEL

        export_onnx(args.model, args.out, OnnxExportOptions(
            precision=args.precision or "int4", path=args.onnx_path or "auto", block_size=args.block_size,
            symmetric=not args.asymmetric, accuracy_level=args.accuracy_level,
            lm_head_bits=None if args.lm_head_bits == "float" else int(args.lm_head_bits),
            quantize_embeddings=args.quantize_embeddings, calibration=args.calibration, overwrite=args.overwrite,
            progress=True))
        size = sum(p.stat().st_size for p in args.out.glob(f"{ONNX_MODEL}*"))
        print(f"wrote {args.out}/ ({size / 1e6:.1f} MB of weights), verified against {args.model}")
        return
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
    from edgedistill.evaluate.task import MAX_NEW_TOKENS, build_reference_set, evaluate, format_built, format_eval
    from edgedistill.recipe import load_recipe
    from edgedistill.runtimes import resolve_artifact

    if args.build_references is None:
        given = [flag for flag, value in (("--save", args.save), ("--recipe", args.recipe)) if value is not None]
        if given:
            raise EdgedistillError(f"{', '.join(given)} only apply to --build-references",
                                   "score models with --data, or build a set with --build-references PROMPTS")
        if not args.models:
            raise EdgedistillError("no model to evaluate", "name one or more: edgedistill eval MODEL --data FILE")
        reference = resolve_artifact(args.reference) if args.reference else None
        report = evaluate([resolve_artifact(m) for m in args.models], args.data, reference,
                          max_new_tokens=MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
                          score_records=args.score_records,
                          device=args.device, dtype=args.dtype, allow_code=args.allow_recipe_code)
        print(format_eval(report))
        _write_json(args.json, report.to_dict())
        return
    if args.models:
        raise EdgedistillError("--build-references builds and saves a held-out set; it scores no model",
                               f"score models on it afterwards: edgedistill eval MODEL --data {args.save or 'FILE'}")
    missing = [flag for flag, value in (("--reference", args.reference), ("--save", args.save)) if value is None]
    if missing:
        raise EdgedistillError(f"--build-references needs {' and '.join(missing)}",
                               "--reference: the teacher whose answers become the references; --save: the .jsonl "
                               "to write")
    recipe = load_recipe(args.recipe, allow_code=args.allow_recipe_code) if args.recipe is not None else None
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else (
        recipe.eval.max_new_tokens if recipe is not None else MAX_NEW_TOKENS)
    built = build_reference_set(args.build_references, resolve_artifact(args.reference), args.save, recipe=recipe,
                                max_new_tokens=max_new_tokens, device=args.device, dtype=args.dtype,
                                allow_code=args.allow_recipe_code)
    print(format_built(built))
    _write_json(args.json, built)


def cmd_harness(args: argparse.Namespace) -> None:
    # before datasets is imported, which reads them once: a task that would download fails at once
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    from edgedistill.evaluate.harness import format_harness, run_harness

    tasks = [name for given in args.tasks for name in given.split(",") if name]
    entries = run_harness(args.models, tasks, include_path=args.include_path, limit=args.limit,
                          device=args.device, dtype=args.dtype)
    print(format_harness(entries))
    _write_json(args.json, entries)


def cmd_verify_export(args: argparse.Namespace) -> None:
    from edgedistill.export.verify import read_texts
    from edgedistill.runtimes import artifact_kind, resolve_artifact

    texts = read_texts(args.texts) if args.texts is not None else None
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


def cmd_route(args: argparse.Namespace) -> None:
    from edgedistill.route import format_route, route_command

    out = route_command(args.run, artifact=args.artifact, target=args.target, out=args.json, budget=args.budget)
    print(format_route(json.loads(out.read_text())))
    print(f"wrote {out}")


def cmd_serve(args: argparse.Namespace) -> None:
    from edgedistill.serve.app import ServeSettings
    from edgedistill.serve.plan import Planner, plan_prompt
    from edgedistill.serve.server import serve

    for flag, value in (("--queue", args.queue), ("--max-tokens", args.max_tokens), ("--timeout-s", args.timeout_s)):
        if value <= 0:
            raise EdgedistillError(f"{flag} {value:g} must be positive", f"pass {flag} with a number above 0")
    plan = Planner(plan_prompt(args.plan_prompt), args.plan_max_tokens) if args.plan else None
    serve(args.artifact, host=args.host, port=args.port, teacher=args.teacher, teacher_model=args.teacher_model,
          route=args.route, plan=plan, settings=ServeSettings(max_waiting=args.queue, max_tokens=args.max_tokens,
                                                              timeout_s=args.timeout_s),
          threads=args.threads, device=args.device, dtype=args.dtype)


COMMANDS = {"run": cmd_run, "export": cmd_export, "bench": cmd_bench, "eval": cmd_eval, "harness": cmd_harness,
            "verify-export": cmd_verify_export, "bundle": cmd_bundle, "verify": cmd_verify_bundle,
            "report": cmd_report, "route": cmd_route, "chat": cmd_chat, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    try:
        status = COMMANDS[args.command](args)  # None, or a status of its own (bench --strict: 3 when a budget fails)
    except EdgedistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
