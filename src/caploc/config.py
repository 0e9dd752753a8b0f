"""Settings: one config dataclass per stage is the single source of defaults, validation and help text.

A stage's config is a ``@dataclass`` whose fields are declared with :func:`setting`::

    @dataclass
    class StabilityConfig:
        k: int = setting(2, help="Disjoint splits per seed.", min=2)
        kinds: list[str] = setting(default_factory=lambda: ["random", "group"], help="...", choices=("random", "group"))

        def __post_init__(self):
            check(self)  # types, finiteness, ranges and choices of every field, one-line CaplocError naming the field

The CLI takes default and help of an option from the same field (``cli.options.opt(StabilityConfig, "k")``) and the
study TOML is parsed into the same classes by :func:`from_mapping`, so a default, a range or a help text is written
once. Cross-field rules stay in the class's ``__post_init__`` after ``check(self)``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from .errors import CaplocError

_MISSING = dataclasses.MISSING


def setting(default: Any = _MISSING, *, help: str, default_factory: Any = _MISSING, choices=None, min=None, max=None,
            min_exclusive: bool = False, optional: bool | None = None, item: type | None = None):
    """A config field with its help text and constraints (checked by :func:`check`).

    ``min``/``max`` bound numbers (and every item of a list of numbers); ``choices`` restricts strings (or every item
    of a list); ``optional`` allows None (default: True when the default is None); ``item`` is the type of list items.
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "min_exclusive": min_exclusive, "item": item,
            "optional": (default is None) if optional is None else optional}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields_of(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def field_of(cls, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def default_of(cls, name: str) -> Any:
    f = field_of(cls, name)
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__}.{name} has no default")


def help_of(cls, name: str) -> str:
    return field_of(cls, name).metadata.get("help", "")


def _kind(default: Any) -> type | None:
    for t in (bool, int, float, str, list, tuple, dict):
        if isinstance(default, t):
            return t
    return None


def _check_value(label: str, value: Any, kind: type | None, meta: Mapping) -> Any:
    """Check one value against its kind and constraints; returns the value (ints widened to float, tuples to lists
    where the default is a list)."""
    if value is None:
        if meta.get("optional"):
            return None
        raise CaplocError(f"{label} must be set (got None)")
    if kind is bool:
        if not isinstance(value, bool):
            raise CaplocError(f"{label} must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CaplocError(f"{label} must be a number, got {value!r}")
        if kind is int and not isinstance(value, int):
            if not float(value).is_integer():
                raise CaplocError(f"{label} must be a whole number, got {value!r}")
            value = int(value)
        if not math.isfinite(value):
            raise CaplocError(f"{label} must be a finite number, got {value!r}")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo):
            raise CaplocError(f"{label} must be {'>' if meta.get('min_exclusive') else '>='} {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise CaplocError(f"{label} must be <= {hi}, got {value!r}")
        return float(value) if kind is float else value
    if kind is str:
        if not isinstance(value, str):
            raise CaplocError(f"{label} must be text, got {value!r}")
        ch = meta.get("choices")
        if ch and value not in ch:
            raise CaplocError(f"{label} must be one of {', '.join(map(str, ch))}; got {value!r}")
        return value
    if kind in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise CaplocError(f"{label} must be a list, got {value!r}")
        item = meta.get("item")
        sub = {**meta, "optional": False}
        out = [_check_value(f"{label}[{i}]", v, item or _kind(v), sub) for i, v in enumerate(value)]
        return type(value)(out) if isinstance(value, tuple) else out
    return value


def _declared_kind(f: dataclasses.Field) -> type | None:
    """The kind a field's annotation names (``int | None`` -> int), for fields whose default is None."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    words = set(t.replace("|", " ").replace("[", " ").replace("]", " ").replace(",", " ").split())
    for kind in (bool, int, float, str, list, tuple, dict):
        if kind.__name__ in words:
            return kind
    return None


def check(obj) -> None:
    """Validate every :func:`setting` field of a config dataclass instance in place (one-line errors)."""
    name = type(obj).__name__
    for f in dataclasses.fields(obj):
        if "help" not in f.metadata:
            continue
        value = getattr(obj, f.name)
        try:
            default = default_of(type(obj), f.name)
        except KeyError:
            default = value
        kind = _kind(default) if default is not None else _declared_kind(f) or _kind(value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            kind = float
        checked = _check_value(f"{name}.{f.name}", value, kind, f.metadata)
        object.__setattr__(obj, f.name, checked)


def from_mapping(cls, data: Mapping | None, where: str = ""):
    """Build ``cls`` from a TOML table / dict: unknown keys, wrong types and bad values give one-line errors that name
    the section. Nested config dataclass fields take a nested table."""
    data = dict(data or {})
    known = {f.name: f for f in fields_of(cls)}
    bad = sorted(set(data) - set(known))
    if bad:
        raise CaplocError(f"unknown key '{bad[0]}'{_in(where)}; known keys: {', '.join(known)}")
    kw = {}
    for k, v in data.items():
        f = known[k]
        sub = _nested_cls(cls, f)
        if sub is not None:
            if not isinstance(v, Mapping):
                raise CaplocError(f"'{k}'{_in(where)} must be a table of settings")
            v = from_mapping(sub, v, f"{where}.{k}" if where else k)
        kw[k] = v
    try:
        return cls(**kw)
    except CaplocError as e:
        msg = str(e)
        if msg.startswith("["):  # already names its (nested) section
            raise
        if msg.startswith(cls.__name__ + "."):
            msg = msg[len(cls.__name__) + 1:]
        raise CaplocError(f"[{where}] {msg}" if where else msg) from None
    except TypeError as e:  # a constructor that rejects a value's type
        raise CaplocError(f"bad settings{_in(where)}: {e}") from None


def to_mapping(obj) -> dict:
    """The dataclass as plain JSON/TOML-ready values (nested configs as nested dicts)."""
    out = {}
    for f in fields_of(type(obj)):
        v = getattr(obj, f.name)
        out[f.name] = to_mapping(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def _nested_cls(cls, f: dataclasses.Field):
    try:
        default = default_of(cls, f.name)
    except KeyError:
        return None
    return type(default) if dataclasses.is_dataclass(default) else None


def _in(where: str) -> str:
    return f" in [{where}]" if where else ""


__all__ = ["setting", "check", "from_mapping", "to_mapping", "default_of", "help_of", "field_of", "fields_of"]
