"""report.html: report.md's tables plus three plots (four with the routing curve), in one self-contained file.

    edgedistill report runs/tiny && chromium runs/tiny/report.html

The plots are inline SVG and the style is inline CSS: the file opens offline, fetches nothing, and
its Content-Security-Policy forbids it to (no scripts, no external fonts, images or styles).
"""

from __future__ import annotations

import html
import re

from edgedistill.report.data import RunData
from edgedistill.report.plots import all_plots
from edgedistill.report.tables import (Table, artifact_table, measurement_note, merge_note, noise_note, pareto_note,
                                       route_note, route_table, scorer_table, sources_table, stage_table, summary,
                                       target_note, target_table, training_tables)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 72rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #f2f2f2; }
td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 0.85rem; }
.source { color: #555; font-size: 0.85rem; margin-top: 0.1rem; }
figure { margin: 1.5rem 0; }
figure svg { max-width: 100%; height: auto; }
figcaption { font-weight: 600; }
"""
# Everything is in the file: a report that fetched anything would not open offline.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def inline(text: str) -> str:
    """Escape text and turn its inline Markdown (`code`, **bold**) into HTML."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


def html_table(table: Table) -> list[str]:
    head = "".join(f"<th>{inline(cell)}</th>" for cell in table.header)
    body = ["<tr>" + "".join(f"<td>{inline(cell)}</td>" for cell in row) + "</tr>" for row in table.rows]
    return [f'<table id="{table.id}">', f"<thead><tr>{head}</tr></thead>", "<tbody>", *body, "</tbody>", "</table>"]


def _section(table: Table, *notes: str) -> list[str]:
    lines = [f'<h2 id="{table.id}-title">{inline(table.title)}</h2>', *html_table(table),
             f'<p class="source">{inline(table.source)}</p>']
    return lines + [f"<p>{inline(note)}</p>" for note in notes if note]


def render_html(data: RunData) -> str:
    title = f"edgedistill report: {data.name}"
    lines = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             f"<h1>{html.escape(title)}</h1>"]
    lines += [f"<p>{inline(sentence)}</p>" for sentence in summary(data)]
    lines += _section(artifact_table(data), measurement_note(data), noise_note(data), pareto_note(data))
    scorers = scorer_table(data)
    if scorers is not None:
        lines += _section(scorers)
    target = target_table(data)
    if target is not None:
        lines += _section(target, target_note(data))
    routing = route_table(data)
    if routing is not None:
        lines += _section(routing, route_note(data))
    lines += ['<h2 id="plots-title">Plots</h2>']
    for plot_id, (plot_title, source, svg) in all_plots(data).items():
        lines += [f'<figure id="{plot_id}">', f"<figcaption>{inline(plot_title)}</figcaption>", svg,
                  f'<p class="source">{inline(source)}</p>', "</figure>"]
    for table in training_tables(data):
        lines += _section(table)
    note = merge_note(data)
    if note:
        lines += [f"<p>{inline(note)}</p>"]
    lines += _section(stage_table(data))
    lines += _section(sources_table(data))
    lines += ["</body>", "</html>", ""]
    return "\n".join(lines)
