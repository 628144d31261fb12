"""The report stage of `edgedistill run`, and `edgedistill report RUN`: report.md and report.html.

    edgedistill run recipes/tiny.yaml --out runs/tiny     # the last stage writes runs/tiny/report/
    edgedistill report runs/tiny                          # renders runs/tiny/report.{md,html} again

Both read only the stage folders' JSON files (data.py), so a report can be rendered again at any
time without re-running a stage. The stage reads exactly the folders it is given as inputs.
"""

from __future__ import annotations

from pathlib import Path

from edgedistill.layout import REPORT_HTML, REPORT_MD
from edgedistill.recipe import Recipe
from edgedistill.report.data import RunData, load_stages
from edgedistill.report.html import render_html
from edgedistill.report.markdown import render_markdown


def write_report(data: RunData, out: Path) -> list[Path]:
    """Write report.md and report.html into `out` (created if missing); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / REPORT_MD, out / REPORT_HTML]
    written[0].write_text(render_markdown(data), encoding="utf-8")
    written[1].write_text(render_html(data), encoding="utf-8")
    return written


def report_stage(recipe: Recipe, out: Path, **stages: Path) -> dict:
    write_report(load_stages(stages, name=recipe.name, teacher_source=recipe.teacher.source), out)
    return {}
