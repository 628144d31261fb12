"""Load test of `edgedistill serve` on loopback, and its overhead against the runtime called directly. One JSON.

    .venv/bin/python tools/bench_serve.py runs/sentiment/export/student-q4_k_m.gguf --json runs/sentiment/bench_serve.json
    .venv/bin/python tools/bench_serve.py smollm2-135m-instruct --duration-s 20 --json /tmp/bench_serve.json
    .venv/bin/python tools/bench_serve.py STUDENT.gguf --teacher-gguf TEACHER.gguf --json bench_serve.json

Three parts, each against the real command (`python -m edgedistill.cli serve ARTIFACT`, a process
of its own on a free loopback port):
- overhead: one client, the same prompts alternately through the service and through the runtime
  opened in this process (open_runtime + generate, the same greedy answers), so drift on a shared
  machine hits both alike; the service's overhead is its median latency over the runtime's, minus 1
  (issue 17's target: at most 10%);
- load: `--clients` threads, each sending whole (non-streamed) chat completions back to back for
  `--duration-s`; every request must be answered (200), and p50/p95 latency and throughput are
  reported. The service answers one request at a time per model, so with 16 clients the latency
  is about 16 answers' time and the throughput that of one stream;
- with `--teacher-gguf`: a llama-cpp-python server on loopback serves it as the teacher, every
  fourth load request asks for model "teacher", and the server is killed halfway through: no
  request may fail, those after the kill are answered by the student, marked degraded.

The clients use http.client (keep-alive, no JSON model parsing) so that the client costs little of
the CPU the service and model share. Figures taken beside other work on the machine are not
figures: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from edgedistill.runtimes import open_runtime, resolve_artifact

ROOT = Path(__file__).resolve().parent.parent
# A pause between a direct and a served answer: the two processes each run llama.cpp's threads on
# the same cores, and threads that have just finished may still be spinning.
SETTLE_S = 0.2
PROMPTS = [
    "Is this review positive or negative? Answer with one word.\n\nReview: The battery lasts all day and the screen "
    "is gorgeous.",
    "Is this review positive or negative? Answer with one word.\n\nReview: It broke after a week and support never "
    "answered.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Give me three words that rhyme with light.",
    "Summarize in one sentence: the meeting moved to Thursday because the room was booked.",
    "Is this review positive or negative? Answer with one word.\n\nReview: Decent value, though the strap feels cheap.",
    "Name a fruit that is yellow.",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited at start:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{what} did not start in {timeout_s:g} s:\n{log.read_text()[-3000:]}")


def start(command: list[str], url: str, log: Path, what: str) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_until_up(url, process, log, what)
    return process


class Client:
    """One keep-alive connection to the service, opened again after `IDLE_S` unused: uvicorn closes an
    idle connection after 5 s, and a request sent on it as it closes fails with a broken pipe."""

    IDLE_S = 4.0

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.used_at = time.monotonic()

    def ask(self, model: str, prompt: str, max_tokens: int) -> tuple[int, dict]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens})
        if time.monotonic() - self.used_at > self.IDLE_S:
            self.connection.close()
        try:
            self.connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = self.connection.getresponse()
            status, answer = response.status, json.loads(response.read())
            self.used_at = time.monotonic()
            return status, answer
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.connection.close()  # reconnects on the next request
            return 0, {"error": {"message": f"{type(exc).__name__}: {exc}"}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_overhead(artifact: Path, port: int, model: str, rounds: int, max_tokens: int, threads: int) -> dict:
    runtime = open_runtime(artifact, threads=threads)
    client = Client(port)
    direct, served, mismatched = [], [], 0
    for i in range(rounds + 1):  # the first round warms both up and is not counted
        prompt = PROMPTS[i % len(PROMPTS)]
        begin = time.perf_counter()
        answer = runtime.generate([[{"role": "user", "content": prompt}]], max_tokens)[0][0]
        direct_s = time.perf_counter() - begin
        time.sleep(SETTLE_S)
        begin = time.perf_counter()
        status, body = client.ask(model, prompt, max_tokens)
        served_s = time.perf_counter() - begin
        if status != 200:
            raise SystemExit(f"the service answered {status}: {body}")
        mismatched += body["choices"][0]["message"]["content"] != answer
        time.sleep(SETTLE_S)
        if i:
            direct.append(direct_s)
            served.append(served_s)
    del runtime
    ratios = [s / d for s, d in zip(served, direct)]
    return {"rounds": rounds, "max_tokens": max_tokens,
            "direct_p50_s": statistics.median(direct), "service_p50_s": statistics.median(served),
            "overhead": statistics.median(served) / statistics.median(direct) - 1,
            "overhead_paired_median": statistics.median(ratios) - 1,
            "added_ms_p50": 1000 * (statistics.median(served) - statistics.median(direct)),
            "answers_differing_from_the_runtime": mismatched, "target_overhead": 0.10,
            "meets_target": statistics.median(served) / statistics.median(direct) - 1 <= 0.10}


def load(port: int, model: str, clients: int, duration_s: float, max_tokens: int, teacher: subprocess.Popen | None,
         teacher_every: int = 4) -> dict:
    records, lock = [], threading.Lock()
    begin = time.perf_counter()
    stop_at = begin + duration_s
    killed_at: list[float] = []

    def run(index: int) -> None:
        client, sent = Client(port), 0
        while time.perf_counter() < stop_at:
            ask_teacher = teacher is not None and (index + sent) % teacher_every == 0
            prompt = PROMPTS[(index + sent) % len(PROMPTS)]
            start_s = time.perf_counter()
            status, body = client.ask("teacher" if ask_teacher else model, prompt, max_tokens)
            end_s = time.perf_counter()
            sent += 1
            marker = body.get("x_edgedistill") or {}
            with lock:
                records.append({"status": status, "latency_s": end_s - start_s, "end_s": end_s - begin,
                                "asked_teacher": ask_teacher, "answered_by": marker.get("answered_by"),
                                "degraded": marker.get("degraded"),
                                "completion_tokens": (body.get("usage") or {}).get("completion_tokens"),
                                "error": body.get("error")})

    def kill_teacher() -> None:
        time.sleep(duration_s / 2)
        teacher.kill()
        teacher.wait()
        killed_at.append(time.perf_counter() - begin)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    if teacher is not None:
        threads.append(threading.Thread(target=kill_teacher))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - begin
    ok = [r for r in records if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    student_tokens = sum(r["completion_tokens"] or 0 for r in ok if r["answered_by"] == "student")
    result = {"clients": clients, "duration_s": duration_s, "elapsed_s": elapsed, "max_tokens": max_tokens,
              "requests": len(records), "failed": len(records) - len(ok),
              "failures": [{"status": r["status"], "error": r["error"]} for r in records if r["status"] != 200][:10],
              "latency_p50_s": percentile(latencies, 0.5) if ok else None,
              "latency_p95_s": percentile(latencies, 0.95) if ok else None,
              "latency_max_s": max(latencies) if ok else None,
              "requests_per_s": len(ok) / elapsed, "student_completion_tokens_per_s": student_tokens / elapsed}
    if teacher is not None:
        asked = [r for r in ok if r["asked_teacher"]]
        result["teacher"] = {
            "killed_at_s": killed_at[0] if killed_at else None, "requests_for_teacher": len(asked),
            "answered_by_teacher": sum(r["answered_by"] == "teacher" for r in asked),
            "answered_by_student_degraded": sum(r["answered_by"] == "student" and r["degraded"] for r in asked),
            "failed_requests_for_teacher": sum(r["asked_teacher"] and r["status"] != 200 for r in records)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact", help="the student: a GGUF file (Q4_K_M for the issue's target), ONNX folder, "
                                         "HF folder or built-in name")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    parser.add_argument("--overhead-rounds", type=int, default=16, help="one-client requests, each way")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="model threads, service and direct")
    parser.add_argument("--teacher-gguf", type=Path, help="serve this as the teacher endpoint, killed halfway")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    artifact = resolve_artifact(args.artifact)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    load_before = os.getloadavg()
    teacher = None
    command = [sys.executable, "-m", "edgedistill.cli", "serve", str(artifact), "--port", str(port),
               "--threads", str(args.threads), "--queue", str(max(32, 2 * args.clients)),
               "--max-tokens", str(max(args.max_tokens, 64))]
    if args.teacher_gguf is not None:
        teacher_port = free_port()
        teacher = start([sys.executable, "-m", "llama_cpp.server", "--model", str(args.teacher_gguf), "--port",
                         str(teacher_port), "--host", "127.0.0.1", "--n_ctx", "2048", "--n_threads", str(args.threads)],
                        f"http://127.0.0.1:{teacher_port}/v1/models", logs / "teacher.log", "llama_cpp.server")
        command += ["--teacher", f"http://127.0.0.1:{teacher_port}/v1"]
    service = start(command, f"{base}/health", logs / "serve.log", "edgedistill serve")
    try:
        model = json.loads(urllib.request.urlopen(f"{base}/v1/models").read())["data"][0]["id"]
        print(f"service up at {base} serving {model}; one client, alternating with the runtime ...", flush=True)
        overhead = measure_overhead(artifact, port, model, args.overhead_rounds, args.max_tokens, args.threads)
        print(f"overhead {overhead['overhead']:+.1%} (median {overhead['service_p50_s'] * 1000:.1f} ms served, "
              f"{overhead['direct_p50_s'] * 1000:.1f} ms direct); {args.clients} clients for {args.duration_s:g} s ...",
              flush=True)
        loaded = load(port, model, args.clients, args.duration_s, args.max_tokens, teacher)
        health = json.loads(urllib.request.urlopen(f"{base}/health").read())
    finally:
        service.terminate()
        service.wait(60)
        if teacher is not None and teacher.poll() is None:
            teacher.kill()
            teacher.wait()
    result = {"artifact": str(artifact), "artifact_bytes": artifact.stat().st_size if artifact.is_file() else None,
              "threads": args.threads, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                   "processor": platform.processor()},
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "overhead": overhead, "load": loaded, "health_after": health,
              "service_exit_code": service.returncode, "logs": str(logs)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{loaded['requests']} requests, {loaded['failed']} failed; p50 {loaded['latency_p50_s']:.2f} s, "
          f"p95 {loaded['latency_p95_s']:.2f} s; {loaded['requests_per_s']:.2f} requests/s, "
          f"{loaded['student_completion_tokens_per_s']:.1f} student tokens/s; wrote {args.json}")
    return 1 if loaded["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
