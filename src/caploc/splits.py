"""Relocalization from stored scores and split agreement: the primitives the stability, sweep, crosscap (and
contrast) stages share.

The per-sample selection (sigma / top-k / kn rule) depends on one sample only, so it is computed once per rule value
as a boolean mask ``[N, n_layers * d_mlp]`` (:func:`selection_masks`); the commonality set of any subset of samples
is then ``counts = mask[subset].sum(0) >= S`` (:func:`set_from_mask`), exactly what
:func:`caploc.localize.neuron_set_from_scores` computes on ``scores[subset]`` (checked in the tests).

Split agreement
---------------
The samples are split into ``k`` disjoint parts (``random``: a seeded permutation; ``group``: parts that share no
group, i.e. template-disjoint for gsm_symbolic), over several seeds, with :mod:`caploc.data`'s split functions
(:func:`split_indices`). Each part is localized with the SAME rule; ``min_freq`` is applied to the part (a fraction
stays a fraction of the part's samples; an absolute count stays that count). For every pair of parts (A = lower part
index) :func:`pair_record` gives ``|A∩B|/|A|`` and ``|A∩B|/|B|`` (the paper's overlap rate in both directions), their
mean (the headline ``overlap``), ``|A∩B|/min(|A|,|B|)``, IoU and Dice (:func:`caploc.stats.agreement`).

Uncertainty (:func:`summarize_pairs`): pairs from the same seed share samples and are not independent, so with >= 3
seeds the per-seed mean is the resampling unit of the percentile bootstrap; with fewer seeds the pairs are resampled.
Different seeds re-split the SAME samples, so the CI describes split-to-split variation for this sample set, not the
sampling of new data.

Chance level: two independent uniformly random sets with the same per-layer sizes as A and B
(:func:`caploc.stats.expected_random_agreement`, exact hypergeometric; and a Monte Carlo estimate,
:func:`caploc.stats.simulate_random_agreement`). This is a weak null: any consistent signal beats it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from . import stats
from .config import check, setting
from .data import Dataset, Sample, group_disjoint_splits, random_splits
from .errors import CaplocError
from .localize import LocateConfig, min_count, select
from .progress import track
from .report.fmt import as_float, num

SPLIT_KINDS = ("random", "group")
#: agreement metrics summarised per split kind (see :func:`caploc.stats.agreement`)
METRICS = ("overlap", "overlap_ab", "overlap_ba", "overlap_min", "iou", "dice")


@dataclass
class StabilityConfig:
    """How to split the samples and how to summarise the split agreement."""

    k: int = setting(2, help="Disjoint splits per seed.", min=2)
    seeds: list[int] = setting(default_factory=lambda: list(range(5)), item=int,
                               help="Split seeds (an integer N means seeds 0..N-1).")
    kinds: list[str] = setting(default_factory=lambda: ["random", "group"], choices=SPLIT_KINDS, item=str,
                               help="Split kinds, comma-separated: random | group (group = template-disjoint).")
    n_boot: int = setting(2000, min=1, help="Bootstrap resamples for the CIs.")
    null_draws: int = setting(500, min=0, help="Monte Carlo random-set pairs per split pair (0 = exact chance only).")
    level: float = setting(0.95, min=0, max=1, min_exclusive=True, help="Confidence level of the bootstrap CIs.")
    boot_seed: int = setting(0, help="Seed of the bootstrap.")

    def __post_init__(self):
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            self.seeds = list(range(self.seeds))
        if isinstance(self.kinds, tuple):
            self.kinds = list(self.kinds)
        check(self)
        if not self.seeds:
            raise CaplocError("give at least one split seed (--seeds N)")
        if len(set(self.seeds)) != len(self.seeds):
            raise CaplocError(f"split seeds must be distinct, got {self.seeds}")
        if not self.kinds:
            raise CaplocError(f"give at least one split kind; choose from {', '.join(SPLIT_KINDS)}")
        if self.level >= 1:
            raise CaplocError(f"level must be in (0, 1), got {self.level}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# relocalization from stored scores
# ---------------------------------------------------------------------------------------------------------------------
def rule_config(base: LocateConfig, rule: str | None = None, value: float | None = None,
                min_freq: float | None = None) -> LocateConfig:
    """``base`` with the selection rule / value / frequency threshold replaced (attribution settings kept)."""
    kw = {}
    if rule is not None:
        kw["rule"] = rule
    r = kw.get("rule", base.rule)
    if value is not None:
        kw[{"sigma": "sigma", "sigma_layer": "sigma", "topk": "topk", "kn": "kn_t"}[r]] = int(value) if r == "topk" else float(value)
    if min_freq is not None:
        kw["min_freq"] = float(min_freq)
    return dataclasses.replace(base, **kw)


def selection_masks(scores: torch.Tensor, cfg: LocateConfig) -> torch.Tensor:
    """scores [N, L, d] -> bool [N, L*d]: the per-sample selection of ``cfg``'s rule (independent across samples)."""
    N = scores.shape[0]
    return select(scores.reshape(N, -1), cfg.rule, cfg.rule_value, n_layers=scores.shape[1])


def set_from_mask(mask: torch.Tensor, min_freq: float, indices=None) -> np.ndarray:
    """Commonality set (sorted flat indices) of the samples ``indices`` (all if None) of a selection mask [N, n]."""
    m = mask if indices is None else mask[torch.as_tensor(np.asarray(indices), dtype=torch.long)]
    counts = m.sum(0).numpy()
    return np.nonzero(counts >= min_count(min_freq, m.shape[0]))[0].astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# splits and their agreement
# ---------------------------------------------------------------------------------------------------------------------
def split_indices(n: int, groups, k: int, seed: int, kind: str) -> list[np.ndarray]:
    """Sample indices of the ``k`` disjoint parts of ``n`` samples, made by :mod:`caploc.data`'s split functions.

    ``kind='random'``: :func:`caploc.data.random_splits`; ``'group'``: :func:`caploc.data.group_disjoint_splits`
    on ``groups`` (one label per sample), so no group appears in two parts.
    """
    if kind not in SPLIT_KINDS:
        raise CaplocError(f"unknown split kind {kind!r}; choose one of {', '.join(SPLIT_KINDS)}")
    if kind == "group" and groups is None:
        raise CaplocError("group-disjoint splits need sample groups; the run's dataset has none: use --kinds random")
    if groups is not None and len(groups) != n:
        raise CaplocError(f"got {len(groups)} group labels for {n} samples; they must align with the stored scores")
    ds = Dataset("scores", [Sample(prompt=str(i), target="", group=None if groups is None else groups[i])
                            for i in range(n)])
    parts = random_splits(ds, k, seed) if kind == "random" else group_disjoint_splits(ds, k, seed)
    return [np.asarray(p.source["indices"], dtype=np.int64) for p in parts]


def pair_record(a: np.ndarray, b: np.ndarray, n_layers: int, d_mlp: int, *, null_draws: int = 0,
                null_seed: int = 0) -> dict:
    """Agreement of two flat neuron sets plus their exact (and optionally Monte Carlo) chance level."""
    rec = stats.agreement(a, b)
    sa, sb = stats.per_layer_counts(a, n_layers, d_mlp), stats.per_layer_counts(b, n_layers, d_mlp)
    ex = stats.expected_random_agreement(sa, sb, d_mlp)
    for m in METRICS + ("intersection",):
        rec[f"chance_{m}"] = ex[m]
    rec["chance_intersection_sd"] = ex["intersection_sd"]
    if null_draws:
        mc = stats.simulate_random_agreement(sa, sb, d_mlp, n_draws=null_draws, seed=null_seed)
        for m in ("overlap", "iou"):
            rec[f"mc_{m}_mean"], rec[f"mc_{m}_sd"], rec[f"mc_{m}_q95"] = mc[m]["mean"], mc[m]["sd"], mc[m]["q95"]
    return rec


def split_pairs(mask: torch.Tensor, min_freq: float, n_layers: int, d_mlp: int, groups, scfg: StabilityConfig,
                kinds: list[str] | None = None, keep_sets: bool = False) -> tuple[list[dict], dict]:
    """Every split pair for every kind and seed: records (see :func:`pair_record`) and, with ``keep_sets``, the split
    sets ``{(kind, seed, part): (sample indices, flat set)}``."""
    N = mask.shape[0]
    recs, sets = [], {}
    jobs = [(kind, seed) for kind in (kinds or scfg.kinds) for seed in scfg.seeds]
    for kind, seed in track(jobs, desc="split pairs", unit="split", progress=False if len(jobs) < 4 else None):
        parts = split_indices(N, groups, scfg.k, seed, kind)
        flats = [set_from_mask(mask, min_freq, idx) for idx in parts]
        if keep_sets:
            for i, (idx, f) in enumerate(zip(parts, flats)):
                sets[(kind, seed, i)] = (idx, f)
        for i, j in combinations(range(scfg.k), 2):
            rec = pair_record(flats[i], flats[j], n_layers, d_mlp, null_draws=scfg.null_draws,
                              null_seed=1_000_003 * seed + 101 * i + j)
            rec.update(kind=kind, seed=seed, a=i, b=j, n_samples_a=len(parts[i]), n_samples_b=len(parts[j]))
            recs.append(rec)
    return recs, sets


def _nanmean(v: np.ndarray) -> float:
    return float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan")


def summarize_pairs(recs: list[dict], scfg: StabilityConfig) -> dict:
    """Per split kind: mean and bootstrap CI of every metric (unit = seed when >= 3 seeds, else pair), chance levels."""
    out = {}
    for kind in dict.fromkeys(r["kind"] for r in recs):
        rk = [r for r in recs if r["kind"] == kind]
        seeds = sorted({r["seed"] for r in rk})
        by_seed = len(seeds) >= 3
        s = {"n_pairs": len(rk), "n_seeds": len(seeds), "ci_unit": "seed" if by_seed else "pair",
             "n_empty_pairs": sum(1 for r in rk if r["size_a"] == 0 or r["size_b"] == 0),
             "size_mean": float(np.mean([0.5 * (r["size_a"] + r["size_b"]) for r in rk])),
             "samples_per_split": float(np.mean([0.5 * (r["n_samples_a"] + r["n_samples_b"]) for r in rk]))}
        for m in METRICS + ("intersection",):
            per_pair = np.array([as_float(r[m]) for r in rk], dtype=float)
            if by_seed:
                units = np.array([_nanmean(np.array([as_float(r[m]) for r in rk if r["seed"] == sd]))
                                  for sd in seeds])
            else:
                units = per_pair
            if np.all(np.isnan(units)):  # every set empty: undefined, reported as n/a
                est = lo = hi = float("nan")
            else:
                est, lo, hi = stats.bootstrap_ci(units, n_boot=scfg.n_boot, seed=scfg.boot_seed, level=scfg.level)
            s[m] = {"mean": num(est), "lo": num(lo), "hi": num(hi), "per_unit": [num(v) for v in units]}
            s[m]["chance"] = num(_nanmean(np.array([as_float(r.get(f"chance_{m}")) for r in rk], dtype=float)))
            if f"mc_{m}_mean" in rk[0]:
                mc = np.array([as_float(r[f"mc_{m}_mean"]) for r in rk])
                mcsd = np.array([as_float(r[f"mc_{m}_sd"]) for r in rk])
                mcq = np.array([as_float(r[f"mc_{m}_q95"]) for r in rk])
                ok = ~np.isnan(mc)
                s[m]["chance_mc"] = num(mc[ok].mean()) if ok.any() else None
                s[m]["chance_mc_sd"] = num(mcsd[ok].mean()) if ok.any() else None
                s[m]["chance_mc_q95"] = num(mcq[ok].mean()) if ok.any() else None
                s[m]["pairs_above_mc_q95"] = int(np.sum((per_pair > mcq) & ok & ~np.isnan(per_pair)))
        out[kind] = s
    return out


__all__ = ["SPLIT_KINDS", "METRICS", "StabilityConfig", "rule_config", "selection_masks", "set_from_mask",
           "split_indices", "pair_record", "split_pairs", "summarize_pairs"]
