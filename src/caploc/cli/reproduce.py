"""``caploc reproduce CONFIG``: the whole study from one config file."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, console, print_table


@app.command()
def reproduce(
    config: str = typer.Argument(..., help="A study .toml file, or a built-in: quick | full | paper-llama2-7b | paper-gptj."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: [study].out of the config)."),
    only: Optional[str] = typer.Option(None, help="Comma-separated stages to run (others are left as they are)."),
    force: Optional[str] = typer.Option(None, help="Comma-separated stages to rerun even if cached."),
    check: bool = typer.Option(False, help="Only validate the config and print the resolved settings."),
):
    """Run every stage (cached and resumable per stage) and write one report with the paper-claim table."""
    import json

    from ..errors import CaplocError
    from ..reproduce import STAGES, load_study
    from ..reproduce import reproduce as run

    st = load_study(config, out=out)
    for opt, val in (("--only", only), ("--force", force)):
        for s in (val or "").split(","):
            if s and s not in STAGES:
                raise CaplocError(f"unknown stage {s!r} in {opt}; stages: {', '.join(STAGES)}")
    if check:
        console.print_json(json.dumps(st.sections))
        return
    res = run(st, only=[s for s in (only or "").split(",") if s] or None, force=[s for s in (force or "").split(",") if s],
              progress=lambda stage, what: console.print(f"[bold]{stage}[/]: {what}"))
    from rich.table import Table

    t = Table("paper claim", "paper", "ours", "verdict", title="Paper claims → our result", show_lines=True)
    for row in res["claims"]["rows"]:
        t.add_row(*[str(x) for x in row[:4]])
    print_table(t)
    console.print(f"report: {res['report']}\nmarkdown: {res['markdown']}\nmanifest: {res['manifest']}")
