"""Which renderer draws which result kind: the registry that :mod:`caploc.report.build` consults and that renderer
modules (such as :mod:`caploc.report.locate`) fill, kept apart so neither imports the other's internals."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

Renderer = Callable[[Path, "dict | None", Path], dict]

RENDERERS: dict[str, Renderer] = {}
# marker file name -> (the JSON "kind" it must hold, report kind whose renderer draws it)
MARKERS: dict[str, tuple[str, str]] = {}


def register_renderer(kind: str, fn: Renderer, marker: tuple[str, str] | None = None) -> None:
    """Render sections of ``kind`` with ``fn``; ``marker=(file_name, json_kind)`` also renders directories that have
    no report.json but hold ``file_name`` whose JSON ``"kind"`` is ``json_kind``."""
    RENDERERS[kind] = fn
    if marker is not None:
        MARKERS[marker[0]] = (marker[1], kind)


__all__ = ["Renderer", "RENDERERS", "MARKERS", "register_renderer"]
