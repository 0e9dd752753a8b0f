"""Numbers for reports and result files: the one home of number / CI formatting and of JSON-safe values.

* :func:`num` -- a float, or None when undefined (None, nan, inf), so JSON stays valid;
  :func:`as_float` the reverse (None -> nan) for arithmetic.
* :func:`json_safe` -- a JSON-ready copy of nested results (nan/inf -> None, numpy -> Python, Path -> str).
* :func:`rnd` -- a rounded table cell (None when undefined); :func:`fmt` -- fixed-point text ("n/a" when undefined).
* :func:`ci` -- "[lo, hi]" (None when an end is undefined); :func:`fmt_ci` -- "m [lo, hi]" ("n/a" without m).
* :func:`rule_value` -- the threshold of a stored locate config's selection rule.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def num(x) -> float | None:
    """float or None (None, nan and inf -> None, so the JSON stays valid)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def as_float(x) -> float:
    """float, with None -> nan (the inverse of :func:`num` for arithmetic on stored numbers)."""
    return float("nan") if x is None else float(x)


def json_safe(obj):
    """A JSON-safe copy: nan/inf -> None, numpy scalars/arrays -> Python, tuples -> lists, Paths -> str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return num(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _undefined(x) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def fmt(x, nd: int = 3) -> str:
    """``x`` with ``nd`` decimals; "n/a" when undefined."""
    return "n/a" if _undefined(x) else f"{x:.{nd}f}"


def rnd(x, nd: int = 4) -> float | None:
    """A rounded number for a report table cell (None when undefined)."""
    x = num(x)
    return None if x is None else round(x, nd)


def ci(lo, hi, nd: int = 3) -> str | None:
    """"[lo, hi]", or None when either end is undefined."""
    return None if num(lo) is None or num(hi) is None else f"[{lo:.{nd}f}, {hi:.{nd}f}]"


def fmt_ci(m, lo, hi, nd: int = 3) -> str:
    """"m [lo, hi]"; "m" when the interval is missing; "n/a" when ``m`` is undefined."""
    if _undefined(m):
        return "n/a"
    if lo is None or hi is None:
        return f"{m:.{nd}f}"
    return f"{m:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]"


def rule_value(locate_config: dict):
    """The threshold of the selection rule recorded in a locate config dict (sigma, top-k or kn_t)."""
    lc = locate_config
    return {"sigma": lc.get("sigma"), "sigma_layer": lc.get("sigma"), "topk": lc.get("topk"), "kn": lc.get("kn_t")}[lc["rule"]]


__all__ = ["num", "as_float", "json_safe", "fmt", "rnd", "ci", "fmt_ci", "rule_value"]
