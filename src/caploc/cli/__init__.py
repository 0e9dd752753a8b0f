"""The ``caploc`` command line: a thin layer over one library function per verb.

Only the CLI prints; the library logs. Errors caused by the user's input are shown as one line (no traceback).
Each verb lives in its own module and registers itself on ``app`` when imported here.
"""
from __future__ import annotations

import sys

from . import (  # noqa: F401  (imported for their commands)
    audit,
    contrast,
    decouple,
    evaluate,
    faithfulness,
    finetune,
    intervene,
    locate,
    report,
    reproduce,
    stability,
)
from .app import app, run
from .options import fill_missing_help

fill_missing_help(app)

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> int:
    return run(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
