"""Typer options derived from the stage config dataclasses: default and help text come from the config field
(``caploc.config.setting``), so the CLI, the TOML and the library share one source of defaults and help."""
from __future__ import annotations

from typing import Any

import typer

from ..config import default_of, field_of, help_of


def opt(cls, name: str, *flags: str, default: Any = ..., help: str | None = None, **kw) -> Any:
    """``typer.Option`` for setting ``name`` of config class ``cls``.

    ``default`` overrides the config's default only where the CLI must differ (say why at the call site); lists
    and tuples become comma-separated text options parsed by the verb (``--ks 0,2``)."""
    d = default_of(cls, name) if default is ... else default
    if isinstance(d, (list, tuple)):
        d = ",".join(str(x) for x in d)
    text = help if help is not None else help_of(cls, name)
    choices = field_of(cls, name).metadata.get("choices")
    if choices and "one of" not in text and "|" not in text:
        text = f"{text} One of: {', '.join(map(str, choices))}."
    return typer.Option(d, *flags, help=text, **kw)


def split_list(text: str | None, cast=str) -> list:
    """'a,b , c' -> ['a', 'b', 'c'] (cast applied to each item); None or '' -> []."""
    if text is None:
        return []
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]
