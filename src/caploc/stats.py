"""Set statistics for located neuron sets: agreement metrics, their chance levels, bootstrap CIs, null comparison.

Conventions
-----------
A *neuron set* is a sorted, duplicate-free 1-D ``int64`` array of FLAT indices ``layer * d_mlp + index`` over a model
with ``n_layers`` layers of ``d_mlp`` MLP neurons each (:func:`to_flat` / :func:`to_pairs` convert). Every function
that takes a set accepts anything array-like of non-negative integers and treats it as a set (sorted, deduplicated).
The *per-layer sizes* of a set are the counts of its neurons in each layer (:func:`per_layer_counts`).

Agreement metrics (for sets A and B, ``X = |A ∩ B|``)
----------------------------------------------------
* overlap rate (Huang et al., ICLR 2025, "Capability Localization"): ``X / |A|``. It is ASYMMETRIC (normalised by
  the first set only), so :func:`agreement` reports both directions (``overlap_ab = X/|A|``, ``overlap_ba = X/|B|``)
  and, as the headline ``overlap``, their mean ``(X/|A| + X/|B|) / 2``.
* overlap_min: ``X / min(|A|, |B|)`` (the Szymkiewicz–Simpson coefficient; 1 when one set contains the other).
* iou (Jaccard): ``X / |A ∪ B| = X / (|A| + |B| - X)``.
* dice: ``2X / (|A| + |B|)``.
A ratio whose denominator is 0 is ``nan`` (e.g. the overlap rate of an empty A, the IoU of two empty sets).

Chance level
------------
:func:`expected_random_agreement` gives the exact expectation of each metric for two INDEPENDENT sets drawn
uniformly at random with the given per-layer sizes; :func:`simulate_random_agreement` estimates the same by Monte
Carlo; :func:`random_layer_matched_set` draws one such random control set.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Mapping

import numpy as np

from caploc.errors import CaplocError

logger = logging.getLogger(__name__)

__all__ = [
    "to_flat",
    "to_pairs",
    "per_layer_counts",
    "overlap_rate",
    "overlap_min",
    "iou",
    "dice",
    "agreement",
    "hypergeom_pmf",
    "intersection_pmf",
    "expected_random_agreement",
    "simulate_random_agreement",
    "random_layer_matched_set",
    "bootstrap_ci",
    "compare_to_null",
    "pairwise_matrix",
    "METRICS",
]

# --------------------------------------------------------------------------------------------------------------
# validation helpers


def _check_pos_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise CaplocError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_int_array(x, name: str, ndim: int) -> np.ndarray:
    """``x`` as an int64 array of the given rank; integral floats are accepted (e.g. sets read back from JSON)."""
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists etc.
        raise CaplocError(f"{name} is not array-like: {exc}".splitlines()[0]) from None
    if arr.size == 0:
        return np.zeros((0,) * ndim if ndim == 1 else (0, 2), dtype=np.int64)
    if arr.ndim != ndim:
        raise CaplocError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise CaplocError(f"{name} must hold integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise CaplocError(f"{name} must hold integers, got non-integral values")
    return arr.astype(np.int64)


def _as_set(x, name: str = "set") -> np.ndarray:
    """A neuron set as a sorted, duplicate-free int64 array of non-negative flat indices."""
    arr = _as_int_array(x, name, 1)
    if arr.size and arr.min() < 0:
        raise CaplocError(f"{name} holds a negative flat index ({int(arr.min())})")
    return np.unique(arr)


def _as_sizes(sizes, name: str, d_mlp: int) -> np.ndarray:
    arr = _as_int_array(sizes, name, 1)
    if arr.size == 0:
        raise CaplocError(f"{name} is empty: give one size per layer")
    if arr.min() < 0 or arr.max() > d_mlp:
        raise CaplocError(f"{name} must lie in [0, d_mlp={d_mlp}], got range [{int(arr.min())}, {int(arr.max())}]")
    return arr


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den != 0 else float("nan")


# --------------------------------------------------------------------------------------------------------------
# index conversion


def to_flat(pairs, d_mlp: int, n_layers: int | None = None) -> np.ndarray:
    """``[[layer, idx], ...]`` -> sorted unique flat indices ``layer * d_mlp + idx`` (int64).

    Requires ``0 <= idx < d_mlp`` and ``layer >= 0`` (and ``layer < n_layers`` when ``n_layers`` is given).
    """
    d_mlp = _check_pos_int(d_mlp, "d_mlp")
    arr = _as_int_array(pairs, "pairs", 2)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.shape[1] != 2:
        raise CaplocError(f"pairs must have shape [n, 2] (layer, index), got {arr.shape}")
    layer, idx = arr[:, 0], arr[:, 1]
    if layer.min() < 0:
        raise CaplocError(f"pairs hold a negative layer ({int(layer.min())})")
    if n_layers is not None and layer.max() >= _check_pos_int(n_layers, "n_layers"):
        raise CaplocError(f"pairs hold layer {int(layer.max())} but the model has n_layers={n_layers}")
    if idx.min() < 0 or idx.max() >= d_mlp:
        raise CaplocError(f"pairs hold neuron index outside [0, d_mlp={d_mlp}): range [{int(idx.min())}, {int(idx.max())}]")
    return np.unique(layer * d_mlp + idx)


def to_pairs(flat, d_mlp: int) -> np.ndarray:
    """Flat indices -> int64 array ``[n, 2]`` of ``(layer, idx)`` with ``layer = f // d_mlp``, ``idx = f % d_mlp``.

    The input is treated as a set, so rows come out sorted by flat index without duplicates.
    """
    d_mlp = _check_pos_int(d_mlp, "d_mlp")
    s = _as_set(flat, "flat")
    return np.stack([s // d_mlp, s % d_mlp], axis=1).astype(np.int64)


def per_layer_counts(flat, n_layers: int, d_mlp: int) -> np.ndarray:
    """Number of the set's neurons in each layer: int64 array ``[n_layers]``.

    Raises CaplocError if an index lies beyond ``n_layers * d_mlp`` (a set made for a model with other dimensions).
    """
    n_layers = _check_pos_int(n_layers, "n_layers")
    d_mlp = _check_pos_int(d_mlp, "d_mlp")
    s = _as_set(flat, "flat")
    if s.size and s[-1] >= n_layers * d_mlp:
        raise CaplocError(
            f"flat index {int(s[-1])} is outside a model with n_layers={n_layers}, d_mlp={d_mlp}; "
            "was the set made for another model?"
        )
    return np.bincount(s // d_mlp, minlength=n_layers).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# agreement metrics


def _sizes_and_intersection(a, b) -> tuple[int, int, int]:
    sa, sb = _as_set(a, "a"), _as_set(b, "b")
    inter = np.intersect1d(sa, sb, assume_unique=True).size
    return sa.size, sb.size, int(inter)


def overlap_rate(a, b) -> float:
    """Paper's overlap rate ``|A ∩ B| / |A|`` (asymmetric: normalised by the FIRST set); nan if A is empty."""
    na, _, x = _sizes_and_intersection(a, b)
    return _ratio(x, na)


def overlap_min(a, b) -> float:
    """``|A ∩ B| / min(|A|, |B|)``; nan if either set is empty."""
    na, nb, x = _sizes_and_intersection(a, b)
    return _ratio(x, min(na, nb))


def iou(a, b) -> float:
    """Intersection over union ``|A ∩ B| / |A ∪ B| = X / (|A| + |B| - X)``; nan if both sets are empty."""
    na, nb, x = _sizes_and_intersection(a, b)
    return _ratio(x, na + nb - x)


def dice(a, b) -> float:
    """Dice coefficient ``2 |A ∩ B| / (|A| + |B|)``; nan if both sets are empty."""
    na, nb, x = _sizes_and_intersection(a, b)
    return _ratio(2 * x, na + nb)


def _metrics_from_counts(na: int, nb: int, x: int) -> dict:
    ab, ba = _ratio(x, na), _ratio(x, nb)
    return {
        "overlap": 0.5 * (ab + ba),
        "overlap_ab": ab,
        "overlap_ba": ba,
        "overlap_min": _ratio(x, min(na, nb)),
        "iou": _ratio(x, na + nb - x),
        "dice": _ratio(2 * x, na + nb),
    }


def agreement(a, b) -> dict:
    """All agreement metrics of two neuron sets.

    Keys (``X = |A ∩ B|``):
      ``overlap``      = (X/|A| + X/|B|) / 2 -- mean of the paper's asymmetric overlap rate in both orders
                         (nan if either set is empty);
      ``overlap_ab``   = X/|A| (paper's overlap rate of A against B);  ``overlap_ba`` = X/|B|;
      ``overlap_min``  = X / min(|A|, |B|);  ``iou`` = X / (|A| + |B| - X);  ``dice`` = 2X / (|A| + |B|);
      ``size_a`` = |A|, ``size_b`` = |B|, ``intersection`` = X (ints).
    """
    na, nb, x = _sizes_and_intersection(a, b)
    out = _metrics_from_counts(na, nb, x)
    out.update(size_a=na, size_b=nb, intersection=x)
    return out


METRICS: dict[str, Callable] = {
    "overlap": lambda a, b: agreement(a, b)["overlap"],
    "overlap_rate": overlap_rate,
    "overlap_min": overlap_min,
    "iou": iou,
    "dice": dice,
    "intersection": lambda a, b: float(_sizes_and_intersection(a, b)[2]),
}


# --------------------------------------------------------------------------------------------------------------
# chance level: exact


def _log_factorials(n_max: int) -> np.ndarray:
    """``log(k!)`` for k = 0..n_max, via ``math.lgamma(k + 1)``."""
    return np.array([math.lgamma(k + 1.0) for k in range(n_max + 1)], dtype=np.float64)


def _hypergeom_pmf(N: int, K: int, n: int, logfact: np.ndarray) -> np.ndarray:
    kmax = min(K, n)
    kmin = max(0, n + K - N)
    pmf = np.zeros(kmax + 1, dtype=np.float64)
    k = np.arange(kmin, kmax + 1)
    log_p = (
        logfact[K] - logfact[k] - logfact[K - k]  # log C(K, k)
        + logfact[N - K] - logfact[n - k] - logfact[N - K - n + k]  # log C(N-K, n-k)
        - (logfact[N] - logfact[n] - logfact[N - n])  # - log C(N, n)
    )
    pmf[kmin:] = np.exp(log_p)
    return pmf


def hypergeom_pmf(N: int, K: int, n: int) -> np.ndarray:
    """Hypergeometric pmf ``P(X = k) = C(K, k) C(N-K, n-k) / C(N, n)`` for ``k = 0 .. min(K, n)``.

    ``X`` = number of marked items in a uniform sample of ``n`` out of ``N`` items of which ``K`` are marked -- i.e.
    ``|A ∩ B|`` for independent uniform subsets A (size K) and B (size n) of an N-set. Computed in log space with
    ``math.lgamma``; entries with ``k < n + K - N`` (outside the support) are 0. Mean ``K n / N``. Not renormalised:
    the sum is 1 up to the rounding of the lgamma sums (about ``N log N * 1e-16``; ~1e-12 at N = 2048).
    """
    N = _check_pos_int(N, "N")
    for name, v in (("K", K), ("n", n)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= N:
            raise CaplocError(f"{name} must be an integer in [0, N={N}], got {v!r}")
    return _hypergeom_pmf(N, int(K), int(n), _log_factorials(N))


def _trim(pmf: np.ndarray, offset: int, rel_tol: float) -> tuple[np.ndarray, int]:
    """Drop leading/trailing entries below ``rel_tol * max`` (negligible tail mass); returns (pmf, new offset)."""
    keep = np.flatnonzero(pmf >= rel_tol * pmf.max())
    lo, hi = int(keep[0]), int(keep[-1])
    return pmf[lo : hi + 1], offset + lo


def intersection_pmf(sizes_a, sizes_b, d_mlp: int, rel_tol: float = 1e-30) -> tuple[np.ndarray, np.ndarray]:
    """Distribution of the total intersection ``X = sum_l X_l`` of two independent layer-matched random sets.

    ``X_l ~ Hypergeometric(N=d_mlp, K=sizes_a[l], n=sizes_b[l])``, independent across layers, so the pmf of X is the
    convolution of the per-layer pmfs. Returns ``(values, probs)``: the support points and their probabilities
    (renormalised to sum to 1). Tails with probability below ``rel_tol * max`` are dropped after each convolution
    to keep the arrays short (their mass is far below float64 rounding of the expectations).
    """
    d_mlp = _check_pos_int(d_mlp, "d_mlp")
    a = _as_sizes(sizes_a, "sizes_a", d_mlp)
    b = _as_sizes(sizes_b, "sizes_b", d_mlp)
    if a.shape != b.shape:
        raise CaplocError(f"sizes_a and sizes_b need one entry per layer each; got {a.size} and {b.size} layers")
    logfact = _log_factorials(d_mlp)
    total, offset = np.ones(1), 0
    for K, n in zip(a.tolist(), b.tolist()):
        layer = _hypergeom_pmf(d_mlp, K, n, logfact)
        layer, lo = _trim(layer / layer.sum(), 0, rel_tol)  # renormalise away lgamma rounding
        total, offset = _trim(np.convolve(total, layer), offset + lo, rel_tol)
    total = total / total.sum()
    return np.arange(offset, offset + total.size, dtype=np.int64), total


def expected_random_agreement(sizes_a, sizes_b, d_mlp: int) -> dict:
    """Exact chance level of the agreement metrics for two INDEPENDENT uniformly random layer-matched sets.

    Model: in layer l, A holds ``a_l = sizes_a[l]`` and B holds ``b_l = sizes_b[l]`` of the ``N = d_mlp`` neurons,
    each uniform without replacement and independent; so ``X_l = |A_l ∩ B_l| ~ Hypergeometric(N, a_l, b_l)``,
    independent across layers, and ``X = sum_l X_l``. With ``|A| = sum a_l``, ``|B| = sum b_l`` (fixed):

      ``intersection``    = E[X] = sum_l a_l b_l / N
      ``intersection_sd`` = sqrt(sum_l a_l b_l (N - a_l)(N - b_l) / (N^2 (N - 1)))   (0 when N == 1)
      ``overlap_ab``      = E[X] / |A|;   ``overlap_ba`` = E[X] / |B|
      ``overlap``         = (E[X]/|A| + E[X]/|B|) / 2   (same symmetrised definition as :func:`agreement`)
      ``overlap_min``     = E[X] / min(|A|, |B|)
      ``dice``            = 2 E[X] / (|A| + |B|)        (linear in X)
      ``iou``             = E[X / (|A| + |B| - X)] = sum_x P(X = x) x / (|A| + |B| - x), exact, with the pmf of X
                            from :func:`intersection_pmf` (convolution of per-layer hypergeometric pmfs)
    Metrics with a zero denominator are nan.
    """
    values, probs = intersection_pmf(sizes_a, sizes_b, d_mlp)
    a = _as_sizes(sizes_a, "sizes_a", d_mlp).astype(np.float64)
    b = _as_sizes(sizes_b, "sizes_b", d_mlp).astype(np.float64)
    N = float(d_mlp)
    na, nb = float(a.sum()), float(b.sum())
    ex = float(np.sum(a * b) / N)
    var = float(np.sum(a * b * (N - a) * (N - b)) / (N * N * (N - 1))) if d_mlp > 1 else 0.0
    union = na + nb - values.astype(np.float64)
    e_iou = float(np.sum(probs * values / union)) if na + nb > 0 else float("nan")
    ab, ba = _ratio(ex, na), _ratio(ex, nb)
    return {
        "intersection": ex,
        "intersection_sd": math.sqrt(max(var, 0.0)),
        "overlap": 0.5 * (ab + ba),
        "overlap_ab": ab,
        "overlap_ba": ba,
        "overlap_min": _ratio(ex, min(na, nb)),
        "iou": e_iou,
        "dice": _ratio(2.0 * ex, na + nb),
    }


# --------------------------------------------------------------------------------------------------------------
# chance level: Monte Carlo and random controls


def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise CaplocError(f"rng must be a numpy Generator or an integer seed, got {type(rng).__name__}")


def _summary(v: np.ndarray) -> dict:
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "q95": float("nan")}
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "q95": float(np.quantile(v, 0.95)),
    }


def _div(num: np.ndarray, den) -> np.ndarray:
    den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
    out = np.full(num.shape, np.nan)
    ok = den != 0
    out[ok] = num[ok] / den[ok]
    return out


def simulate_random_agreement(sizes_a, sizes_b, d_mlp: int, n_draws: int = 1000, seed=0) -> dict:
    """Monte Carlo counterpart of :func:`expected_random_agreement`.

    Each draw samples A and B independently: in every layer l, ``sizes_a[l]`` (resp. ``sizes_b[l]``) of the
    ``d_mlp`` neurons uniformly without replacement; the metrics are then computed as in :func:`agreement`.
    Returns, for each key ``intersection, overlap, overlap_ab, overlap_ba, overlap_min, iou, dice``, a dict
    ``{"mean", "sd" (ddof=1; 0 for one draw), "q95" (95th percentile)}`` over the draws (nan draws dropped).
    """
    d_mlp = _check_pos_int(d_mlp, "d_mlp")
    n_draws = _check_pos_int(n_draws, "n_draws")
    a = _as_sizes(sizes_a, "sizes_a", d_mlp)
    b = _as_sizes(sizes_b, "sizes_b", d_mlp)
    if a.shape != b.shape:
        raise CaplocError(f"sizes_a and sizes_b need one entry per layer each; got {a.size} and {b.size} layers")
    rng = _rng(seed)
    x = np.zeros(n_draws, dtype=np.int64)
    chunk = max(1, 1_000_000 // d_mlp)
    rows_all = np.arange(chunk)[:, None]
    for K, n in zip(a.tolist(), b.tolist()):
        if K == 0 or n == 0:
            continue
        if K == d_mlp or n == d_mlp:  # one side is the whole layer: the intersection is the other side
            x += min(K, n)
            continue
        for start in range(0, n_draws, chunk):
            m = min(chunk, n_draws - start)
            rows = rows_all[:m]
            in_a = np.zeros((m, d_mlp), dtype=bool)
            in_a[rows, np.argpartition(rng.random((m, d_mlp)), K - 1, axis=1)[:, :K]] = True
            idx_b = np.argpartition(rng.random((m, d_mlp)), n - 1, axis=1)[:, :n]
            x[start : start + m] += in_a[rows, idx_b].sum(axis=1)
    na, nb = int(a.sum()), int(b.sum())
    xf = x.astype(np.float64)
    ab, ba = _div(xf, na), _div(xf, nb)
    per_draw = {
        "intersection": xf,
        "overlap": 0.5 * (ab + ba),
        "overlap_ab": ab,
        "overlap_ba": ba,
        "overlap_min": _div(xf, min(na, nb)),
        "iou": _div(xf, na + nb - xf),
        "dice": _div(2.0 * xf, na + nb),
    }
    return {k: _summary(v) for k, v in per_draw.items()}


def random_layer_matched_set(sizes, d_mlp: int, rng, exclude=None) -> np.ndarray:
    """A random control set with the given per-layer sizes: sorted flat int64 array.

    In each layer l, ``sizes[l]`` distinct neurons are drawn uniformly without replacement from the layer's neurons
    not in ``exclude`` (flat indices; e.g. the located set itself, for a disjoint control). ``rng`` is a numpy
    Generator (or an int seed). Raises CaplocError if a layer has fewer than ``sizes[l]`` neurons left.
    """
    d_mlp = _check_pos_int(d_mlp, "d_mlp")
    sizes = _as_sizes(sizes, "sizes", d_mlp)
    rng = _rng(rng)
    n_layers = sizes.size
    excl = _as_set(exclude if exclude is not None else [], "exclude")
    if excl.size and excl[-1] >= n_layers * d_mlp:
        raise CaplocError(
            f"exclude holds flat index {int(excl[-1])}, outside n_layers={n_layers} x d_mlp={d_mlp}"
        )
    excl_by_layer = np.split(excl, np.searchsorted(excl, np.arange(1, n_layers) * d_mlp))
    parts = []
    for layer, (k, ex) in enumerate(zip(sizes.tolist(), excl_by_layer)):
        if k == 0:
            continue
        avail = np.setdiff1d(np.arange(layer * d_mlp, (layer + 1) * d_mlp), ex, assume_unique=True)
        if k > avail.size:
            raise CaplocError(
                f"layer {layer}: cannot draw {k} neurons, only {avail.size} of {d_mlp} remain after exclusion"
            )
        parts.append(rng.choice(avail, size=k, replace=False))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# uncertainty and null comparison


def bootstrap_ci(values, n_boot: int = 2000, seed=0, level: float = 0.95, stat=np.mean) -> tuple[float, float, float]:
    """Percentile bootstrap: ``(estimate, lo, hi)``.

    nan values are dropped first. ``estimate = stat(values)``; ``n_boot`` resamples of the same size are drawn with
    replacement (numpy Generator seeded with ``seed``, so the result is deterministic), and ``lo``/``hi`` are the
    ``(1-level)/2`` and ``(1+level)/2`` quantiles of the resampled statistics. ``stat`` is called as
    ``stat(x, axis=1)`` on a batch of resamples when it accepts ``axis`` (numpy reductions), else once per resample.
    One value -> ``(v, v, v)``; no non-nan value -> ``(nan, nan, nan)`` (logged).
    """
    n_boot = _check_pos_int(n_boot, "n_boot")
    if not 0.0 < float(level) < 1.0:
        raise CaplocError(f"level must lie strictly between 0 and 1, got {level!r}")
    try:
        v = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise CaplocError(f"values must be numeric: {exc}".splitlines()[0]) from None
    v = v[~np.isnan(v)]
    if v.size == 0:
        logger.warning("bootstrap_ci: no non-nan values; returning nan")
        return (float("nan"),) * 3
    est = float(stat(v))
    if v.size == 1:
        return est, est, est
    rng = np.random.default_rng(seed)
    n = v.size
    boot = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        sample = v[rng.integers(0, n, size=(m, n))]
        try:
            res = np.asarray(stat(sample, axis=1), dtype=np.float64)
            if res.shape != (m,):
                raise TypeError
        except TypeError:
            res = np.array([stat(row) for row in sample], dtype=np.float64)
        boot[start : start + m] = res
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return est, float(lo), float(hi)


def compare_to_null(effect: float, null_values) -> dict:
    """Compare an observed effect with a random-control (null) distribution.

    With ``m`` = mean and ``s`` = sd (ddof=1; 0 for a single value) of the n null values (nan dropped):
      ``z`` = (effect - m) / s; if all null values are equal (s == 0, e.g. a single value) the null is
              degenerate: ``z`` = +inf / -inf / 0 by the sign of effect - m, and ``degenerate_null`` is True
              (otherwise False);
      ``percentile`` = (#{null < effect} + 0.5 #{null == effect}) / n   (ties counted half);
      ``p_two_sided`` = (1 + #{|null - m| >= |effect - m|}) / (1 + n)   (empirical; deviations equal up to a
              relative 1e-12 count as ties, so symmetric cases are not split by rounding).
    Returns ``{"effect", "null_mean", "null_sd", "z", "percentile", "p_two_sided", "n_null", "degenerate_null"}``.
    """
    try:
        effect = float(effect)
        null = np.asarray(null_values, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise CaplocError(f"effect and null_values must be numeric: {exc}".splitlines()[0]) from None
    if math.isnan(effect):
        raise CaplocError("effect is nan; cannot compare it with the null distribution")
    null = null[~np.isnan(null)]
    n = int(null.size)
    if n == 0:
        raise CaplocError("null_values is empty (or all nan): run at least one random control")
    if not np.all(np.isfinite(null)):
        raise CaplocError("null_values hold infinite values")
    degenerate = bool(np.all(null == null[0]))  # zero spread; exact test avoids rounding noise of std()
    if degenerate:
        m, s = float(null[0]), 0.0
    else:
        m = float(null.mean())
        s = float(null.std(ddof=1))
    diff = effect - m
    if degenerate:
        z = math.copysign(math.inf, diff) if diff != 0 else 0.0
        logger.warning("compare_to_null: null distribution has zero spread (n=%d); z is %s", n, z)
    else:
        z = diff / s
    percentile = (np.count_nonzero(null < effect) + 0.5 * np.count_nonzero(null == effect)) / n
    dev_null, dev_eff = np.abs(null - m), abs(diff)
    tol = 1e-12 * max(float(np.max(np.abs(null))), abs(effect) if math.isfinite(effect) else 0.0, 1e-300)
    extreme = int(np.count_nonzero(dev_null >= dev_eff - tol))
    return {
        "effect": effect,
        "null_mean": m,
        "null_sd": s,
        "z": float(z),
        "percentile": float(percentile),
        "p_two_sided": (1.0 + extreme) / (1.0 + n),
        "n_null": n,
        "degenerate_null": bool(degenerate),
    }


def pairwise_matrix(sets: Mapping[str, np.ndarray], metric="iou") -> tuple[list[str], np.ndarray]:
    """Metric between every pair of named sets: ``(names, M)`` with ``M[i, j] = metric(sets[names[i]], sets[names[j]])``.

    ``names`` keeps the mapping's order. ``metric`` is one of ``overlap`` (symmetrised mean, as in :func:`agreement`),
    ``overlap_rate`` (paper's asymmetric |A_i ∩ A_j| / |A_i|, so M is not symmetric), ``overlap_min``, ``iou``,
    ``dice``, ``intersection``, or a callable ``f(a, b) -> float``.
    """
    if not isinstance(sets, Mapping):
        raise CaplocError(f"sets must be a mapping name -> neuron set, got {type(sets).__name__}")
    if callable(metric):
        fn = metric
    elif metric in METRICS:
        fn = METRICS[metric]
    else:
        raise CaplocError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)} or pass a callable")
    names = [str(k) for k in sets]
    arrays = [_as_set(v, f"sets[{k!r}]") for k, v in sets.items()]
    M = np.empty((len(names), len(names)), dtype=np.float64)
    for i, ai in enumerate(arrays):
        for j, aj in enumerate(arrays):
            M[i, j] = float(fn(ai, aj))
    return names, M
