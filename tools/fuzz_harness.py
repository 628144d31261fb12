"""The harness the fuzzers in tools/ share: one reused worker process, limits per case, outcome counts.

    .venv/bin/python tools/fuzz_recipe.py --cases 300        # a fuzzer built on it

A fuzzer gives two functions: `make_case(index, rng, case_dir)`, which writes one damaged input
into `case_dir` and returns a Case (the line the worker gets, what was done, the folders the case
may write in), and `run_case(line)`, which the worker calls on that line and which returns
`classify(...)`'s dict. Cases run in one worker process (the fuzzer's own script with --worker,
started once and restarted after a hang, a crash or memory past the limit), so thousands of cases
do not pay thousands of interpreter starts.

Outcomes per case: ok, clear (EdgedistillError: the message a user would see), raw_traceback (any
other exception), hang (no answer within the timeout), rss_over (the worker's resident memory past
the limit: polled while the case runs, and its VmHWM, reset per case, read after it), crash (the
worker died), failed_check (the call ended as it should, but a check the fuzzer's run_case makes
after it did not pass, e.g. files left behind; run_case returns it with an error_type naming the
check). Outside writes: the worker runs in an empty folder with HOME and TMPDIR pointed at
another, and any file appearing outside the case's allowed folders is recorded. Every case's
random choices come from (seed, index), so `--replay INDEX` rebuilds one case and runs it here
with its whole traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BAD_OUTCOMES = ("raw_traceback", "hang", "rss_over", "crash", "failed_check")
MAX_EXAMPLES = 20


@dataclass
class Case:
    """One damaged input: the line the worker gets, what was done to it, where it may write."""

    line: str
    mutations: list[str]
    may_write: list[Path] = field(default_factory=list)


MakeCase = Callable[[int, random.Random, Path], Case]
RunCase = Callable[[str], dict]


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


def classify(call: Callable[[], object]) -> dict:
    """Run `call` and name the outcome: ok, clear (with the user's message) or raw_traceback."""
    from edgedistill.errors import EdgedistillError

    try:
        call()
    except EdgedistillError as error:
        cause = error.__cause__
        return {"outcome": "clear", "message": error.problem[:400],
                "from_library": None if cause is None else f"{type(cause).__name__}: {cause}"[:300]}
    except Exception as error:
        return {"outcome": "raw_traceback", "error_type": type(error).__name__, "message": str(error)[:400],
                "traceback": traceback.format_exc(limit=-4)[-1500:]}
    return {"outcome": "ok"}


def _status_kb(pid: int | str, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def serve(run_case: RunCase) -> None:
    """The worker's loop: one JSON answer per case line read from stdin, with the case's peak memory."""
    # The answers get their own copy of stdout; anything the library prints goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:  # so VmHWM is this case's peak, not the process's
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        start = time.perf_counter()
        result = run_case(line.rstrip("\n"))
        result["seconds"] = time.perf_counter() - start
        result["vmhwm_kb"] = _status_kb("self", "VmHWM")
        out.write(json.dumps(result) + "\n")
        out.flush()


class Worker:
    """The worker process seen from the fuzzer: send a case line, wait for the answer or a limit."""

    def __init__(self, script: Path, cwd: Path, env: dict, stderr: Path):
        self.script, self.cwd, self.env, self.stderr_path = script, cwd, env, stderr
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.stderr = self.stderr_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, str(self.script), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, cwd=self.cwd, env=self.env)
        self.starts += 1
        line = self._line(timeout_s=120, rss_limit_kb=None)
        if line != "ready":
            raise RuntimeError(f"the fuzz worker did not start: {line!r}; see {self.stderr_path}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.stderr.close()
            self.proc = None

    def _line(self, timeout_s: float, rss_limit_kb: int | None) -> str | dict:
        """The worker's next line, or {"outcome": "hang"/"rss_over"/"crash"} (it is then stopped)."""
        fd, buffered, deadline, peak_kb = self.proc.stdout.fileno(), b"", time.monotonic() + timeout_s, 0
        while b"\n" not in buffered:
            if time.monotonic() > deadline:
                self.stop()
                return {"outcome": "hang", "peak_rss_kb": peak_kb}
            readable, _, _ = select.select([fd], [], [], 0.05)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self.proc.wait()
                    self.stop()
                    return {"outcome": "crash", "message": f"the worker exited with status {code}"}
                buffered += chunk
            elif rss_limit_kb is not None:
                peak_kb = max(peak_kb, _status_kb(self.proc.pid, "VmRSS"))
                if peak_kb > rss_limit_kb:
                    self.stop()
                    return {"outcome": "rss_over", "peak_rss_kb": peak_kb}
        return buffered.decode().strip()

    def run(self, line: str, timeout_s: float, rss_limit_kb: int) -> dict:
        if self.proc is None:
            self.start()
        start = time.perf_counter()
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()
        answer = self._line(timeout_s, rss_limit_kb)
        if isinstance(answer, dict):  # the worker is gone: the wall time is the case's time
            answer["seconds"] = time.perf_counter() - start
            return answer
        result = json.loads(answer)
        if result["vmhwm_kb"] > rss_limit_kb:
            result["outcome"] = "rss_over"
            self.stop()  # its peak stays; start afresh
        return result


def _outside(folders: list[Path], allowed: list[Path]) -> list[str]:
    return sorted(str(p) for folder in folders for p in folder.rglob("*")
                  if not any(p == a or a in p.parents for a in allowed))


def fuzz(name: str, script: Path, make_case: MakeCase, *, cases: int, seed: int, timeout_s: float,
         rss_limit_mb: float, setup: Callable[[Path], dict] | None = None) -> dict:
    """Run `cases` cases through a worker of `script`; the counts, peaks and examples as a dict.
    `setup(root)` prepares what every case starts from (a sample file) and returns facts for the JSON."""
    root = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    case_dir, cwd, home = root / "cases", root / "cwd", root / "home"
    for folder in (case_dir, cwd, home):
        folder.mkdir()
    facts = setup(root) if setup is not None else {}
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    worker = Worker(script, cwd, env, root / "worker-stderr.log")
    counts, mutations = Counter(), Counter()
    examples: dict[str, list[dict]] = {}
    outside_writes: list[dict] = []
    peak_kb = max_case_s = 0.0
    start = time.perf_counter()
    try:
        for index in range(cases):
            case = make_case(index, case_rng(seed, index), case_dir)
            mutations.update(m.split()[0] for m in case.mutations)
            before = {p for p in case_dir.rglob("*")}
            result = worker.run(case.line, timeout_s, int(rss_limit_mb * 1024))
            counts[result["outcome"]] += 1
            if result.get("from_library"):
                counts["clear_from_library"] += 1
            peak_kb = max(peak_kb, result.get("vmhwm_kb", 0), result.get("peak_rss_kb", 0))
            max_case_s = max(max_case_s, result["seconds"])
            bad = result["outcome"] in BAD_OUTCOMES
            kind = result["outcome"] if bad else "clear_from_library"
            if (bad or result.get("from_library")) and len(examples.setdefault(kind, [])) < MAX_EXAMPLES:
                examples[kind].append({
                    "case": index, "seed": seed, "mutations": case.mutations,
                    **{k: v for k, v in result.items() if k not in ("outcome", "vmhwm_kb")},
                    "reproduce": f"python tools/{script.name} --replay {index} --seed {seed}"})
            written = _outside([case_dir, cwd, home], [*before, *case.may_write])
            if written:
                outside_writes.append({"case": index, "seed": seed, "mutations": case.mutations, "files": written[:10]})
            for folder in (case_dir, cwd, home):  # every case starts clean
                shutil.rmtree(folder)
                folder.mkdir()
    finally:
        worker.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "cases": cases, "seed": seed, **facts,
        "counts": {k: counts[k] for k in ("ok", "clear", *BAD_OUTCOMES, "clear_from_library")},
        "outside_writes": len(outside_writes),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "max_case_seconds": round(max_case_s, 3),
        "seconds_total": round(time.perf_counter() - start, 1),
        "worker_starts": worker.starts,
        "mutations": dict(sorted(mutations.items())),
        "limits": {"timeout_s": timeout_s, "rss_limit_mb": rss_limit_mb},
        "examples": {**examples, "outside_writes": outside_writes[:MAX_EXAMPLES]},
    }


def replay(make_case: MakeCase, run_case: RunCase, index: int, seed: int, setup: Callable[[Path], dict] | None) -> int:
    """Rebuild one case and run it in this process, printing the whole traceback of a raw error."""
    with tempfile.TemporaryDirectory(prefix="fuzz-replay-") as root:
        if setup is not None:
            setup(Path(root))
        case_dir = Path(root) / "cases"
        case_dir.mkdir()
        case = make_case(index, case_rng(seed, index), case_dir)
        print(f"case {index} seed {seed}: {', '.join(case.mutations)}")
        result = run_case(case.line)
        print(json.dumps({k: v for k, v in result.items() if k != "traceback"}, indent=1))
        if "traceback" in result:
            print(result["traceback"])
    return 1 if result["outcome"] in BAD_OUTCOMES else 0


def main(name: str, script: Path, make_case: MakeCase, run_case: RunCase, *, default_cases: int,
         description: str, setup: Callable[[Path], dict] | None = None) -> int:
    """The command line every fuzzer has: --cases, --seed, --timeout-s, --rss-limit-mb, --out, --replay."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", type=int, default=default_cases)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="a case running longer is a hang")
    parser.add_argument("--rss-limit-mb", type=float, default=300.0)
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("--replay", type=int, metavar="CASE", help="run this one case here and show its result")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(run_case)
        return 0
    if args.replay is not None:
        return replay(make_case, run_case, args.replay, args.seed, setup)
    report = fuzz(name, script, make_case, cases=args.cases, seed=args.seed, timeout_s=args.timeout_s,
                  rss_limit_mb=args.rss_limit_mb, setup=setup)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 1 if sum(report["counts"][k] for k in BAD_OUTCOMES) + report["outside_writes"] else 0
