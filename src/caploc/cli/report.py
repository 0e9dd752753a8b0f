"""``caploc report``: one self-contained HTML page (+ Markdown + JSON) from any caploc result directories."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import app, console


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Result directories (searched recursively for report.json and locate results)."),
    out: Path = typer.Option(Path("runs/report"), help="Output directory for report.html, report.md (+ figures/) and report_data.json. Files there that no "
                                                  "earlier caploc report wrote are never overwritten or deleted."),
    title: Optional[str] = typer.Option(None, help="Report title (default: 'caploc report')."),
    strict: bool = typer.Option(False, help="Fail on a missing figure file instead of showing a placeholder."),
):
    """Assemble result directories into one report: claims overview, then one section per result in pipeline order."""
    from ..report import build_report

    with console.status("building report ...", spinner="dots"):
        paths = build_report(run_dirs, out, title=title, strict=strict)
    console.print(f"html: {paths.html}", highlight=False, soft_wrap=True)
    console.print(f"md:   {paths.md}", highlight=False, soft_wrap=True)
    console.print(f"json: {paths.json}", highlight=False, soft_wrap=True)
