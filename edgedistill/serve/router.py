"""Who answers a request that leaves the choice to the service: the one place that decides between
the student and the teacher.

    edgedistill serve model.gguf --teacher http://127.0.0.1:8080/v1    # model "teacher" asks for it

A request names a model: "student" or "teacher" choose directly; the served name (the artifact's,
listed first by /v1/models) or no model at all leave it to the router. `ExplicitRouter`, the only
one so far, always chooses the student there. The confidence router of issue 17 (route.json: the
student answers first and defers when its token log-probs say it is unsure) and plan-and-execute
(the teacher plans, the student answers) are to be routers behind this same `choose`, each with
what it needs from the student's answer.
"""

from __future__ import annotations

from typing import Literal, Protocol

from edgedistill.serve.protocol import ChatRequest

Who = Literal["student", "teacher"]
STUDENT: Who = "student"
TEACHER: Who = "teacher"


class Router(Protocol):
    def choose(self, request: ChatRequest) -> Who:
        """Who answers `request`, which named the served model or none."""


class ExplicitRouter:
    """The teacher only when a request names it; everything else the student answers."""

    def choose(self, request: ChatRequest) -> Who:
        return STUDENT
