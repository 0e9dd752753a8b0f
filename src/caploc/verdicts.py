"""The rules that turn a neuron set's effect against random-control effects into a claim's verdict (our rules,
stated in every report that uses them; shared by interventions and fine-tuning).

* :func:`permutation_p` -- one-sided permutation p-value in the claimed direction,
  ``p = (1 + #{random effects at least as extreme as the observed one}) / (1 + n_random)``; its smallest value is
  ``1 / (n_random + 1)``.
* :func:`verdict` -- "holds" / "does not hold", or "insufficient controls" when fewer than ``min_controls`` random
  sets were run (with 5 random sets the smallest reachable p is 1/6: no claim can be supported).
* :func:`absolute_specificity` -- the absolute half of the specificity rule (see its docstring).
* :func:`actmatched_share` -- the share of the set's effect that the activation-matched set reproduces.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CaplocError

HOLDS, FAILS, INSUFFICIENT = "holds", "does not hold", "insufficient controls"
MIN_CONTROLS = 20  # random sets a claim needs before it can hold or fail
SPEC_MAX_OFF_SHARE = 0.5  # specificity: directed off-target ΔNLL at most half the on-target one
SPEC_MARGIN = 0.0  # specificity: optional extra margin (nats/token) of the on- over the off-target effect


def permutation_p(observed: float, null, direction: int = 1) -> float:
    """One-sided permutation p-value of ``observed`` against the random-control effects ``null`` in the claimed
    ``direction`` (+1: larger is the claim, -1: smaller): ``(1 + #{direction * null >= direction * observed}) /
    (1 + n)`` over the n finite null values (ties count against the claim). nan without null values."""
    if direction not in (1, -1):
        raise CaplocError(f"direction must be +1 or -1, got {direction!r}")
    v = np.asarray(null, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0 or not math.isfinite(float(observed)):
        return float("nan")
    return float((1 + np.count_nonzero(direction * v >= direction * float(observed))) / (1 + v.size))


def verdict(holds: bool, n_random: int, min_controls: int) -> tuple[bool | None, str]:
    """``(holds, verdict)``: with fewer than ``min_controls`` random sets no claim is decided: ``(None,
    "insufficient controls")``; otherwise ``(holds, "holds" | "does not hold")``."""
    if n_random < min_controls:
        return None, INSUFFICIENT
    return bool(holds), HOLDS if holds else FAILS


def absolute_specificity(d_on: float, d_off: float, margin: float, max_off_share: float) -> dict:
    """The absolute specificity criterion on DIRECTED effects in nats/token (ΔNLL signed so that the gain's expected
    direction is positive): the on-target effect exceeds the off-target effect by at least ``margin``
    (``d_on - d_off >= margin``) AND the off-target effect is small relative to the on-target one
    (``d_off <= max_off_share * d_on``; an off-target effect in the other direction always passes). Returns the gap,
    ``off_share = d_off / d_on`` (None when ``d_on <= 0``), both criteria and ``holds``."""
    gap = d_on - d_off
    share = d_off / d_on if d_on > 0 else None  # undefined (None, JSON null) without an on-target effect
    margin_ok = bool(math.isfinite(gap) and gap >= margin)
    share_ok = bool(d_on > 0 and (d_off <= 0 or d_off <= max_off_share * d_on))
    return {"gap_nats": gap, "off_share": share, "margin_ok": margin_ok, "share_ok": share_ok,
            "holds": margin_ok and share_ok}


def actmatched_share(effect_actmatched: float, effect_set: float) -> float:
    """``effect_actmatched / effect_set`` (same dataset and gain); nan when the set's effect is 0 or not finite."""
    if not (math.isfinite(effect_set) and math.isfinite(effect_actmatched)) or effect_set == 0:
        return float("nan")
    return float(effect_actmatched / effect_set)


__all__ = ["MIN_CONTROLS", "SPEC_MAX_OFF_SHARE", "SPEC_MARGIN", "HOLDS", "FAILS", "INSUFFICIENT", "permutation_p",
           "verdict", "absolute_specificity", "actmatched_share"]
