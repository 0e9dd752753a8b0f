"""Controls for an intervention on a neuron set, and the rules that turn set-vs-control numbers into verdicts.

Controls (``caploc intervene``):

* :func:`random_controls` -- random sets with the set's per-layer sizes, drawn from the neurons NOT in the set
  (``stats.random_layer_matched_set``, seeds ``seed .. seed + n - 1``);
* :func:`activation_matched_set` -- for every set neuron the neuron of the same layer, not in the set and not yet
  used, whose mean |activation| (:func:`mean_abs_activation`) is closest.

Verdicts (our rules, stated in every report that uses them):

* :func:`permutation_p` -- one-sided permutation p-value in the claimed direction,
  ``p = (1 + #{random effects at least as extreme as the observed one}) / (1 + n_random)``; its smallest value is
  ``1 / (n_random + 1)``.
* :func:`verdict` -- "holds" / "does not hold", or "insufficient controls" when fewer than ``min_controls`` random
  sets were run (with 5 random sets the smallest reachable p is 1/6: no claim can be supported).
* :func:`absolute_specificity` -- the absolute half of the specificity rule (see its docstring).
* :func:`actmatched_share` -- the share of the set's effect that the activation-matched set reproduces (read in
  words by ``caploc.report.intervene.actmatched_sentence``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..data import collate, encode_dataset, pad_id
from ..errors import CaplocError
from ..hooks import capture
from ..neurons import by_layer, flat_indices
from ..stats import per_layer_counts, random_layer_matched_set

HOLDS, FAILS, INSUFFICIENT = "holds", "does not hold", "insufficient controls"
MIN_CONTROLS = 20  # random sets a claim needs before it can hold or fail
SPEC_MAX_OFF_SHARE = 0.5  # specificity: directed off-target ΔNLL at most half the on-target one
SPEC_MARGIN = 0.0  # specificity: optional extra margin (nats/token) of the on- over the off-target effect


# ---------------------------------------------------------------------------------------------------------------------
# controls
# ---------------------------------------------------------------------------------------------------------------------
def random_controls(neurons, n_layers: int, d_mlp: int, n: int, seed: int) -> list[np.ndarray]:
    """``n`` random flat sets with the per-layer sizes of ``neurons``, excluding its neurons; seeds seed..seed+n-1."""
    flat = flat_indices(neurons, d_mlp)
    sizes = per_layer_counts(flat, n_layers, d_mlp)
    return [random_layer_matched_set(sizes, d_mlp, np.random.default_rng(seed + i), exclude=flat) for i in range(n)]


@torch.no_grad()
def mean_abs_activation(lm, dataset, *, n_samples: int = 8, chat: bool = False, batch_size: int = 4,
                        max_length: int | None = None) -> torch.Tensor:
    """Mean |activation| of every neuron over all real (non-padding) tokens of the first ``n_samples`` samples:
    float64 ``[n_layers, d_mlp]``, measured with ``hooks.capture``."""
    site = lm.site
    ds = dataset.subset(range(min(n_samples, len(dataset))))
    max_len = max_length or getattr(lm.model.config, "max_position_embeddings", None)
    enc = encode_dataset(lm.tokenizer, ds, chat=chat, max_length=max_len)
    pad = pad_id(lm.tokenizer, lm.model.config)
    dev = site.input_device()
    total = torch.zeros(site.n_layers, site.d_mlp, dtype=torch.float64)
    count = 0
    for start in range(0, len(enc), batch_size):
        ids, mask = collate([e.input_ids for e in enc[start:start + batch_size]], pad)
        with capture(site) as store:
            lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        for l in range(site.n_layers):
            x = store[l].abs().double().cpu()  # [B, T, d_mlp]
            total[l] += (x * mask[:, :, None].double()).sum((0, 1))
        count += int(mask.sum())
    return total / max(count, 1)


def activation_matched_set(neurons, mean_abs: torch.Tensor | np.ndarray) -> np.ndarray:
    """For each set neuron (in each layer, largest mean |a| first) the not-yet-used neuron of the same layer, not in
    the set, with the closest mean |a| (ties: lower index). ``mean_abs``: ``[n_layers, d_mlp]``. Flat indices."""
    act = np.asarray(mean_abs, dtype=np.float64)
    L, d = act.shape
    bl = by_layer(neurons, d)
    out = []
    for l, ix in sorted(bl.items()):
        if len(ix) > d - len(ix):
            raise CaplocError(f"layer {l} holds {len(ix)} of {d} set neurons: too few others for a matched control")
        free = np.ones(d, dtype=bool)
        free[ix] = False
        for i in sorted(ix.tolist(), key=lambda i: -act[l, i]):
            cand = np.flatnonzero(free)
            j = int(cand[np.argmin(np.abs(act[l, cand] - act[l, i]))])
            free[j] = False
            out.append(l * d + j)
    return np.sort(np.asarray(out, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------------------
# verdict rules
# ---------------------------------------------------------------------------------------------------------------------
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


__all__ = ["MIN_CONTROLS", "SPEC_MAX_OFF_SHARE", "SPEC_MARGIN", "random_controls", "mean_abs_activation", "activation_matched_set", "permutation_p", "verdict",
           "absolute_specificity", "actmatched_share", "HOLDS", "FAILS", "INSUFFICIENT"]
