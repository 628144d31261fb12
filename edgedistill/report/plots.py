"""The report's plots as SVG text, to inline in report.html: quality vs size, quality vs speed
with the Pareto front, seconds per stage, and, when the run has route/route.json, the routing curve.

    python -c "from edgedistill.report.data import load_run; from edgedistill.report.plots import *; \
print(stage_times_svg(load_run('runs/tiny'))[:200])"

matplotlib draws on a bare `Figure` (no pyplot, no global state, no display). Text stays text
(`svg.fonttype: none`), so the artifact names in a plot are searchable, and the output is the same
bytes for the same run (fixed id salt per plot, no date), so a re-rendered report does not change.
"""

from __future__ import annotations

import io
import re
from edgedistill.report.data import BENCH_SOURCE, EVAL_SOURCE, ROUTE_SOURCE, RunData, pareto_front

FRONT_COLOR = "#d62728"
POINT_COLOR = "#1f77b4"
MUTED_COLOR = "#7f7f7f"
# one line per confidence rule of the routing plot
RULE_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")

# plot id -> (title, the JSON files and keys it is drawn from), for its caption
PLOTS = {
    "quality-vs-size": ("Quality vs file size",
                        f"from {BENCH_SOURCE}: file_mb; {EVAL_SOURCE}: task_score, share_of_reference, "
                        "reference.task_score"),
    "quality-vs-speed": ("Quality vs decode speed, Pareto front",
                         f"from {BENCH_SOURCE}: decode_tokens_per_s; {EVAL_SOURCE}: task_score, share_of_reference, "
                         "reference.task_score"),
    "stage-times": ("Seconds per stage", "from each stage's manifest.json: seconds"),
    "routing": ("Routing: share of the teacher's score against requests sent to the teacher",
                f"from {ROUTE_SOURCE}: curves.<rule>[].teacher_call_share, share_of_teacher, low, high; target; rule, "
                "teacher_call_share, share_of_teacher; student_score, teacher_score"),
}


def _figure(width_in: float = 7.0, height_in: float = 4.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    return fig, fig.subplots()


def _svg(fig, salt: str) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"edgedistill-{salt}", "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    # inline SVG needs neither the XML declaration nor the DOCTYPE
    svg = text[text.index("<svg"):]
    return re.sub(r"<svg ", f'<svg id="plot-{salt}" role="img" ', svg, count=1)


def _points(data: RunData, x_key: str) -> list[tuple[str, float, float]]:
    return [(row["artifact"], float(row[x_key]), float(row["task_score"])) for row in data.rows
            if isinstance(row.get(x_key), (int, float)) and isinstance(row.get("task_score"), (int, float))]


def _quality_axes(ax, data: RunData, x_label: str) -> None:
    ax.set_xlabel(x_label)
    ax.set_ylabel("task score (eval.json)")
    ax.grid(True, alpha=0.3)
    reference = (data.reference or {}).get("task_score")
    if isinstance(reference, (int, float)) and reference > 0:
        ax.axhline(reference, color=MUTED_COLOR, linestyle="--", linewidth=1,
                   label=f"teacher, PyTorch fp32 (reference): {reference:.3f}")
        share = ax.secondary_yaxis("right", functions=(lambda s: 100 * s / reference, lambda p: p * reference / 100))
        share.set_ylabel("% of teacher")


def _legend(fig, ax) -> None:
    # below the axes, where it hides no point and no label
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    ax.margins(x=0.12, y=0.08)  # room for the names of the outermost points


def _label(ax, points: list[tuple[str, float, float]]) -> None:
    """Name each point: left of it in the right quarter (so the name stays inside the axes), and
    below it when an already named point is close (so two names do not print over each other)."""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    named: list[tuple[float, float]] = []
    for name, x, y in points:
        u, v = (x - min(xs)) / x_span, (y - min(ys)) / y_span
        # a name is about a third of the axes wide
        crowded = any(abs(u - u2) < 0.4 and abs(v - v2) < 0.06 for u2, v2 in named)
        right = u > 0.75
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(-5 if right else 5, -12 if crowded else 5),
                    ha="right" if right else "left", fontsize=8)
        named.append((u, v))


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no artifact has both {what} and a task score", ha="center", va="center",
            transform=ax.transAxes)


def quality_vs_size_svg(data: RunData) -> str:
    fig, ax = _figure()
    points = _points(data, "file_mb")
    _quality_axes(ax, data, "file size, MB (bench.json file_mb)")
    if points:
        ax.scatter([p[1] for p in points], [p[2] for p in points], color=POINT_COLOR, zorder=3, label="artifact")
        _label(ax, points)
        _legend(fig, ax)
    else:
        _empty(ax, "a file size")
    return _svg(fig, "quality-vs-size")


def quality_vs_speed_svg(data: RunData) -> str:
    fig, ax = _figure()
    points = _points(data, "decode_tokens_per_s")
    _quality_axes(ax, data, "decode tokens/s (bench.json decode_tokens_per_s)")
    if points:
        on_front = pareto_front([(quality, speed) for _, speed, quality in points])
        front = sorted((p for p, keep in zip(points, on_front) if keep), key=lambda p: p[1])
        dominated = [p for p, keep in zip(points, on_front) if not keep]
        # the edge of what the front dominates: each point's quality holds up to its speed
        ax.step([p[1] for p in front], [p[2] for p in front], where="pre", color=FRONT_COLOR, alpha=0.5, zorder=2)
        ax.scatter([p[1] for p in front], [p[2] for p in front], color=FRONT_COLOR, s=45, zorder=3,
                   label="Pareto front: no artifact both faster and better")
        if dominated:
            ax.scatter([p[1] for p in dominated], [p[2] for p in dominated], facecolors="none",
                       edgecolors=MUTED_COLOR, s=45, zorder=3, label="dominated")
        _label(ax, points)
        _legend(fig, ax)
    else:
        _empty(ax, "a decode speed")
    return _svg(fig, "quality-vs-speed")


def stage_times_svg(data: RunData) -> str:
    stages = data.stage_seconds
    fig, ax = _figure(height_in=max(2.0, 0.9 + 0.32 * len(stages)))
    ax.set_xlabel("seconds (manifest.json seconds)")
    if stages:
        bars = ax.barh([name for name, _ in stages], [seconds for _, seconds in stages], color=POINT_COLOR)
        ax.bar_label(bars, labels=[f"{seconds:.1f} s" for _, seconds in stages], padding=3, fontsize=8)
        ax.invert_yaxis()  # run order, top to bottom
        ax.margins(x=0.15)
    else:
        ax.text(0.5, 0.5, "no stage manifest found", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig, "stage-times")


def routing_svg(data: RunData) -> str:
    """Per confidence rule, the share of the teacher's score against the share of requests sent to it
    (the chosen rule with its 95% band), random routing's line, the target and the chosen point."""
    route = data.route or {}
    fig, ax = _figure()
    ax.set_xlabel("requests sent to the teacher, % (route.json teacher_call_share)")
    ax.set_ylabel("% of the teacher's task score (share_of_teacher)")
    ax.grid(True, alpha=0.3)
    for color, (rule, curve) in zip(RULE_COLORS * 4, route.get("curves", {}).items()):
        points = [p for p in curve if p["share_of_teacher"] is not None]
        xs = [100 * p["teacher_call_share"] for p in points]
        chosen = rule == route["rule"]
        ax.plot(xs, [100 * p["share_of_teacher"] for p in points], color=color, linewidth=2 if chosen else 1.2,
                label=f"rule {rule}" + (" (chosen)" if chosen else ""), zorder=3 if chosen else 2)
        if chosen and all(p["low"] is not None for p in points):
            ax.fill_between(xs, [100 * p["low"] for p in points], [100 * p["high"] for p in points], color=color,
                            alpha=0.15, linewidth=0, label=f"rule {rule}: 95% interval")
    if route.get("teacher_score"):
        # random routing: each teacher call replaces an average student answer by an average teacher one
        ax.plot([0, 100], [100 * route["student_score"] / route["teacher_score"], 100], color=MUTED_COLOR,
                linestyle="--", linewidth=1, label="random routing (expected)")
    if route.get("target") is not None:
        ax.axhline(100 * route["target"], color=MUTED_COLOR, linestyle=":", linewidth=1.2,
                   label=f"target: {100 * route['target']:g}% of the teacher's score")
    if route.get("share_of_teacher") is not None:
        x, y = 100 * route["teacher_call_share"], 100 * route["share_of_teacher"]
        below = "none" if route["threshold"] is None else f"below {route['threshold']:.3g}"
        ax.scatter([x], [y], marker="*", s=160, color=FRONT_COLOR, zorder=4,
                   label=f"chosen: {route['rule']} {below}, {x:.1f}% of requests, {y:.1f}%")
        _legend(fig, ax)
    else:
        ax.text(0.5, 0.5, "the teacher scores 0: no share of its score to plot", ha="center", va="center",
                transform=ax.transAxes)
    return _svg(fig, "routing")


def all_plots(data: RunData) -> dict[str, tuple[str, str, str]]:
    """Plot id -> (title, source line, SVG text), in the order the report shows them."""
    svgs = {"quality-vs-size": quality_vs_size_svg(data), "quality-vs-speed": quality_vs_speed_svg(data),
            "stage-times": stage_times_svg(data), **({"routing": routing_svg(data)} if data.route else {})}
    return {plot_id: (*PLOTS[plot_id], svg) for plot_id, svg in svgs.items()}
