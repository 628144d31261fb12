"""report.md: size, speed and quality per artifact, training curves, stage times and sources.

    edgedistill report runs/tiny && cat runs/tiny/report.md

Every number comes from a JSON file of the run (bench/bench.json, eval/eval.json, the stages'
manifest.json), named under each table and listed with its sha256 under "Sources", so it can be
traced and re-measured with `edgedistill bench` and `edgedistill eval`. The plots are in
report.html (report/html.py), which shows the same tables.
"""

from __future__ import annotations

from edgedistill.report.data import RunData
from edgedistill.report.tables import (Table, artifact_table, measurement_note, merge_note, noise_note, pareto_note,
                                       route_note, route_table, scorer_table, sources_table, stage_table, summary,
                                       target_note, target_table, training_tables)


def markdown_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(table.header) + " |", "|" + "|".join("---" for _ in table.header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in table.rows]


def _section(table: Table, *notes: str) -> list[str]:
    lines = [f"## {table.title}", "", *markdown_table(table), "", f"Source: {table.source}.", ""]
    return lines + [line for note in notes if note for line in (note, "")]


def render_markdown(data: RunData) -> str:
    lines = [f"# edgedistill report: {data.name}", ""]
    lines += [line for sentence in summary(data) for line in (sentence, "")]
    lines += _section(artifact_table(data), measurement_note(data), noise_note(data), pareto_note(data),
                      "Plots of quality against file size and decode speed, and of the stage times: `report.html`.")
    scorers = scorer_table(data)
    if scorers is not None:
        lines += _section(scorers)
    target = target_table(data)
    if target is not None:
        lines += _section(target, target_note(data))
    routing = route_table(data)
    if routing is not None:
        lines += _section(routing, route_note(data))
    for table in training_tables(data):
        lines += _section(table)
    note = merge_note(data)
    if note:
        lines += [note, ""]
    lines += _section(stage_table(data))
    lines += _section(sources_table(data))
    return "\n".join(lines)
