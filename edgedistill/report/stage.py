"""The report stage of `edgedistill run`, and `edgedistill report RUN`: report.md and report.html.

    edgedistill run recipes/tiny.yaml --out runs/tiny     # the last stage writes runs/tiny/report/
    edgedistill report runs/tiny                          # renders runs/tiny/report.{md,html} again

Both read only the run's JSON files (data.py), so a report can be rendered again at any time
without re-running a stage.
"""

from __future__ import annotations

from pathlib import Path

from edgedistill.recipe import Recipe
from edgedistill.report.data import RunData, load_run
from edgedistill.report.html import render_html
from edgedistill.report.markdown import render_markdown

REPORT_FILES = ("report.md", "report.html")


def write_report(data: RunData, out: Path) -> list[Path]:
    """Write report.md and report.html into `out` (created if missing); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.md", out / "report.html"]
    written[0].write_text(render_markdown(data), encoding="utf-8")
    written[1].write_text(render_html(data), encoding="utf-8")
    return written


def report_stage(recipe: Recipe, out: Path, **stages: Path) -> dict:
    run_dir = next(iter(stages.values())).parent
    write_report(load_run(run_dir, list(stages), name=recipe.name, teacher_source=recipe.teacher.source), out)
    return {}
