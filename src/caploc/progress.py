"""Progress bars with an ETA for every loop a user waits on (tqdm), and one switch to silence them.

Bars go to stderr and show only when stderr is a terminal, unless a caller forces them (``progress=True``) or the CLI's
``--quiet`` (:func:`set_quiet`) turns them off. After the first unit of a long loop (projected over
:data:`ESTIMATE_AFTER_S` seconds) the estimated total time is written once above the bar, or logged when no bar is
shown, so a user knows at once whether to wait or to change the settings.
"""
from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ESTIMATE_AFTER_S = 30.0
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar off (``caploc --quiet``) or back to the default."""
    global _quiet
    _quiet = bool(quiet)


def enabled(progress: bool | None = None) -> bool:
    if _quiet or progress is False:
        return False
    return True if progress else bool(getattr(sys.stderr, "isatty", lambda: False)())


def fmt_seconds(s: float) -> str:
    s = max(0.0, float(s))
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Bar(tqdm):
    """tqdm with a one-time total-time estimate after the first unit of work."""

    def __init__(self, *args, **kw):
        self._what = (kw.get("desc") or "work", kw.get("unit") or "it", kw.get("total"))
        self._t_start = time.perf_counter()
        self._estimated = False
        self._done = 0  # counted here too: a disabled tqdm does not count
        super().__init__(*args, **kw)

    def update(self, n=1):
        out = super().update(n)
        self._done += n
        desc, unit, n_total = self._what
        if not self._estimated and n_total and self._done:
            self._estimated = True
            spent = time.perf_counter() - self._t_start
            total = spent * n_total / self._done
            if total > ESTIMATE_AFTER_S:
                msg = (f"{desc}: about {fmt_seconds(total)} in all for {n_total} {unit}s "
                       f"({fmt_seconds(spent / self._done)} per {unit})")
                if self.disable:
                    log.info(msg)
                else:
                    self.write(msg, file=sys.stderr)
        return out


def bar(total: int | None = None, desc: str = "", unit: str = "it", progress: bool | None = None, **kw) -> Bar:
    """A progress bar over ``total`` units (use as a context manager, call ``.update(n)``)."""
    return Bar(total=total, desc=desc, unit=unit, leave=False, disable=not enabled(progress), dynamic_ncols=True, **kw)


def track(iterable, desc: str = "", total: int | None = None, unit: str = "it", progress: bool | None = None):
    """Iterate ``iterable`` with a progress bar labelled ``desc`` (``total`` defaults to ``len(iterable)``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with bar(total, desc, unit, progress) as b:
        for x in iterable:
            yield x
            b.update(1)


__all__ = ["bar", "track", "set_quiet", "enabled", "fmt_seconds", "Bar", "ESTIMATE_AFTER_S"]
