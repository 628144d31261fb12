"""Routing curves: the points of teacher calls against share of the teacher's score, and one
rule's choice on them. Kept apart from edgedistill.route, which runs models, so that the report
reads route.json's curves without loading a runtime.

    python -c "from edgedistill.route_curve import routing_curve; print(routing_curve([1, 0], [1, 1], [0.9, 0.1]))"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgedistill.evaluate.intervals import bootstrap_ratio


@dataclass(frozen=True)
class RoutePoint:
    threshold: float | None  # answers with a confidence below it go to the teacher (None: none go)
    teacher_calls: int
    teacher_call_share: float
    share_of_teacher: float | None
    low: float | None
    high: float | None


def routing_curve(student: list[float], teacher: list[float], confidences: list[float]) -> list[RoutePoint]:
    """One point per number of teacher calls, the least confident examples routed first."""
    n = len(student)
    order = np.argsort(np.asarray(confidences, dtype=float), kind="stable")
    sorted_conf = np.asarray(confidences, dtype=float)[order]
    routed = np.asarray(student, dtype=float).copy()
    points = []
    for k in range(n + 1):
        if k:
            routed[order[k - 1]] = teacher[order[k - 1]]
        if 0 < k < n and sorted_conf[k] == sorted_conf[k - 1]:
            continue  # no threshold sends the k-th of equal confidences without the next: no such point
        share = bootstrap_ratio(routed.tolist(), teacher)
        # "below the (k+1)-th confidence" sends exactly the k least confident
        threshold = None if k == 0 else float(sorted_conf[k]) if k < n else float(sorted_conf[-1]) + 1.0
        points.append(RoutePoint(threshold, k, round(k / n, 4), None if share.mean is None else round(share.mean, 4),
                                 None if share.low is None else round(share.low, 4),
                                 None if share.high is None else round(share.high, 4)))
    return points


def cheapest(points: list[RoutePoint], target: float) -> RoutePoint | None:
    return next((p for p in points if p.share_of_teacher is not None and p.share_of_teacher >= target), None)


def best_within(points: list[RoutePoint], budget: float) -> RoutePoint | None:
    """The point keeping the most of the teacher's score with at most `budget` of requests sent to it
    (the fewest calls among equals: the points come in order of calls)."""
    within = [p for p in points if p.share_of_teacher is not None and p.teacher_call_share <= budget]
    return max(within, key=lambda p: p.share_of_teacher, default=None)


def rule_point(points: list[RoutePoint], target: float, budget: float | None = None) -> RoutePoint | None:
    """One rule's choice on its curve: without `budget` the fewest calls that reach `target`, with it
    the most of the teacher's score within `budget` of calls; None when no point qualifies."""
    return cheapest(points, target) if budget is None else best_within(points, budget)
