"""The registry of audit methods: name -> :class:`~caploc.stages.audit.base.Method` subclass, as data.

Order = the order the methods run on a fact (and the key order of a fact's record). To add a method, write its
class and add one entry here (and its name to ``config.METHOD_NAMES``).
"""
from __future__ import annotations

from .base import Method
from .circuits import KnowledgeCircuits
from .cnl import CNLPerPhrasing
from .config import METHOD_NAMES
from .kn import KnowledgeNeurons
from .tracing import CausalTracing

METHODS: dict[str, type[Method]] = {
    "kn": KnowledgeNeurons,
    "cnl": CNLPerPhrasing,
    "tracing": CausalTracing,
    "circuits": KnowledgeCircuits,
}
assert tuple(METHODS) == METHOD_NAMES, "config.METHOD_NAMES and the registry must list the same methods"


def selected(names) -> list[type[Method]]:
    """The method classes named in ``names`` (an AuditConfig's ``methods``), in registry order."""
    want = set(names)
    return [cls for name, cls in METHODS.items() if name in want]


__all__ = ["METHODS", "selected"]
