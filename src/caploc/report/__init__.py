"""``caploc report``: assemble result directories into one self-contained HTML page, Markdown and JSON.

* ``build_report(run_dirs, out, title=None, strict=False) -> ReportPaths(html, md, json)``
* ``register_renderer(kind, fn, marker=None)``: add a renderer that draws figures/tables for a result kind.
* ``caploc.report.registry``: the renderer registry (``RENDERERS``, ``MARKERS``); ``caploc.report.<stage>``: each
  stage's report.json dict and figures; ``caploc.report.fmt``: number / CI formatting and JSON-safe values.
* ``caploc.report.figures``: consistent, deterministic PNG helpers for every stage (heatmap, curves, bars_with_ci,
  per_layer_bars, count_histogram, null_histogram).
"""
from __future__ import annotations

from .build import ReportPaths, build_report, discover
from .registry import RENDERERS, register_renderer

__all__ = ["build_report", "ReportPaths", "register_renderer", "RENDERERS", "discover"]
