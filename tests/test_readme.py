"""The README's notebook example runs as written (real default model, small sizes) and shows what it says."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- notebook-example:start -->\s*```python\n(.*?)```\s*<!-- notebook-example:end -->", text, re.S)
    assert m, "README lost its notebook example"
    return m.group(1)


@pytest.mark.real
def test_readme_notebook_example_runs():
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(_example(), "README.md", "exec"), scope)
    printed = out.getvalue()
    assert printed.startswith("Localization(") and "neurons of 30 layers x 1536" in printed
    assert "Interventions(2 datasets, 20 random sets" in printed and "erase_beats_random" in printed
    assert len(scope["loc"]) > 0 and list(scope["iv"].to_pandas()["dataset"].unique()) == ["on-target", "facts"]


def test_readme_example_is_found():
    assert "caploc.locate(" in _example()
