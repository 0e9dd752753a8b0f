"""The ``caploc`` command line: a thin layer over one library function per verb.

Only the CLI prints; the library logs. Errors caused by the user's input are shown as one line (no traceback).
"""
from __future__ import annotations

import importlib
import sys

from .app import app

# each verb lives in its own module and registers itself on ``app``
_VERB_MODULES = ["locate", "stability", "finetune", "report", "contrast", "audit", "evaluate", "intervene", "decouple", "reproduce"]
_VERB_MODULES += ["faithfulness"]  # faithfulness, learn-mask, fidelity, stability-gap
for _m in _VERB_MODULES:
    importlib.import_module(f"{__name__}.{_m}")


def main(argv: list[str] | None = None) -> int:
    from .app import run

    return run(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
