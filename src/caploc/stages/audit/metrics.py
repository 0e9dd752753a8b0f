"""The common fidelity metric of the individual-knowledge audit, its controls, and the summaries over facts.

For every method, each phrasing gets a *localized parameter set*; fidelity is the IoU of those sets between the
paraphrases of one fact, over all unordered pairs:

* KN and CNL: the neuron set (a neuron = its parameter slice, all neurons own the same number of parameters, so the
  parameter-weighted IoU equals the neuron IoU);
* causal tracing: the parameters of the MLP at the peak layer (ROME's edit site). All MLPs have the same size, so the
  IoU is 1 for the same layer and 0 otherwise (the same-layer rate);
* circuits: a parameter-weighted IoU ``sum_{u in A∩B} w_u / sum_{u in A∪B} w_u`` over the circuit's units (weights =
  parameter counts), :func:`weighted_iou`.

Every value is reported next to controls that share the method's set sizes:
``random`` = independent random sets with the same per-layer sizes (exact expectation for neurons, 1/L for a layer,
Monte Carlo for weighted units); ``same_template`` = the same phrasing template filled with ANOTHER fact's subject
(same relation): high values there mean the sets follow the wording rather than the fact; ``unrelated`` = phrasings
of a fact of another relation. Confidence intervals are percentile bootstraps over facts of the per-fact mean (pairs
within a fact are not independent).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np

from ...stats import bootstrap_ci, expected_random_agreement, iou, per_layer_counts
from .facts import Fact


# ---------------------------------------------------------------------------------------------------------------------
# pair metrics
# ---------------------------------------------------------------------------------------------------------------------
def pairs(n: int) -> list[tuple[int, int]]:
    """All unordered pairs i < j of n phrasings."""
    return list(itertools.combinations(range(n), 2))


def set_iou(a, b) -> float:
    """Neuron-set IoU (nan when both sets are empty)."""
    return iou(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))


def random_set_iou(a, b, n_layers: int, d_mlp: int) -> float:
    """Exact expected IoU of two independent random sets with the per-layer sizes of ``a`` and ``b``."""
    sa = per_layer_counts(np.asarray(a, dtype=np.int64), n_layers, d_mlp)
    sb = per_layer_counts(np.asarray(b, dtype=np.int64), n_layers, d_mlp)
    if sa.sum() + sb.sum() == 0:
        return float("nan")
    return float(expected_random_agreement(sa, sb, d_mlp)["iou"])


def layer_iou(la: int | None, lb: int | None) -> float:
    """Parameter IoU of two single-layer MLP sets: 1 if the same layer, 0 otherwise (nan if either is missing)."""
    if la is None or lb is None:
        return float("nan")
    return 1.0 if int(la) == int(lb) else 0.0


def weighted_iou(a: dict, b: dict) -> float:
    """Parameter-weighted IoU of two unit sets {unit: parameter count}: sum over A∩B / sum over A∪B (nan if the
    union weighs 0). A unit's weight is taken from whichever set holds it (they must agree)."""
    keys = set(a) | set(b)
    w = {k: float(a.get(k, b.get(k, 0.0))) for k in keys}
    union = sum(w.values())
    if union <= 0:
        return float("nan")
    return sum(w[k] for k in set(a) & set(b)) / union


def weighted_index_iou(a, b, w: np.ndarray) -> float:
    """Weighted IoU of two sets of unit indices with unit weights ``w`` (nan if the union weighs 0)."""
    inter = np.intersect1d(a, b)
    union = np.union1d(a, b)
    den = float(w[union].sum())
    return float(w[inter].sum()) / den if den > 0 else float("nan")


def random_weighted_iou(a: dict, b: dict, universe: dict, n_draws: int = 200, seed: int = 0) -> float:
    """Monte Carlo expected weighted IoU of two random unit sets with the same NUMBER of units as ``a`` and ``b``,
    drawn uniformly from ``universe`` {unit: weight}."""
    keys = list(universe)
    if not keys or (not a and not b):
        return float("nan")
    w = np.array([float(universe[k]) for k in keys])
    rng = np.random.default_rng(seed)
    na, nb = min(len(a), len(keys)), min(len(b), len(keys))
    vals = []
    for _ in range(n_draws):
        ia = rng.choice(len(keys), size=na, replace=False)
        ib = rng.choice(len(keys), size=nb, replace=False)
        inter = np.intersect1d(ia, ib)
        union = np.union1d(ia, ib)
        den = w[union].sum()
        vals.append(w[inter].sum() / den if den > 0 else np.nan)
    return float(np.nanmean(vals)) if vals else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# control partners
# ---------------------------------------------------------------------------------------------------------------------
def control_partners(facts: Sequence[Fact], seed: int = 0) -> list[dict]:
    """For every fact: a ``same_template`` partner (another fact of the same relation with different subject and at
    least one shared template key; with the matched phrasing pairs) and an ``unrelated`` partner (a fact of another
    relation, or of unknown relation with a different subject), chosen with a seeded RNG."""
    rng = np.random.default_rng(seed)
    keys = [f.template_keys() for f in facts]
    out = []
    for i, f in enumerate(facts):
        same, other = [], []
        for j, g in enumerate(facts):
            if j == i or (f.subject and g.subject == f.subject):
                continue
            if f.relation is not None and g.relation == f.relation:
                m = [(a, b) for a, ka in enumerate(keys[i]) for b, kb in enumerate(keys[j]) if ka is not None and ka == kb]
                if m:
                    same.append((j, m))
            elif f.relation is None or g.relation != f.relation:
                other.append(j)
        rec: dict = {"same_template": None, "unrelated": None}
        if same:
            j, m = same[int(rng.integers(len(same)))]
            rec["same_template"] = {"fact": j, "pairs": m}
        if other:
            j = other[int(rng.integers(len(other)))]
            rec["unrelated"] = {"fact": j, "pairs": [(a, b) for a in range(len(f.phrasings))
                                                     for b in range(len(facts[j].phrasings))]}
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------------------------------
def mean_ci(per_fact: Sequence[float], seed: int = 0, n_boot: int = 2000) -> dict:
    """Mean over facts with a percentile-bootstrap 95% CI (nan entries dropped)."""
    v = np.asarray([x for x in per_fact if x is not None], dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": float("nan"), "ci": [float("nan"), float("nan")], "n": 0}
    est, lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
    return {"mean": est, "ci": [lo, hi], "n": int(v.size)}


def _nanmean(xs) -> float:
    v = np.asarray([x for x in xs], dtype=np.float64)
    v = v[~np.isnan(v)] if v.size else v
    return float(v.mean()) if v.size else float("nan")


def fidelity_summary(locs: Sequence[Sequence], metric: Callable, partners: Sequence[dict],
                     random_pair: Callable | None = None, seed: int = 0) -> dict:
    """Common-metric fidelity of one method.

    locs[f][j]: the localization of phrasing j of fact f (None = missing); metric(a, b) -> float (nan = undefined);
    random_pair(a, b) -> the metric's expectation for random localizations with the sizes of a and b.
    Returns {"same_fact", "same_template", "unrelated", "random"} each {"mean", "ci", "n"} (per-fact means
    bootstrapped over facts), plus "n_pairs" and "per_fact" (the same-fact per-fact means).
    """
    same, rand, per_fact, n_pairs = [], [], [], 0
    for f, L in enumerate(locs):
        vals, rvals = [], []
        for a, b in pairs(len(L)):
            if L[a] is None or L[b] is None:
                continue
            v = metric(L[a], L[b])
            if not math.isnan(v):
                vals.append(v)
                n_pairs += 1
            if random_pair is not None:
                rvals.append(random_pair(L[a], L[b]))
        m = _nanmean(vals) if vals else float("nan")
        per_fact.append(m)
        same.append(m)
        rand.append(_nanmean(rvals) if rvals else float("nan"))
    ctrl = {"same_template": [], "unrelated": []}
    for f, pr in enumerate(partners):
        for kind in ctrl:
            p = pr.get(kind)
            if not p:
                continue
            g = p["fact"]
            vals = []
            for a, b in p["pairs"]:
                A, B = locs[f][a], locs[g][b]
                if A is None or B is None:
                    continue
                v = metric(A, B)
                if not math.isnan(v):
                    vals.append(v)
            if vals:
                ctrl[kind].append(_nanmean(vals))
    out = {"same_fact": mean_ci(same, seed), "same_template": mean_ci(ctrl["same_template"], seed),
           "unrelated": mean_ci(ctrl["unrelated"], seed),
           "random": mean_ci(rand, seed) if random_pair is not None else None,
           "n_pairs": n_pairs, "per_fact": per_fact}
    return out
