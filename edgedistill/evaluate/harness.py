"""lm-evaluation-harness on any artifact: its tasks score a GGUF file, an ONNX export folder, an HF
folder or a built-in model through edgedistill's runtimes, so a standard benchmark's number is
measured in the runtime a user of that artifact runs (llama.cpp, ONNX Runtime, PyTorch).

    pip install 'edgedistill[lm-eval]'
    edgedistill harness model.gguf runs/tiny/distill --tasks tiny_task tiny_task_gen \\
        --include-path tests/fixtures/harness --limit 8 --json harness.json
    python -c "import lm_eval, edgedistill.evaluate.harness; print(lm_eval.simple_evaluate(model='edgedistill',
        model_args='pretrained=model.gguf', tasks=['tiny_task'],
        task_manager=lm_eval.tasks.TaskManager(include_path='tests/fixtures/harness'))['results'])"

`EdgedistillLM` is registered with lm-eval as "edgedistill". It answers the three kinds of request
on plain text (tasks' prompts, no chat template), as lm-eval's HF model does:
- loglikelihood: context and continuation are tokenized together (the context's trailing spaces
  moved to the continuation) and split where the context's own tokens end; the continuation's
  tokens are scored teacher-forced in one Runtime.score pass; greedy means each of them is the argmax.
  An empty context is conditioned on the BOS (the end-of-text token where the model has none);
- loglikelihood_rolling: lm-eval's disjoint rolling windows of `max_length` tokens after that prefix;
- generate_until: greedy decoding that stops at an end token, after max_gen_toks tokens, or once
  the text holds one of the `until` strings, and is cut before it. Sampling is refused: every
  runtime here decodes greedily.
Text is tokenized with what the artifact's tokenizer adds by its own config (a BOS where it adds one).

Nothing is downloaded: `edgedistill harness` sets HF_DATASETS_OFFLINE and HF_HUB_OFFLINE. A task
whose data is local (a YAML with `dataset_path: json` and `dataset_kwargs: {data_files: ...}`, paths
relative to the working directory) runs anywhere; one of lm-eval's hub tasks runs only when its
dataset is already in the datasets cache, and otherwise fails at once, naming the task.

Only this module imports lm_eval; without it installed, importing it raises EdgedistillError.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgedistill.errors import EdgedistillError
from edgedistill.runtimes import Runtime, artifact_kind, open_runtime, resolve_artifact

INSTALL_HINT = "pip install 'edgedistill[lm-eval]'"

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:
    # a version without these names fails here too: the extra pins the one this adapter is tested with
    raise EdgedistillError(f"lm-evaluation-harness is not installed, or not a version edgedistill supports ({exc})",
                           INSTALL_HINT) from exc

DEFAULT_MAX_LENGTH = 2048  # for a runtime that states no context length
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default
LOCAL_TASK_HINT = ("define the task in a YAML file with `dataset_path: json` and `dataset_kwargs: {data_files: "
                   "...}` (a local JSONL; paths relative to the working directory) and pass its folder as "
                   "--include-path; a hub task runs offline only once its dataset is in the datasets cache")


def continuation_logprob(runtime: Runtime, context: list[int], continuation: list[int],
                         max_length: int) -> tuple[float, bool]:
    """(sum of the log-probs of `continuation`'s tokens after `context`, whether greedy decoding
    gives exactly them), teacher-forced in one pass over at most `max_length` tokens (the context
    is cut from the left). `context` must not be empty: the caller gives an empty one a prefix token."""
    if not continuation:
        return 0.0, True
    ids = (context + continuation)[-(max_length + 1):]
    scored = min(len(continuation), len(ids) - 1)
    targets = np.array(ids[-scored:])
    logprobs = runtime.score(ids[:-1], last=scored)
    picked = logprobs[np.arange(scored), targets].astype(np.float64)
    return float(picked.sum()), bool((logprobs.argmax(-1) == targets).all())


def greedy_until(runtime: Runtime, prompt: list[int], until: list[str], max_new_tokens: int) -> str:
    """The greedy continuation's text, stopped at an end token, after `max_new_tokens` tokens or as
    soon as it holds a string of `until`, and cut before the first such string."""
    stops = [stop for stop in until if stop]
    ids: list[int] = []
    for token in runtime.greedy_ids(prompt, max_new_tokens):
        if runtime.is_end(token):
            break
        ids.append(token)
        # the whole text each time: a stop string may span tokens or end inside a multi-byte character
        if stops and any(stop in runtime.decode(ids) for stop in stops):
            break
    text = runtime.decode(ids)
    for stop in stops:
        text = text.split(stop)[0]
    return text


@register_model("edgedistill")
class EdgedistillLM(TemplateLM):
    """An lm-eval model over any artifact edgedistill opens (see the module docstring).

    pretrained: GGUF file, ONNX export folder, HF folder or built-in name; device and dtype choose how
    PyTorch runs an HF folder; max_length: tokens one request may take (default: the runtime's
    context length); max_gen_toks: generate_until's default when a task sets none. batch_size and
    max_batch_size, which lm-eval passes every model, are accepted and unused: requests run one by one.
    """

    def __init__(self, pretrained: str | Path | None = None, *, runtime: Runtime | None = None,
                 device: str | None = None, dtype: str = "fp32", threads: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 batch_size: int | str | None = None, max_batch_size: int | None = None):
        super().__init__()
        if (pretrained is None) == (runtime is None):
            raise EdgedistillError("EdgedistillLM needs exactly one of pretrained= and runtime=",
                                   "pass model_args pretrained=PATH (a GGUF file, an ONNX or HF folder, a built-in name)")
        self.runtime = runtime if runtime is not None else open_runtime(
            pretrained, threads=threads, device=device or "cpu", dtype=dtype)
        self.name = str(pretrained) if pretrained is not None else type(runtime).__name__
        self.max_length = int(max_length or self.runtime.context_length or DEFAULT_MAX_LENGTH)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.runtime.eos_id

    @property
    def prefix_token_id(self) -> int:
        # lm-eval's HF model conditions an empty context on the BOS, else on the end-of-text token
        return self.runtime.bos_id if self.runtime.bos_id is not None else self.runtime.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.runtime.encode(string, add_special=add_special_tokens is not False)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.runtime.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        answers = []
        for key, context, continuation in tqdm(requests, desc=f"loglikelihood {self.name}", disable=disable_tqdm):
            answer = continuation_logprob(self.runtime, context or [self.prefix_token_id], continuation,
                                          self.max_length)
            self.cache_hook.add_partial("loglikelihood", key, answer)
            answers.append(answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        answers = []
        for (text,) in tqdm([request.args for request in requests], desc=f"rolling {self.name}",
                            disable=disable_tqdm):
            windows = get_rolling_token_windows(token_list=self.tok_encode(text, add_special_tokens=False),
                                                prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                                context_len=1)
            total = sum(continuation_logprob(self.runtime, context, predicted, self.max_length)[0]
                        for context, predicted in map(make_disjoint_window, windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            answers.append(total)
        return answers

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        answers = []
        for context, gen_kwargs in tqdm([request.args for request in requests], desc=f"generate {self.name}",
                                        disable=disable_tqdm):
            kwargs = dict(gen_kwargs)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                raise EdgedistillError(f"a task asks {self.name} for sampled generation ({gen_kwargs})",
                                       "edgedistill's runtimes decode greedily: use a task (or generation_kwargs) "
                                       "with do_sample: false")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or self.max_gen_toks)
            # the prompt leaves room for the answer within max_length, cut from the left as lm-eval does
            prompt = self.tok_encode(context)[-max(self.max_length - max_new, 1):] or [self.prefix_token_id]
            answer = greedy_until(self.runtime, prompt, until, max_new)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            answers.append(answer)
        return answers


def task_manager(tasks: list[str], include_path: Path | None = None) -> TaskManager:
    """lm-eval's index of the tasks asked for: `include_path`'s own YAML files alone when they define
    them all (indexing lm-eval's built-in tasks takes seconds), else those and the built-in ones."""
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise EdgedistillError(f"--include-path {include_path} is not a folder",
                                   "pass the folder that holds the task YAML files")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        close = [match for task in unknown for match in difflib.get_close_matches(task, manager.all_tasks, n=1)]
        raise EdgedistillError(f"no lm-evaluation-harness task named {', '.join(unknown)}"
                               + (f" (in {include_path} or lm-eval's own)" if include_path else "")
                               + (f"; did you mean {', '.join(close)}?" if close else ""),
                               "check the name against `lm-eval ls tasks`, or " + LOCAL_TASK_HINT)
    return manager


def _load_tasks(manager: TaskManager, tasks: list[str]) -> None:
    """Reads every task's data once, before any model opens: a task that would download fails now."""
    try:
        manager.load(tasks)
    except ConnectionError as exc:  # datasets' offline refusal (OfflineModeIsEnabled) and network failures
        raise EdgedistillError(f"{', '.join(tasks)}: a task reads its data from the Hugging Face Hub, and "
                               f"edgedistill downloads nothing ({exc})", LOCAL_TASK_HINT) from exc
    except FileNotFoundError as exc:
        raise EdgedistillError(f"{', '.join(tasks)}: a task's data file is not there ({exc})",
                               "data_files paths in a task YAML are relative to the working directory: run "
                               "from the folder they are relative to, or make them absolute") from exc


def metric_rows(results: dict) -> list[dict]:
    """lm-eval's results of one model as rows: task, metric (with its filter unless "none"), value, stderr."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if metric in ("alias", "name", "sample_len") or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({"task": task, "metric": metric if filter_name in ("", "none") else f"{metric} ({filter_name})",
                         "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "samples": results.get("n-samples", {}).get(task, {}).get("effective")})
    return rows


def run_harness(models: Iterable[Path | str], tasks: list[str], *, include_path: Path | None = None,
                limit: int | None = None, num_fewshot: int | None = None, device: str = "cpu",
                dtype: str = "fp32", log_samples: bool = False) -> list[dict]:
    """lm-eval's `tasks` on each artifact of `models`, one after another; per artifact a dict with its
    path, kind, lm-eval's results, per-task versions and sample counts, and metric rows (metric_rows).
    log_samples: keep lm-eval's per-request samples too (under "samples")."""
    artifacts = [resolve_artifact(model) for model in models]
    kinds = [artifact_kind(path) for path in artifacts]  # before any model loads: a bad path fails now
    manager = task_manager(tasks, include_path)
    _load_tasks(manager, tasks)
    out = []
    for path, kind in zip(artifacts, kinds):
        lm = EdgedistillLM(path, device=device if kind == "hf" else None, dtype=dtype if kind == "hf" else "fp32")
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=log_samples)
        entry = {"model": str(path), "kind": kind, "lm_eval_version": lm_eval.__version__,
                 "results": results["results"], "versions": results.get("versions", {}),
                 "n-samples": results.get("n-samples", {}), "rows": metric_rows(results)}
        if log_samples:
            entry["samples"] = results["samples"]
        out.append(entry)
    return out


def format_harness(entries: list[dict]) -> str:
    """What `edgedistill harness` prints: a small table per artifact (task, metric, value ± stderr, samples)."""
    blocks = []
    for entry in entries:
        lines = [f"{entry['model']} ({entry['kind']})",
                 f"  {'task':<24} {'metric':<28} {'value':>10} {'stderr':>8} {'n':>6}"]
        for row in entry["rows"]:
            stderr = f"{row['stderr']:.4f}" if row["stderr"] is not None else "-"
            lines.append(f"  {row['task']:<24} {row['metric']:<28} {row['value']:>10.4g} {stderr:>8} "
                         f"{row['samples'] if row['samples'] is not None else '-':>6}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
