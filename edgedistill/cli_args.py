"""The arguments of every `edgedistill` subcommand, each with its help and an example.

    edgedistill --help
    edgedistill export --help

edgedistill.cli maps each subcommand to the function that runs it; this module only declares.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_parser(description: str) -> argparse.ArgumentParser:
    """Every subcommand with its arguments; `args.command` names the one given."""
    parser = argparse.ArgumentParser(prog="edgedistill", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        # help is %-formatted by argparse ("95% intervals" broke `edgedistill --help`)
        return sub.add_parser(name, help=help_text.replace("%", "%%"), description=f"{help_text}\n\nexample:\n  {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def add_models(command: argparse.ArgumentParser, device_help: str, dtype_help: str,
                   models_help: str = "GGUF files, ONNX export folders, HF folders or built-in names",
                   models_nargs: str = "+") -> None:
        """The arguments bench and eval share: the artifacts, where they run, how PyTorch runs HF folders."""
        command.add_argument("models", nargs=models_nargs, help=models_help)
        command.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help=device_help)
        command.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help=dtype_help)
        command.add_argument("--json", type=Path, help="write the results here")

    run = add("run", "distill, export, benchmark and evaluate as a recipe says",
              "edgedistill run recipes/tiny.yaml --out runs/tiny")
    run.add_argument("recipe", nargs="?", type=Path, help="YAML recipe (default: recipes/default.yaml)")
    run.add_argument("--out", type=Path, help="run folder (default: runs/<recipe name>)")
    run.add_argument("--force", action="store_true", help="re-run every stage")
    run.add_argument("--allow-recipe-code", action="store_true",
                     help="let the recipe run its own Python code (a custom scorer); recipes are data people "
                          "share, so it does not by default")
    run.add_argument("--verify", action="store_true",
                     help="re-hash every finished stage's files against its manifest (not only sizes); "
                          "a stage whose files changed runs again")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run this stage and all after it")
    run.add_argument("--to", dest="to_stage", metavar="STAGE", help="stop after this stage")

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

    bench = add("bench", "time to first token, prefill and decode tokens/s against the memory-bandwidth bound, "
                "peak memory, in llama.cpp, ONNX Runtime or PyTorch",
                "edgedistill bench model.gguf --json bench.json\n"
                "  edgedistill bench model.gguf --target phone-8gb --eval eval.json --strict\n"
                "  edgedistill bench runs/tiny/distill --device cuda --dtype bf16\n"
                "  edgedistill bench model.gguf student-int4/ --device cuda")
    add_models(bench, "where every artifact runs; cuda: GGUF with every layer offloaded and ONNX with the CUDA "
                      "provider need GPU builds of llama-cpp-python and ONNX Runtime (README: GPU runtimes)",
               "HF folders' weights")
    for flag, default in (("--prompt-tokens", 128), ("--gen-tokens", 64), ("--repetitions", 3)):
        bench.add_argument(flag, type=int, default=default)
    bench.add_argument("--threads", type=int)
    bench.add_argument("--target", metavar="PROFILE",
                       help="check the results against a device profile: laptop-cpu, raspberry-pi-5, phone-8gb, "
                            "consumer-gpu (recipes/targets/) or a YAML file")
    bench.add_argument("--eval", type=Path, metavar="EVAL_JSON",
                       help="eval.json of `edgedistill eval --json`, for the profile's quality budget")
    bench.add_argument("--strict", action="store_true", help="exit with status 3 when a budget fails")

    evaluate = add("eval", "task score on held-out prompts, with 95% intervals, and its share of a reference's; "
                   "perplexity, KL to the reference and top-1 agreement on the reference's answers; or build a "
                   "held-out set whose references are the teacher's answers",
                   "edgedistill eval model.gguf --data runs/tiny/generate/heldout.jsonl --reference runs/tiny/teacher\n"
                   "  edgedistill eval --build-references questions.txt --reference runs/qa/teacher "
                   "--save qa/heldout.jsonl\n"
                   "  edgedistill eval model.gguf --data qa/heldout.jsonl")
    add_models(evaluate, "where every model (the reference too) runs; cuda: GGUF with every layer offloaded and "
                         "ONNX with the CUDA provider need GPU builds of llama-cpp-python and ONNX Runtime (README: "
                         "GPU runtimes)",
               "the precision HF folders run in (default: fp32)",
               models_help="GGUF files, ONNX export folders, HF folders or built-in names (none with "
                           "--build-references)", models_nargs="*")
    data = evaluate.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, help="heldout.jsonl of a run's generate stage, or one --save wrote")
    data.add_argument("--build-references", type=Path, metavar="PROMPTS",
                      help="instead of scoring models: turn this prompt file (.jsonl, .csv, .parquet, .txt or a "
                           "datasets folder) into held-out records, the --reference's answers as the references "
                           "of those without a gold answer (field 'answer'), and write them to --save")
    evaluate.add_argument("--reference", help="the teacher (HF folder, GGUF or built-in name) to compare with; "
                                              "its answers are the references of held-out records without gold")
    evaluate.add_argument("--save", type=Path, metavar="FILE",
                          help="with --build-references: the .jsonl to write (task.json is written beside it)")
    evaluate.add_argument("--recipe", type=Path,
                          help="with --build-references: turn the rows into prompts as this recipe's task says "
                               "(template, system prompt, fields, kind, schema, scorers); default: each row's "
                               "'text' as the prompt, a generation task")
    evaluate.add_argument("--max-new-tokens", type=int,
                          help="default: 16, or the recipe's eval.max_new_tokens with --recipe")
    evaluate.add_argument("--score-records", type=int, default=64, metavar="N",
                          help="score the reference's answers to the first N held-out records in every model "
                               "(perplexity, KL, top-1; needs --reference; 0: task score only)")
    evaluate.add_argument("--allow-recipe-code", action="store_true",
                          help="run a custom scorer named in the task.json beside --data, or in --recipe (recipe code)")

    harness = add("harness", "lm-evaluation-harness tasks (multiple choice, perplexity, generation) on GGUF files, "
                  "ONNX exports and HF folders, each in its own runtime; nothing is downloaded, so tasks must read "
                  "local data (needs `pip install 'edgedistill[lm-eval]'`)",
                  "edgedistill harness model.gguf runs/tiny/distill --tasks tiny_task tiny_task_gen "
                  "--include-path tests/fixtures/harness --json harness.json")
    add_models(harness, "where HF folders run in PyTorch; GGUF and ONNX run on the CPU",
               "the precision HF folders run in (default: fp32)")
    harness.add_argument("--tasks", nargs="+", required=True, metavar="NAME",
                         help="lm-eval task, group or tag names (spaces or commas between them): from --include-path, "
                              "or lm-eval's own when their dataset is already in the datasets cache")
    harness.add_argument("--include-path", type=Path, metavar="DIR",
                         help="a folder of task YAML files (dataset_path: json with local data_files, paths "
                              "relative to the working directory)")
    harness.add_argument("--limit", type=int, metavar="N", help="only the first N examples of each task")

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

    bundle = add("bundle", "pack a finished run into a deployable .tar.gz: artifacts, tokenizer, chat template, "
                 "model card, Ollama Modelfile and a sha256 manifest",
                 "edgedistill bundle runs/sentiment --out sentiment-student.tar.gz")
    bundle.add_argument("run", type=Path, help="run folder written by `edgedistill run`")
    bundle.add_argument("--out", type=Path, required=True, help="the .tar.gz to write")
    bundle.add_argument("--artifact", dest="artifacts", action="append", metavar="NAME",
                        help="a GGUF in export/ or an ONNX folder in export_onnx/ (repeatable; default: the "
                             "smallest verified GGUF and every ONNX folder)")
    bundle.add_argument("--overwrite", action="store_true")

    verify_bundle = add("verify", "check a bundle (not a model: see verify-export): every path, size and sha256, "
                        "then optionally extract it safely",
                        "edgedistill verify sentiment-student.tar.gz --extract deploy/")
    verify_bundle.add_argument("file", type=Path, help="a .tar.gz written by `edgedistill bundle`")
    verify_bundle.add_argument("--extract", type=Path, metavar="DIR", help="extract to DIR/<name>/ after the checks")

    report = add("report", "render report.md and report.html (tables, plots, sources with sha256) again from a "
                 "finished run's JSON files, without re-running anything",
                 "edgedistill report runs/sentiment && chromium runs/sentiment/report.html")
    report.add_argument("run", type=Path, help="run folder written by `edgedistill run`")
    report.add_argument("--out", type=Path, metavar="DIR", help="write the two files here (default: RUN)")

    route = add("route", "calibrate routing: which requests a served student should hand to the teacher, from the "
                "student's confidence on the held-out split (writes RUN/route/route.json)",
                "edgedistill route runs/sentiment --target 0.99")
    route.add_argument("run", type=Path, help="run folder written by `edgedistill run` (its eval stage finished)")
    route.add_argument("--artifact", help="the eval row to route from (default: the student's Q4_K_M GGUF)")
    route.add_argument("--target", type=float, default=0.99,
                       help="share of the teacher's task score to reach with the fewest teacher calls")
    route.add_argument("--budget", type=float, metavar="SHARE",
                       help="the most of the requests the teacher may take (0.25: a quarter): the route keeps the "
                            "most of its score within that, checked against --target (default: the fewest calls "
                            "that reach --target)")
    route.add_argument("--json", type=Path, help="write route.json here (default: RUN/route/route.json)")

    chat = add("chat", "one greedy chat answer from a GGUF, an ONNX export or an HF folder",
               'edgedistill chat model.gguf "What is the capital of France?"')
    chat.add_argument("model", help="GGUF file, HF folder or built-in name")
    chat.add_argument("prompt")
    chat.add_argument("--max-new-tokens", type=int, default=128)

    serve = add("serve", "an OpenAI-compatible HTTP service over a GGUF, ONNX export or HF folder: /v1/chat/completions "
                "(streamed or whole), /v1/models and /health, one answer at a time per model behind a bounded queue; "
                "with --teacher, requests that name the teacher go to it, and to the student (marked degraded) when "
                "it cannot answer; --route or --plan route the others",
                "edgedistill serve runs/sentiment/export/student-q4_k_m.gguf --port 8000\n"
                "  edgedistill serve model.gguf --teacher http://gpu-box:8000/v1\n"
                "  edgedistill serve student.gguf --teacher teacher.gguf --plan --plan-max-tokens 48\n"
                "  EDGEDISTILL_API_KEY=$(openssl rand -hex 24) edgedistill serve model.gguf --host 0.0.0.0")
    serve.add_argument("artifact", help="GGUF file, ONNX export folder, HF folder or built-in name")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1); any other than loopback needs "
                            "EDGEDISTILL_API_KEY set, which clients then send as their API key")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--teacher", metavar="URL_OR_MODEL",
                       help="an OpenAI-compatible base URL (http://host:8000/v1; its key, if any, in "
                            "EDGEDISTILL_TEACHER_API_KEY) or a local model, answering requests for model \"teacher\"")
    serve.add_argument("--teacher-model", metavar="NAME",
                       help="the model name the teacher endpoint serves (default: the one its /models lists)")
    serve.add_argument("--route", type=Path, metavar="FILE",
                       help="route.json of `edgedistill route`: the student answers first and hands the request to "
                            "--teacher when its confidence is below the calibrated threshold")
    serve.add_argument("--plan", action="store_true",
                       help="plan-and-execute: for each request to the served name, --teacher writes a short plan "
                            "and the student answers following it (answered_by \"student+teacher-plan\")")
    serve.add_argument("--plan-prompt", default="steps", metavar="NAME",
                       help="with --plan, the plan prompt of edgedistill/serve/plan.py: steps (default), keywords "
                            "or draft")
    serve.add_argument("--plan-max-tokens", type=int, default=48, metavar="N",
                       help="with --plan, the most tokens a plan may take (default: 48)")
    serve.add_argument("--queue", type=int, default=32, metavar="N",
                       help="requests that may wait while the model answers another; more are answered 503 "
                            "(default: 32)")
    serve.add_argument("--timeout-s", type=float, default=120.0,
                       help="per request, queue wait and answer; past it 504 (default: 120)")
    serve.add_argument("--max-tokens", type=int, default=1024,
                       help="the most completion tokens a request may ask for (default: 1024)")
    serve.add_argument("--threads", type=int, help="llama.cpp / ONNX Runtime threads (default: all cores)")
    serve.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the models run")
    serve.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                       help="the precision HF folders run in (default: fp32)")
    return parser
