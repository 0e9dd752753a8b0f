"""Answers in generated text: parsing, gold answers and correctness per answer kind (for ``accuracy``).

Answer kinds (ours, documented because the paper does not say): ``gsm`` (gsm_symbolic and numeric reasoning-gym tasks:
the number after ``####``, else the last number; ``1,000`` -> ``1000``, ``3.0`` -> ``3``), ``facts`` (the generation
starts with the attribute, ignoring case and whitespace runs, and the attribute is not cut inside a word), ``label``
(the first word that is one of the dataset's labels), ``exact`` (the generation starts with the target, whitespace
runs collapsed). Generations are cut at :data:`STOP_MARKERS` before parsing (:func:`truncate`); :func:`done_fn`
says when a greedy generation may stop early.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Callable, Sequence

from .errors import CaplocError

KINDS = ("gsm", "label", "facts", "exact")


# ---------------------------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------------------------
# a number: optional minus, digits with proper thousands separators or plain digits, optional decimals
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUM_RE = re.compile(_NUM)
_HASH_RE = re.compile(r"####\s*\$?\s*(" + _NUM + ")")


def normalize_number(text: str) -> str | None:
    """'1,000' -> '1000', '3.0' -> '3', '1687.50' -> '1687.5', '-0' -> '0', '.5' -> '0.5'; None if not a number."""
    t = text.strip().replace(",", "").replace("$", "")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    s = format(d.normalize(), "f")
    return s


def _norm_text(text: str) -> str:
    return " ".join(text.split()).lower()


def parse_answer(kind: str, text: str, labels: Sequence[str] | None = None) -> str | None:
    """The answer in generated ``text`` for answer ``kind`` (see module docstring); None when there is none.

    gsm: the number after the first ``####``, else the last number, normalised (:func:`normalize_number`).
    label: the first word (lowercased, punctuation stripped) that is one of ``labels`` (any word when None).
    facts: the text lowercased with whitespace runs collapsed (compared by prefix in :func:`is_correct`).
    exact: the text with whitespace runs collapsed.
    """
    if kind not in KINDS:
        raise CaplocError(f"unknown answer kind {kind!r}; choose one of {', '.join(KINDS)}")
    if text is None:
        return None
    if kind == "gsm":
        m = _HASH_RE.search(text)
        if m:
            return normalize_number(m.group(1))
        nums = _NUM_RE.findall(text)
        return normalize_number(nums[-1]) if nums else None
    if kind == "label":
        allowed = None if labels is None else {_norm_text(l) for l in labels}
        for w in text.split():
            w = w.strip(".,;:!?\"'()[]{}").lower()
            if not w:
                continue
            if allowed is None or w in allowed:
                return w
        return None
    if kind == "facts":
        t = _norm_text(text)
        return t or None
    t = " ".join(text.split())
    return t or None


def gold_answer(kind: str, sample) -> str | None:
    """The reference answer of ``sample`` for ``kind`` (from ``meta`` when the loader put it there)."""
    meta = sample.meta or {}
    if kind == "gsm":
        ans = meta.get("answer")
        if ans is not None:
            v = normalize_number(str(ans))
            if v is not None:
                return v
        return parse_answer("gsm", sample.target)
    if kind == "facts":
        return _norm_text(str(meta.get("attribute") or sample.target))
    if kind == "label":
        return _norm_text(str(meta.get("label") or sample.target))
    return " ".join(sample.target.split())


def is_correct(kind: str, generated: str, sample, labels: Sequence[str] | None = None) -> bool:
    """Whether the generated continuation answers ``sample`` correctly under answer ``kind``."""
    gold = gold_answer(kind, sample)
    if gold is None or gold == "":
        return False
    pred = parse_answer(kind, generated, labels=labels)
    if pred is None:
        return False
    if kind == "gsm":
        return Decimal(pred) == Decimal(gold)
    if kind in ("facts", "exact"):
        if not pred.startswith(gold):
            return False
        # do not accept an attribute cut inside a word ("Rome" vs "Romeo")
        return len(pred) == len(gold) or not (pred[len(gold)].isalnum() and gold[-1].isalnum())
    return pred == gold  # label


def answer_kind(dataset) -> str:
    """The answer kind for ``dataset``: gsm for gsm_symbolic and numeric reasoning-gym tasks, facts for facts,
    label for classification data (few distinct one-word targets), exact otherwise."""
    src = dataset.source if isinstance(dataset.source, dict) else {}
    while src.get("loader") in ("subset", "split") and isinstance(src.get("parent_source"), dict):
        src = src["parent_source"]
    loader = src.get("loader")
    if loader == "gsm_symbolic" or dataset.name.startswith("gsm_symbolic"):
        return "gsm"
    if loader == "facts" or dataset.name.startswith("facts"):
        return "facts"
    samples = list(dataset)
    if not samples:
        return "exact"
    golds = [str((s.meta or {}).get("answer", s.target)) for s in samples]
    if loader == "reasoning_gym" and all(normalize_number(g) is not None for g in golds):
        return "gsm"
    if any("label" in (s.meta or {}) for s in samples):
        return "label"
    targets = [_norm_text(s.target) for s in samples]
    distinct = set(targets)
    if 2 <= len(distinct) <= max(2, min(20, len(samples) // 3)) and all(len(t.split()) == 1 for t in distinct):
        return "label"
    return "exact"


def dataset_labels(dataset) -> list[str]:
    """The distinct gold labels of a classification dataset (sorted)."""
    return sorted({gold_answer("label", s) for s in dataset})


# ---------------------------------------------------------------------------------------------------------------------
# stopping
# ---------------------------------------------------------------------------------------------------------------------
STOP_MARKERS = ("\nQuestion:", "\n\n\n")
_GSM_DONE = re.compile(r"####\s*\$?\s*(?:" + _NUM + r")\s*\D")


def truncate(text: str) -> str:
    """``text`` up to the first stop marker (a new few-shot question, a run of blank lines)."""
    cut = len(text)
    for m in STOP_MARKERS:
        j = text.find(m)
        if j >= 0:
            cut = min(cut, j)
    return text[:cut]


def done_fn(kind: str) -> Callable[[str], bool]:
    """When a greedy continuation for answer ``kind`` is complete (the text test used to stop generating)."""
    if kind == "gsm":
        return lambda t: any(m in t for m in STOP_MARKERS) or _GSM_DONE.search(t) is not None
    if kind in ("facts", "label"):
        return lambda t: "\n" in t.lstrip()
    return lambda t: any(m in t for m in STOP_MARKERS)


__all__ = ["KINDS", "STOP_MARKERS", "normalize_number", "parse_answer", "gold_answer", "is_correct", "answer_kind",
           "dataset_labels", "truncate", "done_fn"]
