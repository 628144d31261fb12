"""Who answers a request that leaves the choice to the service: the one place that decides between
the student and the teacher.

    edgedistill serve model.gguf --teacher http://127.0.0.1:8080/v1    # model "teacher" asks for it

A request names a model: "student" or "teacher" choose directly; the served name (the artifact's,
listed first by /v1/models) or no model at all leave it to the router. `ExplicitRouter` always
chooses the student there. `ConfidenceRouter` (`--route route.json`, from `edgedistill route`)
chooses ROUTED: the student answers first, its confidence in that answer is computed the way the
calibration computed it (edgedistill.route.confidence: label margin, or a quantile of its answer's
token log-probs), and below route.json's threshold the request goes to the teacher; when the
teacher cannot answer, the student's answer is returned, marked degraded. `PlanRouter` (`--plan`)
chooses PLAN: the teacher writes a short plan and the student answers following it (serve.plan);
such an answer is marked PLANNED ("student+teacher-plan"), and the student's own, degraded, when
the teacher cannot plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

from edgedistill.route import confidence, read_route
from edgedistill.runtimes import Runtime
from edgedistill.serve.plan import Planner
from edgedistill.serve.protocol import ChatRequest

Who = Literal["student", "teacher", "routed", "plan"]
STUDENT: Who = "student"
TEACHER: Who = "teacher"
ROUTED: Who = "routed"  # the student first; the teacher when the student's confidence is below the threshold
PLAN: Who = "plan"  # the teacher's plan, then the student's answer following it
PLANNED = "student+teacher-plan"  # who answered a PLAN request, as responses and /health say it


class Router(Protocol):
    def choose(self, request: ChatRequest) -> Who:
        """Who answers `request`, which named the served model or none."""


class ExplicitRouter:
    """The teacher only when a request names it; everything else the student answers."""

    def choose(self, request: ChatRequest) -> Who:
        return STUDENT


class ConfidenceRouter:
    """route.json's rule and threshold (module docstring)."""

    def __init__(self, path: Path):
        route = read_route(path)
        self.rule, self.threshold, self.choices = route["rule"], route["threshold"], route.get("choices")
        self.calibrated_on = route.get("artifact")

    def choose(self, request: ChatRequest) -> Who:
        # a threshold of None: the student alone reached the target, nothing is ever deferred
        return STUDENT if self.threshold is None else ROUTED

    def confidence(self, runtime: Runtime, messages: list[dict[str, str]], answer: str) -> float:
        """The student's confidence in `answer`; called on the student's worker thread."""
        return confidence(runtime, messages, answer, self.rule, self.choices)

    def defers(self, value: float) -> bool:
        return self.threshold is not None and value < self.threshold


class PlanRouter:
    """Every request that leaves the choice to the service is planned by the teacher (module docstring)."""

    def __init__(self, planner: Planner):
        self.planner = planner

    def choose(self, request: ChatRequest) -> Who:
        return PLAN
