"""Progress bars: silent when asked, an estimate of the total time after the first unit of a long loop."""
from __future__ import annotations

import logging

from caploc import progress


def test_estimate_is_logged_once_from_the_first_unit(monkeypatch, caplog):
    clock = iter([0.0, 40.0, 80.0, 120.0, 160.0] + [200.0] * 50)
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="caploc.progress")
    with progress.bar(4, "attribution", "sample", progress=False) as b:  # no bar: the estimate goes to the log
        for _ in range(4):
            b.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["attribution: about 2.7 min in all for 4 samples (40 s per sample)"]


def test_quiet_and_fmt():
    progress.set_quiet(True)
    try:
        assert not progress.enabled(True)
    finally:
        progress.set_quiet(False)
    assert progress.enabled(True) and not progress.enabled(False)
    assert [progress.fmt_seconds(s) for s in (5, 600, 7200)] == ["5 s", "10.0 min", "2.0 h"]
    assert list(progress.track([1, 2, 3], progress=False)) == [1, 2, 3]
