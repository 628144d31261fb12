"""A deployable archive of a finished run.

    edgedistill bundle runs/sentiment --out sentiment-student.tar.gz
    edgedistill verify sentiment-student.tar.gz
    python -c "from pathlib import Path; from edgedistill.bundle import make_bundle, verify_bundle; \
make_bundle(Path('runs/sentiment'), Path('sentiment-student.tar.gz')); \
print(verify_bundle(Path('sentiment-student.tar.gz'), extract_to=Path('deploy')))"

The archive holds one folder named after the file (`sentiment-student/`): the chosen artifacts
(by default the smallest GGUF that passed verification and every ONNX folder), the tokenizer
files, `chat_template.jinja`, a model card `README.md` (teacher, data, measured results, how to
run it), an Ollama `Modelfile` per GGUF, `route.json` when the run has route/route.json (when the
student hands a request to the teacher; the card shows the `edgedistill serve --route` command),
and `manifest.json` with every file's size and sha256.

A run trusts a finished stage on its files' sizes, so a same-size corruption would be bundled with
a fresh hash: every file packed from a stage folder is hashed as it is packed and compared with
the sha256 in that stage's manifest.json, and a difference is refused (no archive is written).
The files written here (model card, Modelfiles, manifest.json, a chat template taken from
tokenizer_config.json) have no stage record, nor does a file its stage's manifest does not list.

The check of an archive, `verify_bundle`, and the format's constants live in
edgedistill/bundle_verify.py; `verify_bundle` is importable from here too, so that one import
gives both ends.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

from edgedistill import __version__, layout
from edgedistill.bundle_verify import FORMAT, FORMAT_VERSION, MANIFEST, path_problem, verify_bundle
from edgedistill.errors import EdgedistillError
from edgedistill.pipeline import read_manifest
from edgedistill.records import BenchRow, EvalRow, read_bench, read_eval

__all__ = ["make_bundle", "verify_bundle"]


class _HashingReader:
    """A file object that hashes what tarfile reads from it, so each file is read once."""

    def __init__(self, file):
        self.file, self.sha256, self.bytes = file, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _available_artifacts(run_dir: Path) -> dict[str, Path]:
    """Every GGUF in export/ by file name and every ONNX folder in export_onnx/ as `name/`."""
    found = {path.name: path for path in sorted((run_dir / layout.EXPORT).glob("*.gguf")) if path.is_file()}
    onnx = run_dir / layout.EXPORT_ONNX
    if onnx.is_dir():
        found |= {f"{path.name}/": path for path in sorted(onnx.iterdir())
                  if path.is_dir() and (path / layout.ONNX_MANIFEST).is_file()}
    return found


def _default_artifacts(run_dir: Path, available: dict[str, Path], export_manifest: dict) -> list[str]:
    passed = [entry["file"] for entry in (export_manifest.get("result") or {}).values()
              if isinstance(entry, dict) and entry.get("file") in available
              and (entry.get("verification") or {}).get("passed") is True]
    if not passed:
        raise EdgedistillError(f"no GGUF in {run_dir / 'export'} passed verification (export/manifest.json)",
                               f"name the artifacts to bundle with --artifact; available: {', '.join(available)}")
    smallest = min(passed, key=lambda name: available[name].stat().st_size)
    return [smallest, *(name for name in available if name.endswith("/"))]


def _choose_artifacts(run_dir: Path, names: list[str] | None, export_manifest: dict) -> dict[str, Path]:
    available = _available_artifacts(run_dir)
    if names is None:
        names = _default_artifacts(run_dir, available, export_manifest)
    by_plain_name = {name.rstrip("/"): name for name in available}
    chosen = {}
    for name in names:
        key = by_plain_name.get(name.rstrip("/"))
        if key is None:
            raise EdgedistillError(f"no artifact {name!r} in {run_dir}",
                                   f"choose from: {', '.join(available) or '(none: the export stage wrote nothing)'}")
        chosen[key] = available[key]
    return chosen


def _tokenizer_folder(run_dir: Path) -> Path:
    # a LoRA run's deployable model is the merged one
    folder = run_dir / layout.MERGE if (run_dir / layout.MERGE).is_dir() else run_dir / layout.DISTILL
    if not (folder / layout.TOKENIZER_CONFIG).is_file():
        raise EdgedistillError(f"{run_dir} has no tokenizer: {folder / layout.TOKENIZER_CONFIG} is missing",
                               f"finish the run first: edgedistill run --out {run_dir}")
    return folder


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _modelfile(gguf_name: str, modelfile: str, model_name: str, eos_token: str | None) -> str:
    lines = [f"# Ollama: ollama create {model_name} -f {modelfile} && ollama run {model_name}",
             "# No TEMPLATE line: `ollama create` reads the chat template stored in the GGUF",
             "# (tokenizer.chat_template) and uses the Ollama template it recognises; check the result",
             f"# with `ollama show --template {model_name}` and add a TEMPLATE here if it is empty.",
             f"FROM ./{gguf_name}"]
    if eos_token and '"' not in eos_token and "\n" not in eos_token:
        lines.append(f'PARAMETER stop "{eos_token}"')
    return "\n".join(lines) + "\n"


def _ollama_names(name: str, ggufs: list[str]) -> dict[str, tuple[str, str]]:
    """Each GGUF's Modelfile name and Ollama model name: plain for one GGUF, suffixed for several."""
    if len(ggufs) == 1:
        return {ggufs[0]: ("Modelfile", name)}
    return {gguf: (f"Modelfile.{Path(gguf).stem}", f"{name}-{Path(gguf).stem}") for gguf in ggufs}


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _training_examples(run_dir: Path, generate: dict) -> int | None:
    examples = (generate.get("result") or {}).get("train_examples")
    train = run_dir / layout.GENERATE / layout.TRAIN_JSONL
    if examples is None and train.is_file():
        with open(train, "rb") as file:
            examples = sum(1 for line in file if line.strip())
    return examples


def _read_route(run_dir: Path) -> dict | None:
    """route/route.json (edgedistill.route) when the run has one."""
    path = run_dir / layout.ROUTE / layout.ROUTE_JSON
    if not path.is_file():
        return None
    try:
        route = json.loads(path.read_text())
    except ValueError as exc:
        raise EdgedistillError(f"{path} is not valid JSON ({exc})",
                               f"write it again: edgedistill route {run_dir}") from None
    if not isinstance(route, dict) or not isinstance(route.get("artifact"), str):
        raise EdgedistillError(f"{path} is not what `edgedistill route` writes (no artifact)",
                               f"write it again: edgedistill route {run_dir}")
    return route


def _route_lines(route: dict, artifacts: list[str]) -> list[str]:
    """The model card's routing part: what route.json decided on the held-out split, and the serve command."""
    artifact = route["artifact"]
    lines = ["## Route hard requests to the teacher", ""]
    if route.get("share_of_teacher") is not None:
        low, high = route.get("share_interval") or [None, None]
        interval = f" [{_fmt(100 * low)}, {_fmt(100 * high)}]" if low is not None and high is not None else ""
        threshold = ("no threshold (the student alone reaches the target)" if route.get("threshold") is None
                     else f"threshold {route['threshold']:.4g}")
        random = route.get("random_routing_share_of_teacher")
        lines += [f"route.json (from route/route.json): the student answers first, and a request goes to the teacher "
                  f"when the student's confidence in its answer (rule `{route.get('rule')}`) is below the threshold. "
                  f"On {_fmt(route.get('examples'))} held-out examples, {threshold} sent "
                  f"{_fmt(100 * route['teacher_call_share'])}% of requests to the teacher and kept "
                  f"{_fmt(100 * route['share_of_teacher'])}%{interval} of its task score "
                  f"({'reaching' if route.get('reached') else 'short of'} the target {_fmt(100 * route['target'])}%"
                  + (f"; random routing at that share of calls: {_fmt(100 * random)}%" if random is not None else "")
                  + ").", ""]
    if artifact.rstrip("/") not in {name.rstrip("/") for name in artifacts}:
        lines += [f"route.json was calibrated on `{artifact}`, which this bundle does not hold: its threshold fits "
                  f"that artifact only (bundle it with `--artifact {artifact}`).", ""]
    lines += ["Serve the student, with the teacher's OpenAI-compatible endpoint at URL "
              "(e.g. http://127.0.0.1:8080/v1):", "",
              f"    edgedistill serve {artifact.rstrip('/')} --route route.json --teacher URL", ""]
    return lines


def _model_card(run_dir: Path, name: str, run_name: str, artifacts: list[str],
                modelfiles: dict[str, tuple[str, str]],
                has_template: bool, route: dict | None = None) -> str:
    manifests = {stage: _read_json(run_dir / stage / layout.MANIFEST) or {}
                 for stage in (layout.TEACHER, layout.STUDENT, layout.GENERATE, layout.DISTILL)}
    teacher = (manifests["teacher"].get("config") or {}).get("teacher") or {}
    student = (manifests["student"].get("config") or {}).get("student") or {}
    distill = (manifests["distill"].get("config") or {}).get("distill") or {}
    generate_config = manifests["generate"].get("config") or {}
    task, data = generate_config.get("task") or {}, generate_config.get("data") or {}
    examples = _training_examples(run_dir, manifests["generate"])

    lines = [f"# {name}", "",
             f"A student language model distilled with edgedistill {__version__} (run `{run_name}`).", "",
             "## Where it comes from", "",
             f"- Teacher: `{teacher.get('source', 'unknown')}` (teacher/manifest.json)"]
    if student:
        lines.append(f"- Student: made by `{student.get('method')}` from the teacher (student/manifest.json)")
    if distill:
        lines.append(f"- Distillation: {distill.get('epochs')} epochs, {distill.get('divergence')}, "
                     f"KL weight {distill.get('kl_weight')}, temperature {distill.get('temperature')} "
                     "(distill/manifest.json)")
    source = f" from prompts in `{data['prompts']}`" if data.get("prompts") else ""
    lines.append(f"- Data: {_fmt(examples)} training examples answered by the teacher{source}"
                 + (f"; task: {task['kind']}" if task.get("kind") else "") + " (generate/manifest.json)")

    lines += ["", "## Measured results", ""]
    eval_json, bench_json = run_dir / layout.EVAL / layout.EVAL_JSON, run_dir / layout.BENCH / layout.BENCH_JSON
    evaluation = read_eval(eval_json) if eval_json.is_file() else None
    bench = {row.artifact.rstrip("/"): row for row in (read_bench(bench_json) if bench_json.is_file() else [])}
    scores = {row.artifact.rstrip("/"): row for row in (evaluation.artifacts if evaluation else [])}
    reference = evaluation.reference if evaluation else None
    if not bench and not scores:
        lines.append("Not measured: the run has no bench or eval stage.")
    else:
        lines += ["| artifact | file MB | decode tok/s | prefill tok/s | TTFT ms | peak RSS MB | task score "
                  "| share of teacher |", "|---|---|---|---|---|---|---|---|"]
        for artifact in artifacts:
            # an artifact not measured: a row of its own with every value missing
            speed = bench.get(artifact.rstrip("/")) or BenchRow(artifact=artifact)
            score = scores.get(artifact.rstrip("/")) or EvalRow(artifact=artifact)
            cells = [artifact, _fmt(speed.file_mb, 2), _fmt(speed.decode_tokens_per_s),
                     _fmt(speed.prefill_tokens_per_s), _fmt(speed.ttft_ms), _fmt(speed.peak_rss_mb),
                     _fmt(score.task_score, 3), _fmt(score.share_of_reference, 3)]
            lines.append("| " + " | ".join(cells) + " |")
        if reference:
            lines += ["", f"Teacher (PyTorch, reference) task score: {_fmt(reference.task_score, 3)} "
                      f"on {_fmt(reference.examples)} held-out examples."]
        threads = next((row.threads for row in bench.values()), None)
        lines += ["", f"From bench/bench.json ({_fmt(threads)} threads, on the machine that made the run) "
                  "and eval/eval.json; re-measure with `edgedistill bench` and `edgedistill eval`."]

    lines += ["", "## Run it", ""]
    template_note = "chat_template.jinja" if has_template else "no chat template (the tokenizer has none)"
    for artifact in artifacts:
        if artifact.endswith(".gguf"):
            modelfile, model = modelfiles[artifact]
            lines += [f"llama.cpp ({artifact}; the GGUF carries its chat template):", "",
                      f"    llama-cli -m {artifact} -cnv", "",
                      f"Ollama: `ollama create {model} -f {modelfile} && ollama run {model}`", ""]
        else:
            lines += [f"onnxruntime-genai ({artifact}; format the prompt with {template_note}):", "",
                      "    import onnxruntime_genai as og",
                      f"    model = og.Model(\"{artifact.rstrip('/')}\")",
                      "    tokenizer = og.Tokenizer(model)",
                      "    params = og.GeneratorParams(model)",
                      "    params.set_search_options(max_length=256)",
                      "    generator = og.Generator(model, params)",
                      "    generator.append_tokens(tokenizer.encode(prompt))",
                      "    while not generator.is_done():",
                      "        generator.generate_next_token()",
                      "    print(tokenizer.decode(generator.get_sequence(0)))", ""]
    if route is not None:
        lines += _route_lines(route, artifacts)
    lines += ["Check the archive before deploying it: `edgedistill verify <file>.tar.gz` "
              "(sizes and sha256 of every file are in manifest.json)."]
    return "\n".join(lines) + "\n"


def _bundle_name(out_file: Path) -> str:
    name = out_file.name
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return out_file.stem


def _add_file(tar: tarfile.TarFile, arcname: str, path: Path, mtime: int) -> dict:
    info = tarfile.TarInfo(arcname)
    info.size, info.mode, info.mtime = path.stat().st_size, 0o644, mtime
    with open(path, "rb") as file:
        reader = _HashingReader(file)
        tar.addfile(info, reader)
    return {"bytes": reader.bytes, "sha256": reader.sha256.hexdigest()}


def _add_bytes(tar: tarfile.TarFile, arcname: str, data: bytes, mtime: int) -> dict:
    info = tarfile.TarInfo(arcname)
    info.size, info.mode, info.mtime = len(data), 0o644, mtime
    reader = _HashingReader(io.BytesIO(data))
    tar.addfile(info, reader)
    return {"bytes": reader.bytes, "sha256": reader.sha256.hexdigest()}


def _stage_records(run_dir: Path, sources: dict[str, Path]) -> dict[str, tuple[str, str]]:
    """Each source file's stage folder and the sha256 that the stage's manifest.json recorded for it;
    a file whose stage has no manifest, or whose manifest does not list it, has no record."""
    manifests: dict[str, dict] = {}
    records = {}
    for relpath, path in sources.items():
        stage, _, inside = path.relative_to(run_dir).as_posix().partition("/")
        if stage not in manifests:
            manifest = read_manifest(run_dir / stage)
            manifests[stage] = manifest if isinstance(manifest, dict) else {}
        files = manifests[stage].get("files")
        entry = files.get(inside) if isinstance(files, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
            records[relpath] = (stage, entry["sha256"])
    return records


def _check_unchanged(run_dir: Path, path: Path, stage: str, recorded: str, packed: str) -> None:
    if packed != recorded:
        raise EdgedistillError(f"{path} changed since the {stage} stage wrote it (sha256 {recorded[:12]}... in its "
                               f"manifest, {packed[:12]}... now)",
                               f"run `edgedistill run RECIPE --out {run_dir} --verify` to redo the stages whose "
                               "files changed, then bundle again")


def make_bundle(run_dir: Path, out_file: Path, *, artifacts: list[str] | None = None,
                overwrite: bool = False) -> dict:
    """Write `out_file` (.tar.gz) from the finished run in `run_dir`; returns its manifest plus
    `file` and `bytes`. `artifacts` names GGUF files in export/ or folders in export_onnx/."""
    run_dir, out_file = Path(run_dir), Path(out_file)
    if not run_dir.is_dir():
        raise EdgedistillError(f"run folder {run_dir} does not exist",
                               "give the folder `edgedistill run` wrote, e.g. runs/sentiment")
    export_manifest = _read_json(run_dir / layout.EXPORT / layout.MANIFEST)
    if export_manifest is None:
        raise EdgedistillError(f"{run_dir} has no finished export stage ({run_dir / layout.EXPORT / layout.MANIFEST} is missing)",
                               f"finish the run first: edgedistill run --out {run_dir}")
    if out_file.exists() and not overwrite:
        raise EdgedistillError(f"{out_file} already exists", "pass --overwrite or choose another --out")

    chosen = _choose_artifacts(run_dir, artifacts, export_manifest)
    tokenizer_dir = _tokenizer_folder(run_dir)
    tokenizer_config = json.loads((tokenizer_dir / layout.TOKENIZER_CONFIG).read_text())
    name = _bundle_name(out_file)
    if name in ("", ".", "..") or path_problem(name):
        raise EdgedistillError(f"{out_file.name!r} gives the bundle no usable folder name ({name!r})",
                               "choose an --out like sentiment-student.tar.gz")
    run_name = (export_manifest.get("config") or {}).get("name") or run_dir.name
    modelfiles = _ollama_names(name, [artifact for artifact in chosen if artifact.endswith(".gguf")])

    sources: dict[str, Path] = {}
    for artifact, path in chosen.items():
        if path.is_file():
            sources[artifact] = path
        else:
            for folder, _, files in sorted(os.walk(path)):
                for file in sorted(files):
                    sources[(Path(folder) / file).relative_to(path.parent).as_posix()] = Path(folder) / file
    sources |= {file: tokenizer_dir / file for file in layout.TOKENIZER_FILES if (tokenizer_dir / file).is_file()}
    eos_token = _token_text(tokenizer_config.get("eos_token"))
    generated = {modelfile: _modelfile(gguf, modelfile, model, eos_token)
                 for gguf, (modelfile, model) in modelfiles.items()}
    # newer transformers save the template beside tokenizer_config.json instead of inside it
    if (tokenizer_dir / layout.CHAT_TEMPLATE).is_file():
        sources[layout.CHAT_TEMPLATE] = tokenizer_dir / layout.CHAT_TEMPLATE
    elif isinstance(tokenizer_config.get("chat_template"), str):
        generated[layout.CHAT_TEMPLATE] = tokenizer_config["chat_template"]
    has_template = layout.CHAT_TEMPLATE in sources or layout.CHAT_TEMPLATE in generated
    route = _read_route(run_dir)
    if route is not None:
        sources[layout.ROUTE_JSON] = run_dir / layout.ROUTE / layout.ROUTE_JSON
    generated["README.md"] = _model_card(run_dir, name, run_name, list(chosen), modelfiles, has_template, route)
    recorded = _stage_records(run_dir, sources)

    created = int(time.time())
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    try:
        files = {}
        with tarfile.open(tmp, "w:gz") as tar:
            for relpath, path in sources.items():
                files[relpath] = _add_file(tar, f"{name}/{relpath}", path, created)
                if relpath in recorded:
                    _check_unchanged(run_dir, path, *recorded[relpath], files[relpath]["sha256"])
            for relpath, text in generated.items():
                files[relpath] = _add_bytes(tar, f"{name}/{relpath}", text.encode(), created)
            # "route": the routing file, only when there is one (bundles without it stay as they were)
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "run": run_name,
                        "edgedistill_version": __version__,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(created)),
                        "artifacts": list(chosen), **({"route": layout.ROUTE_JSON} if route is not None else {}),
                        "files": files}
            _add_bytes(tar, f"{name}/{MANIFEST}", (json.dumps(manifest, indent=2) + "\n").encode(), created)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return {**manifest, "file": str(out_file), "bytes": out_file.stat().st_size}
