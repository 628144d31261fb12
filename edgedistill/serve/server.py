"""`edgedistill serve`: open the artifact (and a local teacher), check where it listens, run uvicorn.

    edgedistill serve runs/sentiment/export/student-q4_k_m.gguf --port 8000
    edgedistill serve student.gguf --teacher teacher.gguf --plan     # the teacher plans, the student answers
    EDGEDISTILL_API_KEY=$(openssl rand -hex 24) edgedistill serve model.gguf --host 0.0.0.0

Loopback needs no key (a key in EDGEDISTILL_API_KEY is still required when set); any other
address refuses to start without one, since the service would answer anyone who reaches the port.
uvicorn handles SIGINT and SIGTERM: it stops accepting connections, lets the requests in flight
finish for up to GRACE_S, then the models' worker threads stop.
"""

from __future__ import annotations

import os
import signal
import socket
from contextlib import contextmanager
from pathlib import Path

from edgedistill.errors import EdgedistillError
from edgedistill.recipe import is_loopback
from edgedistill.runtimes import open_runtime, resolve_artifact
from edgedistill.serve.app import ServeSettings, create_app
from edgedistill.serve.queue import ModelQueue
from edgedistill.serve.plan import Planner
from edgedistill.serve.router import ConfidenceRouter, PlanRouter
from edgedistill.serve.teacher import EndpointTeacher, LocalTeacher, Teacher

API_KEY_ENV = "EDGEDISTILL_API_KEY"
GRACE_S = 10  # seconds in-flight requests may take to finish after SIGINT/SIGTERM
TEACHER_NAME = "teacher"


def served_name(spec: str) -> str:
    """The model id clients send: the artifact's file or folder name (a built-in name as given)."""
    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else (path.name or str(spec))


def check_listen(host: str, port: int) -> str | None:
    """The API key the service requires (None: none); refuses a non-loopback host without one and an
    address already in use, before any model is loaded."""
    api_key = os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and api_key is None:
        raise EdgedistillError(f"--host {host} is not a loopback address, and {API_KEY_ENV} is not set: the service "
                               "would answer anyone who can reach this port",
                               f"export {API_KEY_ENV}=<a long random secret> (clients send it as their API key, "
                               "'Authorization: Bearer <key>'), or serve on 127.0.0.1")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise EdgedistillError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                                   "choose another --port, or stop what is using this one") from None
    return api_key


def open_teacher(spec: str, *, settings: ServeSettings, model: str | None, threads: int | None, device: str,
                 dtype: str) -> Teacher:
    """An http(s) URL is an endpoint; anything else a local artifact opened in its runtime."""
    if spec.startswith(("http://", "https://")):
        return EndpointTeacher(spec, model=model, max_tokens=settings.max_tokens)
    if model is not None:
        raise EdgedistillError("--teacher-model names the model an endpoint serves",
                               f"leave it out for the local teacher {spec}")
    runtime = open_runtime(resolve_artifact(spec), threads=threads, device=device, dtype=dtype)
    return LocalTeacher(ModelQueue(runtime, name=TEACHER_NAME, max_waiting=settings.max_waiting,
                                   max_tokens=settings.max_tokens), spec)


def _graceful_server(config):
    """uvicorn's Server, except that after a graceful stop on SIGINT/SIGTERM it does not raise the
    signal again (uvicorn does, so that the process dies of it): the command prints that it stopped
    and exits 0, and a Ctrl-C is not taken for an interrupted run."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)

    return GracefulServer(config)


def serve(artifact: str, *, host: str = "127.0.0.1", port: int = 8000, teacher: str | None = None,
          teacher_model: str | None = None, route: Path | None = None, plan: Planner | None = None,
          settings: ServeSettings = ServeSettings(), threads: int | None = None, device: str = "cpu",
          dtype: str = "fp32", log_level: str = "info") -> None:
    """Serve `artifact` until SIGINT/SIGTERM; `plan`: the teacher plans every request for the served name."""
    import uvicorn

    router = None
    if route is not None and plan is not None:
        raise EdgedistillError("--route and --plan are two routing modes; the service runs one",
                               "leave out --route (the teacher plans every request) or --plan (the teacher answers "
                               "the requests the student is unsure of)")
    for flag, given in (("--route", route), ("--plan", plan)):
        if given is not None and teacher is None:
            raise EdgedistillError(f"{flag} asks the teacher, but no --teacher is given",
                                   "add --teacher URL (an OpenAI-compatible endpoint) or a local model path")
    if route is not None:
        router = ConfidenceRouter(route)
    if plan is not None:
        if plan.max_tokens > settings.max_tokens:
            raise EdgedistillError(f"--plan-max-tokens {plan.max_tokens} is over --max-tokens {settings.max_tokens}, "
                                   "the most any answer may take", "lower --plan-max-tokens or raise --max-tokens")
        router = PlanRouter(plan)
    api_key = check_listen(host, port)
    path = resolve_artifact(artifact)
    print(f"loading {path} ...", flush=True)
    student = open_runtime(path, threads=threads, device=device, dtype=dtype)
    teacher_backend = None
    if teacher is not None:
        teacher_backend = open_teacher(teacher, settings=settings, model=teacher_model, threads=threads, device=device,
                                       dtype=dtype)
    name = served_name(artifact)
    app = create_app(student, name=name, settings=settings, teacher=teacher_backend, api_key=api_key,
                     artifact=str(path), router=router)
    where = f"[{host}]" if ":" in host else host
    print(f"serving {name} at http://{where}:{port}/v1 (model ids: {name}, student"
          + (f", teacher → {teacher}" if teacher else "") + ")"
          + (f"; {name}: the teacher plans ({plan.prompt.name}, at most {plan.max_tokens} tokens), the student "
             "answers" if plan else "") + ("; API key required" if api_key else ""), flush=True)
    _graceful_server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                    timeout_graceful_shutdown=GRACE_S)).run()
    print("stopped", flush=True)
