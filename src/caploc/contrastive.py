"""Contrastive localization: keep the neurons that are common on a target capability but NOT on reference capabilities.

A commonality set can beat random neurons and still be *generic*: a few high-impact neurons that every text needs
(massive-activation / every-text neurons). Measured on SmolLM2-135M: an 18-neuron gsm set (grad x act, sigma = 6,
>= 50 % of 16 problems) raised gsm NLL by +0.85 when erased, but facts NLL by +2.15. The rules below compare the target
run with runs on a *reference mix* of other capabilities, all computed from the stored per-sample scores
(``RUN/scores``), so no new attribution is needed once every dataset has been scored with the same settings.

Notation (per neuron): ``c_t`` / ``N_t`` target selection count / number of target samples, ``f_t = c_t / N_t``;
``f_r`` the selection frequency on reference ``r`` (same per-sample rule as the target); ``f_ref`` the reference
frequencies aggregated over references (``ref_agg``: ``mean`` = an equal-weight mix, the default; ``max`` = the most
frequent reference, stricter). The *floor* ``min_target_freq`` (default: the locate ``min_freq``) is a minimum target
frequency; with the defaults every contrastive set is a subset of the plain commonality set.

Rules
-----
``none``
    The plain commonality set (``f_t >= min_freq``), for comparison.
``subtract`` (after MathNeuro, Christ et al. 2024, "Math Neurosurgery: Isolating Language Models' Math Reasoning
Abilities Using Only Forward Passes", arXiv 2410.16930)
    MathNeuro keeps the parameters that are important for math inputs but not for general-text inputs. Our rendering
    on neurons: the target commonality set minus every neuron that is also a commonality neuron (same per-sample rule,
    frequency threshold ``ref_min_freq``, default = ``min_freq``) of a reference; ``ref_mode="any"`` (default)
    subtracts the commonality set of each reference separately, ``"pooled"`` subtracts the commonality set of all
    reference samples pooled. Statistic reported: ``f_t - max_r f_r``.
``freq-diff``
    ``f_t - f_ref``; keep ``>= threshold`` (default 0.5) or the ``top_n`` largest (with ``f_t`` at or above the floor).
``freq-ratio``
    ``((c_t + a) / (N_t + 2a)) / ((c_ref + a) / (N_ref + 2a))`` with additive (Laplace) smoothing ``a = smoothing``
    (default 1); for ``ref_agg="mean"`` the reference term is the mean of the smoothed per-reference frequencies, for
    ``"max"`` their maximum. Keep ``>= threshold`` (default 3) or ``top_n``; floor as above (without it the ratio
    favours rare neurons: 3 of 32 vs 0 of 32 already gives 4).
``score-diff``
    Each sample's scores are normalised over all neurons of that sample (``norm="z"``: (s - mean) / sd;
    ``"rank"``: percentile rank in [0, 1]), averaged over the samples of each dataset; statistic
    ``mean_t - agg_r mean_r``. Keep ``>= threshold`` (default 3.0 sd for ``z``, 0.3 for ``rank``) or ``top_n``; no
    frequency floor unless ``min_target_freq`` is given. Caveat: a generic neuron whose z-score is merely larger on
    the target (e.g. 40 vs 30) passes a z threshold; ``rank`` is immune to that but coarse at the top.
``lape`` (after LAPE, Tang et al. 2024, "Language-Specific Neurons: The Key to Multilingual Capabilities in Large
Language Models", ACL 2024)
    LAPE normalises a neuron's activation probabilities over languages into a distribution and keeps neurons of low
    entropy (bottom 1 %) whose probability passes a high floor. Ours: ``p = (f_t, f_r1, ..., f_rK)`` (selection
    frequencies, one per capability), ``q = p / sum(p)``, ``H = -sum q log q / log(K + 1)`` (normalised to [0, 1]).
    Keep neurons with ``f_t`` >= floor, the largest ``q`` on the target, and ``H <= max_entropy`` (default 0.5), or
    ``H`` in the lowest ``entropy_quantile`` of the floor-passing neurons (LAPE: 0.01) when that is given, or the
    ``top_n`` lowest ``H``. Thresholds are ours (the LAPE paper works on activation probabilities of languages).

Everything is deterministic; ties in ``top_n`` are broken by the lower flat index.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import CaplocError, IncompatibleResultError
from .localize import LocateConfig, load_scores, min_count, neuron_set_from_scores, select
from .results import NeuronSet, atomic_save_tensors, atomic_write_json, read_json

log = logging.getLogger(__name__)

CONTRAST_RULES = ("none", "subtract", "freq-diff", "freq-ratio", "score-diff", "lape")
REF_AGGS = ("mean", "max")
NORMS = ("z", "rank")

# The default reference mix: built-in capabilities of different kinds. The target's own family is left out.
DEFAULT_REFERENCE_POOL = ("facts", "rg:letter_counting", "rg:sentence_reordering", "humaneval", "gsm_symbolic")
_FAMILIES = {
    "math": ("gsm_symbolic", "rg:basic_arithmetic", "rg:chain_sum", "rg:simple_equations", "rg:polynomial_equations",
             "rg:fraction_simplification", "rg:prime_factorization", "rg:gcd", "rg:lcm", "rg:decimal_arithmetic",
             "rg:products", "rg:leg_counting", "rg:time_intervals", "rg:number_sorting", "gsm8k", "metamathqa"),
    "facts": ("facts", "known_facts", "known_1000", "counterfact", "zsre"),
    "language": ("rg:letter_counting", "rg:sentence_reordering", "rg:spell_backward", "rg:word_sorting",
                 "rg:letter_jumble", "rg:word_ladder", "rg:caesar_cipher"),
    "code": ("humaneval", "rg:codeio", "code25k", "mbpp"),
}


def _norm_spec(spec: str) -> str:
    s = str(spec).strip().lower().replace("-", "_")
    if s.startswith("rg_"):
        s = "rg:" + s[3:]
    return s


def family_of(spec: str) -> str | None:
    s = _norm_spec(spec)
    for fam, members in _FAMILIES.items():
        if s in members:
            return fam
    return None


def default_references(target_spec: str) -> list[str]:
    """The default reference mix for a target dataset: the built-in capabilities of other families.

    gsm_symbolic (math) -> facts, rg:letter_counting, rg:sentence_reordering, humaneval. For a target of unknown
    family (a file), every built-in except an exact match is used and a warning says so: pass references explicitly
    when the target may share a capability with them (a math file vs gsm_symbolic).
    """
    fam = family_of(target_spec)
    if fam is None:
        log.warning("unknown capability family for %r: using the whole default reference pool %s; pass --reference "
                    "explicitly if the target shares a capability with one of them", target_spec, DEFAULT_REFERENCE_POOL)
    t = _norm_spec(target_spec)
    return [r for r in DEFAULT_REFERENCE_POOL if _norm_spec(r) != t and (fam is None or family_of(r) != fam)]


# ---------------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ContrastConfig:
    """Parameters of a contrastive rule (see the module docstring). ``None`` means the rule's documented default."""

    rule: str = "subtract"
    threshold: float | None = None  # freq-diff 0.5, freq-ratio 3.0, score-diff 3.0 (z) / 0.3 (rank)
    top_n: int | None = None  # keep the n best instead of a threshold (not for subtract / none)
    min_target_freq: float | None = None  # floor on f_t (fraction or count); default locate min_freq (score-diff: none)
    ref_agg: str = "mean"  # how reference frequencies / scores are combined: mean | max
    ref_min_freq: float | None = None  # subtract: reference commonality threshold (default = locate min_freq)
    ref_mode: str = "any"  # subtract: any (each reference separately) | pooled
    smoothing: float = 1.0  # freq-ratio additive smoothing a
    norm: str = "z"  # score-diff per-sample normalisation: z | rank
    max_entropy: float = 0.5  # lape: normalised entropy threshold
    entropy_quantile: float | None = None  # lape: keep the lowest quantile of entropies instead (LAPE: 0.01)

    def __post_init__(self):
        self.rule = str(self.rule).strip().lower().replace("_", "-")
        if self.rule not in CONTRAST_RULES:
            raise CaplocError(f"unknown contrast rule {self.rule!r}; choose one of {', '.join(CONTRAST_RULES)}")
        if self.ref_agg not in REF_AGGS:
            raise CaplocError(f"unknown ref_agg {self.ref_agg!r}; choose mean or max")
        if self.ref_mode not in ("any", "pooled"):
            raise CaplocError(f"unknown ref_mode {self.ref_mode!r}; choose any or pooled")
        if self.norm not in NORMS:
            raise CaplocError(f"unknown norm {self.norm!r}; choose z or rank")
        if self.top_n is not None and (int(self.top_n) != self.top_n or self.top_n < 1):
            raise CaplocError(f"top_n must be a positive integer, got {self.top_n}")
        if self.top_n is not None and self.rule in ("none", "subtract"):
            raise CaplocError(f"top_n does not apply to the {self.rule} rule; use freq-diff, freq-ratio, score-diff or lape")
        if self.smoothing < 0:
            raise CaplocError(f"smoothing must be >= 0, got {self.smoothing}")
        if not 0 <= self.max_entropy <= 1:
            raise CaplocError(f"max_entropy is a normalised entropy in [0, 1], got {self.max_entropy}")
        if self.entropy_quantile is not None and not 0 < self.entropy_quantile <= 1:
            raise CaplocError(f"entropy_quantile must be in (0, 1], got {self.entropy_quantile}")
        for name in ("min_target_freq", "ref_min_freq"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise CaplocError(f"{name} must be >= 0, got {v}")

    def resolved_threshold(self) -> float | None:
        if self.threshold is not None:
            return float(self.threshold)
        return {"freq-diff": 0.5, "freq-ratio": 3.0, "score-diff": 3.0 if self.norm == "z" else 0.3}.get(self.rule)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["threshold_used"] = self.resolved_threshold()
        return d

    @classmethod
    def from_params(cls, rule: str, **params) -> "ContrastConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(params) - known)
        if bad:
            raise CaplocError(f"unknown contrast parameter(s) {', '.join(bad)}; known: {', '.join(sorted(known - {'rule'}))}")
        return cls(rule=rule, **params)


# ---------------------------------------------------------------------------------------------------------------------
# pure functions over frequency tables
# ---------------------------------------------------------------------------------------------------------------------
def _floor_mask(f_t: np.ndarray, n_t: int, min_freq: float | None) -> np.ndarray:
    if min_freq is None or min_freq == 0:
        return np.ones_like(f_t, dtype=bool)
    return np.rint(f_t * n_t).astype(np.int64) >= min_count(min_freq, n_t)


def aggregate_ref(ref: np.ndarray, agg: str) -> np.ndarray:
    """ref [K, n] -> [n]: mean (an equal-weight mix of the references) or max over references."""
    ref = np.asarray(ref, dtype=np.float64).reshape(-1, ref.shape[-1])
    if ref.shape[0] == 0:
        raise CaplocError("contrastive localization needs at least one reference dataset")
    return ref.mean(0) if agg == "mean" else ref.max(0)


def normalised_entropy(freqs: np.ndarray) -> np.ndarray:
    """freqs [C, n] (one row per capability) -> [n]: entropy of q = p / sum(p) divided by log(C).

    Neurons never selected anywhere (sum 0) get nan. 0 log 0 = 0.
    """
    p = np.asarray(freqs, dtype=np.float64)
    C = p.shape[0]
    if C < 2:
        raise CaplocError("LAPE entropy needs the target and at least one reference")
    tot = p.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = p / tot
        h = -np.where(q > 0, q * np.log(q), 0.0).sum(0) / math.log(C)
    h[tot <= 0] = np.nan
    return h


def _keep_by(stat: np.ndarray, eligible: np.ndarray, threshold: float | None, top_n: int | None,
             larger_is_better: bool = True) -> np.ndarray:
    keep = np.zeros(stat.shape, dtype=bool)
    ok = eligible & np.isfinite(stat)
    if top_n is not None:
        idx = np.nonzero(ok)[0]
        key = -stat[idx] if larger_is_better else stat[idx]
        order = np.lexsort((idx, key))  # primary: key, ties: lower flat index
        keep[idx[order[: int(top_n)]]] = True
        return keep
    if threshold is None:
        keep[ok] = True
    elif larger_is_better:
        keep[ok] = stat[ok] >= threshold
    else:
        keep[ok] = stat[ok] <= threshold
    return keep


def contrast_from_counts(target_counts, n_target: int, ref_counts: dict[str, tuple], cfg: ContrastConfig,
                         min_freq: float = 0.5) -> tuple[np.ndarray, np.ndarray, dict]:
    """The frequency rules (none, subtract, freq-diff, freq-ratio, lape) on count tables.

    target_counts [n] selection counts of ``n_target`` samples; ``ref_counts[name] = (counts [n], n_samples)``.
    ``min_freq`` is the locate threshold (fraction or count). Returns ``(keep [n] bool, statistic [n], info)``.
    """
    if cfg.rule == "score-diff":
        raise CaplocError("score-diff needs per-sample scores, not counts; call contrastive_set with the scores")
    c_t = np.asarray(target_counts, dtype=np.float64)
    f_t = c_t / n_target
    names = list(ref_counts)
    if cfg.rule != "none" and not names:
        raise CaplocError("contrastive localization needs at least one reference dataset")
    R_c = np.stack([np.asarray(ref_counts[k][0], dtype=np.float64) for k in names]) if names else np.zeros((0, c_t.size))
    R_n = np.asarray([ref_counts[k][1] for k in names], dtype=np.float64)
    for k, (cnt, n) in ref_counts.items():
        if np.asarray(cnt).shape != c_t.shape:
            raise IncompatibleResultError(f"reference {k!r} has {np.asarray(cnt).size} neurons, the target {c_t.size}")
        if n < 1:
            raise CaplocError(f"reference {k!r} has no samples")
    R_f = R_c / R_n[:, None] if names else R_c
    floor_freq = min_freq if cfg.min_target_freq is None else cfg.min_target_freq
    floor = _floor_mask(f_t, n_target, floor_freq)
    plain = c_t >= min_count(min_freq, n_target)
    info = {"target_freq": f_t, "ref_freq": R_f, "ref_names": names, "plain": plain}
    thr = cfg.resolved_threshold()
    if cfg.rule == "none":
        return plain, f_t, info
    if cfg.rule == "subtract":
        rmf = min_freq if cfg.ref_min_freq is None else cfg.ref_min_freq
        if cfg.ref_mode == "pooled":
            common = R_c.sum(0) >= min_count(rmf, int(R_n.sum()))
        else:
            common = np.zeros(c_t.shape, dtype=bool)
            for j in range(len(names)):
                common |= R_c[j] >= min_count(rmf, int(R_n[j]))
        info["ref_common"] = common
        return plain & ~common, f_t - R_f.max(0), info
    if cfg.rule == "freq-diff":
        stat = f_t - aggregate_ref(R_f, cfg.ref_agg)
        return _keep_by(stat, floor, thr, cfg.top_n), stat, info
    if cfg.rule == "freq-ratio":
        a = cfg.smoothing
        if a == 0 and (R_c == 0).any():
            log.info("freq-ratio without smoothing: neurons never selected on a reference get an infinite ratio")
        ft_s = (c_t + a) / (n_target + 2 * a)
        fr_s = (R_c + a) / (R_n[:, None] + 2 * a)
        with np.errstate(divide="ignore", invalid="ignore"):
            stat = ft_s / aggregate_ref(fr_s, cfg.ref_agg)
        stat = np.where(np.isnan(stat), 0.0, stat)
        return _keep_by(stat, floor, thr, cfg.top_n), stat, info
    if cfg.rule == "lape":
        P = np.vstack([f_t[None], R_f])
        H = normalised_entropy(P)
        on_target = P.argmax(0) == 0  # ties go to the target only if it is the first maximum (argmax picks row 0)
        elig = floor & on_target & np.isfinite(H)
        info["entropy"] = H
        if cfg.top_n is not None:
            keep = _keep_by(H, elig, None, cfg.top_n, larger_is_better=False)
        elif cfg.entropy_quantile is not None:
            cut = float(np.quantile(H[floor & np.isfinite(H)], cfg.entropy_quantile)) if (floor & np.isfinite(H)).any() else -1.0
            info["entropy_cut"] = cut
            keep = _keep_by(H, elig, cut, None, larger_is_better=False)
        else:
            keep = _keep_by(H, elig, cfg.max_entropy, None, larger_is_better=False)
        return keep, H, info
    raise CaplocError(f"unknown contrast rule {cfg.rule!r}")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------------------------
# from per-sample scores
# ---------------------------------------------------------------------------------------------------------------------
def _flat(scores: torch.Tensor) -> torch.Tensor:
    return scores.reshape(scores.shape[0], -1) if scores.dim() == 3 else scores


def selection_counts(scores: torch.Tensor, lcfg: LocateConfig) -> np.ndarray:
    """scores [N, L, d] or [N, n] -> per-neuron selection counts [n] under the locate per-sample rule."""
    return select(_flat(scores), lcfg.rule, lcfg.rule_value).sum(0).numpy().astype(np.int64)


def normalise_scores(scores: torch.Tensor, norm: str = "z") -> torch.Tensor:
    """[N, n] -> [N, n] float64: per-sample z-score (population sd; constant samples -> 0) or percentile rank."""
    s = _flat(scores).double()
    if norm == "z":
        mu = s.mean(1, keepdim=True)
        sd = s.std(1, keepdim=True, unbiased=False)
        return torch.where(sd > 0, (s - mu) / sd.clamp(min=1e-300), torch.zeros_like(s))
    if norm == "rank":
        n = s.shape[1]
        ranks = torch.empty_like(s)
        order = s.argsort(dim=1, stable=True)
        ranks.scatter_(1, order, torch.arange(n, dtype=s.dtype).expand_as(s).contiguous())
        return ranks / max(n - 1, 1)
    raise CaplocError(f"unknown norm {norm!r}; choose z or rank")


def contrast_arrays(target_scores: torch.Tensor, reference_scores: dict[str, torch.Tensor], cfg: ContrastConfig,
                    lcfg: LocateConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(keep [n], statistic [n], info)`` for any rule, from per-sample scores."""
    t = _flat(target_scores)
    refs = {k: _flat(v) for k, v in reference_scores.items()}
    for k, v in refs.items():
        if v.shape[1] != t.shape[1]:
            raise IncompatibleResultError(f"reference {k!r} scores have {v.shape[1]} neurons, the target {t.shape[1]}")
        if v.shape[0] == 0:
            raise CaplocError(f"reference {k!r} has no samples")
    c_t = selection_counts(t, lcfg)
    rc = {k: (selection_counts(v, lcfg), v.shape[0]) for k, v in refs.items()}
    if cfg.rule != "score-diff":
        return contrast_from_counts(c_t, t.shape[0], rc, cfg, lcfg.min_freq)
    if not refs:
        raise CaplocError("contrastive localization needs at least one reference dataset")
    base_keep, _, info = contrast_from_counts(c_t, t.shape[0], rc, ContrastConfig(rule="none"), lcfg.min_freq)
    mt = normalise_scores(t, cfg.norm).mean(0).numpy()
    mr = np.stack([normalise_scores(v, cfg.norm).mean(0).numpy() for v in refs.values()])
    stat = mt - aggregate_ref(mr, cfg.ref_agg)
    floor = _floor_mask(c_t / t.shape[0], t.shape[0], cfg.min_target_freq)
    info["target_mean_norm"], info["ref_mean_norm"] = mt, mr
    return _keep_by(stat, floor, cfg.resolved_threshold(), cfg.top_n), stat, info


def contrastive_set(target_scores: torch.Tensor, reference_scores: dict[str, torch.Tensor], rule: str = "subtract",
                    *, locate_cfg: LocateConfig | None = None, meta: dict | None = None, **params) -> NeuronSet:
    """The contrastive neuron set of a target against references, from per-sample scores.

    target_scores ``[N_t, L, d]``; reference_scores ``{name: [N_r, L, d]}`` (same model and attribution settings);
    ``rule`` one of :data:`CONTRAST_RULES`; ``params`` are :class:`ContrastConfig` fields; ``locate_cfg`` gives the
    per-sample rule and ``min_freq`` (default ``LocateConfig()``: sigma = 6, min_freq = 0.5). The set's
    ``frequency``/``mean_score``/``counts`` are the target's; ``meta["contrast"]`` records the rule and its parameters.
    """
    lcfg = locate_cfg or LocateConfig()
    cfg = ContrastConfig.from_params(rule, **params)
    if target_scores.dim() != 3:
        raise CaplocError(f"target scores must be [samples, layers, d_mlp], got shape {tuple(target_scores.shape)}")
    N, L, d = target_scores.shape
    keep, stat, info = contrast_arrays(target_scores, reference_scores, cfg, lcfg)
    sel = np.nonzero(keep)[0]
    f_t = info["target_freq"]
    counts = np.rint(f_t * N).astype(np.int64)
    mean = _flat(target_scores).double().mean(0).numpy()
    plain = info["plain"]
    m = dict(meta or {})
    m.update({
        "rule": lcfg.rule, "rule_value": lcfg.rule_value, "min_freq": lcfg.min_freq, "min_count": min_count(lcfg.min_freq, N),
        "contrast": {**cfg.to_dict(), "references": {k: int(v.shape[0]) for k, v in reference_scores.items()},
                     "plain_size": int(plain.sum()), "removed_from_plain": int((plain & ~keep).sum()),
                     "added_outside_plain": int((keep & ~plain).sum())},
    })
    return NeuronSet.from_flat(sel, L, d, frequency=f_t[sel], mean_score=mean[sel], counts=counts, n_samples=N, meta=m)


# ---------------------------------------------------------------------------------------------------------------------
# specificity from the stores, split agreement
# ---------------------------------------------------------------------------------------------------------------------
def store_specificity(flat_set: np.ndarray, target_freq: np.ndarray, ref_freq: np.ndarray, ref_names: list[str],
                      min_freq_frac: float) -> dict:
    """How much of a set is also common elsewhere, from frequency tables (no model needed).

    ``common_elsewhere``: share of the set's neurons with reference frequency >= ``min_freq_frac`` on at least one
    reference; ``common_everywhere``: on every reference; mean frequencies on the target and each reference.
    """
    flat_set = np.asarray(flat_set, dtype=np.int64)
    out = {"n": int(flat_set.size)}
    if flat_set.size == 0:
        out.update(common_elsewhere=float("nan"), common_everywhere=float("nan"), target_freq=float("nan"),
                   ref_freq={k: float("nan") for k in ref_names})
        return out
    R = ref_freq[:, flat_set] if len(ref_names) else np.zeros((0, flat_set.size))
    com = R >= min_freq_frac - 1e-12
    out["common_elsewhere"] = float(com.any(0).mean()) if len(ref_names) else float("nan")
    out["common_everywhere"] = float(com.all(0).mean()) if len(ref_names) else float("nan")
    out["target_freq"] = float(target_freq[flat_set].mean())
    out["ref_freq"] = {k: float(R[j].mean()) for j, k in enumerate(ref_names)}
    return out


def _split_fns():
    """The stability module's split and pair-record functions when it is installed, else None (fallback below)."""
    try:
        from .splits import pair_record, split_indices
    except ImportError:  # pragma: no cover - stability.py is part of the package
        return None
    return split_indices, pair_record


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    fns = _split_fns()
    if fns is not None:
        parts = fns[0](n, None, 2, seed, "random")
        return np.sort(parts[0]), np.sort(parts[1])
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def _half_cfg(lcfg: LocateConfig, n_full: int) -> LocateConfig:
    """An absolute min_freq count (> 1) becomes the same fraction of the samples on each half."""
    if lcfg.min_freq > 1:
        from .attribution.engine import AttributionConfig

        d = lcfg.to_dict()
        d["attribution"] = AttributionConfig(**d["attribution"])
        d["min_freq"] = lcfg.min_freq / n_full
        return LocateConfig(**d)
    return lcfg


def split_agreement(target_scores: torch.Tensor, reference_scores: dict[str, torch.Tensor], cfg: ContrastConfig,
                    lcfg: LocateConfig, n_seeds: int = 5, seed: int = 0) -> dict:
    """Stability of a (contrastive) set: random 2-splits of the target AND of every reference sample set.

    For split seed s (``seed .. seed + n_seeds - 1``) every dataset's samples are split in two disjoint random halves
    (``caploc.splits.split_indices``, i.e. ``caploc.data.random_splits``; the reference halves use seeds offset by
    1000 * (j + 1)); set A is computed from the first halves, set B from the second halves, with the same rule. An
    absolute ``min_freq`` count becomes the same fraction of each half. Returns the mean / sd over seeds of IoU and of
    the overlap rate (mean of both directions), the per-seed records and the IoU expected for two random sets with the
    same per-layer sizes (exact, ``caploc.stats``).
    """
    from . import stats

    t = target_scores
    N, L, d = t.shape
    if N < 2 or any(v.shape[0] < 2 for v in reference_scores.values()):
        raise CaplocError("split agreement needs at least 2 samples in the target and in every reference")
    hcfg = _half_cfg(lcfg, N)
    fns = _split_fns()
    per = []
    for s in range(seed, seed + int(n_seeds)):
        ti = _halves(N, s)
        ri = {k: _halves(v.shape[0], s + 1000 * (j + 1)) for j, (k, v) in enumerate(reference_scores.items())}
        sets = []
        for h in (0, 1):
            tt = t[torch.as_tensor(ti[h])]
            rr = {k: v[torch.as_tensor(ri[k][h])] for k, v in reference_scores.items()}
            keep, _, _ = contrast_arrays(tt, rr, cfg, hcfg)
            sets.append(np.nonzero(keep)[0].astype(np.int64))
        a, b = sets
        if fns is not None:
            rec = fns[1](a, b, L, d)
            chance = rec.get("chance_iou", float("nan"))
        else:
            rec = stats.agreement(a, b)
            sa, sb = stats.per_layer_counts(a, L, d), stats.per_layer_counts(b, L, d)
            chance = stats.expected_random_agreement(sa, sb, d)["iou"] if (a.size and b.size) else float("nan")
        per.append({"seed": s, "size_a": int(a.size), "size_b": int(b.size), "iou": float(rec["iou"]),
                    "overlap": float(rec["overlap"]), "chance_iou": float(chance)})

    def ms(key):
        v = np.asarray([p[key] for p in per], dtype=np.float64)
        ok = v[np.isfinite(v)]
        return (float(ok.mean()) if ok.size else float("nan"), float(ok.std()) if ok.size else float("nan"))

    iou_m, iou_s = ms("iou")
    ov_m, ov_s = ms("overlap")
    ch_m, _ = ms("chance_iou")
    return {"iou": iou_m, "iou_sd": iou_s, "overlap": ov_m, "overlap_sd": ov_s, "chance_iou": ch_m,
            "n_seeds": int(n_seeds), "per_seed": per,
            "method": "random 2-splits of target and every reference" + (" (caploc.splits split functions)" if fns else "")}


# ---------------------------------------------------------------------------------------------------------------------
# run directories
# ---------------------------------------------------------------------------------------------------------------------
_PERF_KEYS = ("memory_mb", "max_rows", "batch_size", "reuse", "completeness")


def locate_config_from_meta(meta: dict) -> LocateConfig:
    from .attribution.engine import AttributionConfig

    c = dict(meta.get("config") or {})
    if not c:
        raise CaplocError("the run's neurons.json has no 'config': it was not written by caploc locate")
    c["attribution"] = AttributionConfig(**c.get("attribution", {}))
    known = {f.name for f in fields(LocateConfig)}
    return LocateConfig(**{k: v for k, v in c.items() if k in known})


def _store_spec(run_dir: Path) -> dict:
    return read_json(run_dir / "scores" / "store.json").get("spec", {})


def check_same_settings(target_dir: Path, ref_dir: Path) -> None:
    """Refuse references scored on another model or with other attribution settings (frequencies are not comparable)."""
    a, b = _store_spec(target_dir), _store_spec(ref_dir)
    ma, mb = a.get("model", {}), b.get("model", {})
    if (ma.get("n_layers"), ma.get("d_mlp")) != (mb.get("n_layers"), mb.get("d_mlp")) or ma.get("fingerprint") != mb.get("fingerprint"):
        raise IncompatibleResultError(f"reference {ref_dir} was scored on another model ({mb.get('model_id')}, "
                                      f"fingerprint {mb.get('fingerprint')}) than the target ({ma.get('model_id')}, "
                                      f"{ma.get('fingerprint')}): localize the reference on the target's model")
    aa = {k: v for k, v in a.get("attribution", {}).items() if k not in _PERF_KEYS}
    ab = {k: v for k, v in b.get("attribution", {}).items() if k not in _PERF_KEYS}
    if aa != ab or a.get("chat") != b.get("chat"):
        diff = sorted(k for k in set(aa) | set(ab) if aa.get(k) != ab.get(k)) + (["chat"] if a.get("chat") != b.get("chat") else [])
        raise CaplocError(f"reference {ref_dir} was scored with other attribution settings ({', '.join(diff)}): "
                          "re-localize it with the target's settings or pass it as a dataset spec")


def spec_from_source(source: dict | None, name: str | None = None) -> str | None:
    """The ``load_dataset`` spec that made a dataset, from its ``source`` (None if it cannot be rebuilt)."""
    s = source or {}
    loader = s.get("loader")
    if loader in ("gsm_symbolic", "facts", "humaneval"):
        return loader
    if loader == "reasoning_gym" and s.get("task"):
        return f"rg:{s['task']}"
    for key in ("path", "file_path"):
        if s.get(key) and Path(str(s[key])).exists():
            return str(s[key])
    return name if name in ("gsm_symbolic", "facts", "humaneval") else None


def is_run_dir(p: str | Path) -> bool:
    p = Path(str(p)).expanduser()
    return p.is_dir() and (p / "scores" / "store.json").exists()


@dataclass
class ContrastResult:
    neurons: NeuronSet
    plain: NeuronSet
    out_dir: Path
    table: list[dict] = field(default_factory=list)
    references: dict[str, str] = field(default_factory=dict)


def resolve_references(run_dir: Path, references, lm=None, out_root: Path | None = None, *, n: int | None = None,
                       seed: int | None = None, progress: bool | None = None) -> dict[str, Path]:
    """Reference run directories for ``references`` (run dirs, or dataset specs localized with the target's settings).

    ``references=None`` -> :func:`default_references` of the target dataset. Dataset specs are localized into
    ``out_root/<name>`` (resumable) with the target run's LocateConfig, the target's number of samples and data seed,
    unless ``n`` / ``seed`` are given; ``lm`` is loaded from the run's model id when needed and not given.
    """
    from .localize import locate

    run_dir = Path(run_dir)
    meta = read_json(run_dir / "neurons.json")
    if references is None:
        spec = spec_from_source(meta.get("dataset_source"), meta.get("dataset")) or meta.get("dataset", "")
        references = default_references(spec)
        log.info("default reference mix for %s: %s", spec, references)
    if isinstance(references, str):
        references = [r for r in references.split(",") if r.strip()]
    out: dict[str, Path] = {}
    todo = []
    for r in references:
        r = str(r).strip()
        if is_run_dir(r):
            rm = read_json(Path(r) / "neurons.json") if (Path(r) / "neurons.json").exists() else {}
            name = rm.get("dataset") or Path(r).name
            if name in out:
                name = f"{name}@{Path(r).name}"
            out[name] = Path(r)
        else:
            todo.append(r)
    if todo:
        from .data import load_dataset

        lcfg = locate_config_from_meta(meta)
        if lm is None:
            from .models.loading import load_model

            mid = meta.get("model_id")
            if not mid:
                raise CaplocError(f"{run_dir} does not name its model; pass the model to score the reference datasets")
            lm = load_model(mid, dtype=_store_spec(run_dir).get("model", {}).get("dtype") or "float32")
        if lm.info.get("fingerprint") != meta.get("model_fingerprint"):
            raise IncompatibleResultError(f"the model to score references ({lm.model_id}) is not the target run's model "
                                          f"({meta.get('model_id')}): pass the same model")
        n_ref = n if n is not None else int(meta.get("n_samples") or 0) or None
        seed_ref = seed if seed is not None else int(meta.get("seed") or 0)
        root = Path(out_root) if out_root is not None else run_dir / "references"
        for spec in todo:
            ds = load_dataset(spec, n=n_ref, seed=seed_ref)
            d = root / ds.name
            log.info("localizing reference %s (%d samples) into %s", spec, len(ds), d)
            locate(lm, ds, lcfg, d, progress=progress)
            out[ds.name] = d
    for name, d in out.items():
        check_same_settings(run_dir, d)
    return out


def contrast(run_dir: Path | str, reference_run_dirs, cfg: ContrastConfig | None = None, out_dir: Path | str | None = None,
             *, lm=None, split_seeds: int = 5, seed: int = 0, progress: bool | None = None) -> ContrastResult:
    """Contrastive localization of a locate run against references; writes a neuron-set directory with report.json.

    ``reference_run_dirs``: locate run directories and/or dataset specs (scored first with the target's settings,
    see :func:`resolve_references`), or None for the default mix. ``out_dir`` (default ``run_dir/contrast-<rule>``)
    gets ``neurons.{json,safetensors}`` (the contrastive set), ``plain.{json,safetensors}`` (the commonality set),
    ``contrast.safetensors`` (per-neuron statistic and frequency tables) and ``report.json``; ``split_seeds`` random
    2-splits measure the split agreement of both sets (0 skips it).
    """
    t0 = time.time()
    cfg = cfg or ContrastConfig()
    run_dir = Path(run_dir)
    meta = read_json(run_dir / "neurons.json")
    lcfg = locate_config_from_meta(meta)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / f"contrast-{cfg.rule}"
    refs = resolve_references(run_dir, reference_run_dirs, lm=lm, out_root=run_dir / "references", progress=progress)
    if not refs and cfg.rule != "none":
        raise CaplocError("no reference datasets: pass --reference with run directories or dataset specs")
    tdata = load_scores(run_dir)["scores"]
    rdata = {k: load_scores(d)["scores"] for k, d in refs.items()}
    base_meta = {k: v for k, v in meta.items() if k not in ("rule", "rule_value", "min_freq", "min_count", "contrast",
                                                             "per_sample_selected_mean")}
    ns = contrastive_set(tdata, rdata, cfg.rule, locate_cfg=lcfg, meta={**base_meta, "source_run": str(run_dir),
                         "reference_runs": {k: str(v) for k, v in refs.items()}},
                         **{k: v for k, v in asdict(cfg).items() if k != "rule"})
    plain = neuron_set_from_scores(tdata, lcfg, base_meta)
    keep, stat, info = contrast_arrays(tdata, rdata, cfg, lcfg)
    ns.save(out_dir)
    plain.save(out_dir, name="plain")
    names = info["ref_names"]
    atomic_save_tensors(out_dir / "contrast.safetensors", {
        "statistic": torch.from_numpy(np.asarray(stat, dtype=np.float64)),
        "target_freq": torch.from_numpy(np.asarray(info["target_freq"], dtype=np.float64)),
        "ref_freq": torch.from_numpy(np.asarray(info["ref_freq"], dtype=np.float64).reshape(len(names), -1)),
    }, metadata={"ref_names": ",".join(names), "rule": cfg.rule})
    N = tdata.shape[0]
    mf = min_count(lcfg.min_freq, N) / N
    rows = []
    for label, flat, c in (("plain", plain.flat, ContrastConfig(rule="none")), (cfg.rule, ns.flat, cfg)):
        sp = store_specificity(flat, info["target_freq"], info["ref_freq"], names, mf)
        sa = split_agreement(tdata, rdata, c, lcfg, n_seeds=split_seeds, seed=seed) if split_seeds else None
        rows.append({"set": label, "n_neurons": len(flat), "split_iou": sa["iou"] if sa else None,
                     "split_iou_sd": sa["iou_sd"] if sa else None, "chance_iou": sa["chance_iou"] if sa else None,
                     "split_overlap": sa["overlap"] if sa else None, **{f"{k}": v for k, v in sp.items() if k != "n"}})
    report = _report(run_dir, meta, cfg, lcfg, rows, names, refs, N)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_json(out_dir / "summary.json", {"rows": rows, "seconds": round(time.time() - t0, 2),
                                                 "caploc_version": __version__})
    log.info("contrastive set (%s): %d of %d plain neurons kept", cfg.rule, len(ns), len(plain))
    return ContrastResult(ns, plain, out_dir, rows, {k: str(v) for k, v in refs.items()})


def _fmt(v, nd=3):
    if v is None:
        return None
    if isinstance(v, float):
        return None if not math.isfinite(v) else round(v, nd)
    return v


def _report(run_dir, meta, cfg, lcfg, rows, names, refs, N) -> dict:
    cols = ["set", "neurons", "split IoU (mean ± sd)", "chance IoU", "target freq"] + [f"freq {k}" for k in names] + [
        "common on ≥1 ref", "common on all refs"]
    trows = []
    for r in rows:
        iou = None if r["split_iou"] is None else (f"{r['split_iou']:.3f} ± {r['split_iou_sd']:.3f}"
                                                   if math.isfinite(r["split_iou"]) else "nan")
        trows.append([r["set"], r["n_neurons"], iou, _fmt(r["chance_iou"], 5), _fmt(r["target_freq"])]
                     + [_fmt(r["ref_freq"].get(k)) for k in names] + [_fmt(r["common_elsewhere"]), _fmt(r["common_everywhere"])])
    plain, con = rows[0], rows[1]
    text = [
        f"Contrastive localization ({cfg.rule}) of {meta.get('dataset')} ({N} samples, {lcfg.attribution.method}, "
        f"{lcfg.rule}={lcfg.rule_value}, min_freq={lcfg.min_freq}) against {', '.join(names) or 'no references'}.",
        f"The plain commonality set has {plain['n_neurons']} neurons, of which "
        f"{_pct(plain['common_elsewhere'])} are also commonality neurons of at least one reference and "
        f"{_pct(plain['common_everywhere'])} of every reference; the {cfg.rule} set keeps {con['n_neurons']}.",
        "Specificity here is measured from selection frequencies only; erase effects on and off target are measured "
        "by `caploc intervene` (or `caploc generic --erase`).",
    ]
    claims = {"contrast_set_size": {"value": con["n_neurons"]}, "plain_set_size": {"value": plain["n_neurons"]},
              "plain_common_elsewhere": {"value": plain["common_elsewhere"]}}
    if con["split_iou"] is not None:
        claims["contrast_split_iou"] = {"value": con["split_iou"], "chance": con["chance_iou"]}
        claims["plain_split_iou"] = {"value": plain["split_iou"], "chance": plain["chance_iou"]}
    return {
        "kind": "contrast", "title": f"Contrastive localization ({cfg.rule}): {meta.get('dataset')}",
        "text": text,
        "tables": [{"title": "Plain vs contrastive set", "columns": cols, "rows": trows,
                    "note": "freq = mean selection frequency of the set's neurons on each dataset; split IoU: random "
                            "2-splits of target and reference samples; chance IoU: random sets of the same per-layer sizes."}],
        "figures": [], "claims": claims,
        "config": {"contrast": cfg.to_dict(), "locate": lcfg.to_dict(), "references": {k: str(v) for k, v in refs.items()},
                   "source_run": str(run_dir)},
    }


def _pct(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.0f} %"


# ---------------------------------------------------------------------------------------------------------------------
# erase-based specificity of a contrast result, and the locate post-processing
# ---------------------------------------------------------------------------------------------------------------------
def add_erase_specificity(out_dir: Path | str, lm, datasets: dict, target: str, n_random: int = 5, seed: int = 0,
                          batch_size: int = 4, chat: bool = False, progress: bool | None = None) -> dict:
    """Erase the plain and the contrastive set of a :func:`contrast` result on every dataset, vs random sets.

    ``datasets``: {name: Dataset} (use held-out samples); ``target``: the on-target name. Writes ``erase.json`` and
    adds a table to ``report.json`` (see :func:`caploc.generic.erase_specificity` for the numbers).
    """
    from .generic import erase_specificity

    out_dir = Path(out_dir)
    ns, plain = NeuronSet.load(out_dir), NeuronSet.load(out_dir, name="plain")
    ns.check_compatible(lm.site)
    rule = (ns.meta.get("contrast") or {}).get("rule", "contrast")
    res = erase_specificity(lm, {"plain": plain, rule: ns}, datasets, target=target, n_random=n_random, seed=seed,
                            batch_size=batch_size, chat=chat, progress=progress)
    atomic_write_json(out_dir / "erase.json", res)
    rep = read_json(out_dir / "report.json")
    names = list(datasets)
    cols = ["set", "neurons"] + [f"ΔNLL {k} (random)" for k in names] + [f"z {k}" for k in names] + [
        "specificity (nats)", "SI (z)"]
    rows = []
    for sname, r in res["sets"].items():
        rows.append([sname, r["n_neurons"]]
                    + [f"{r['delta'][k]:+.4f} ({r['random_mean'][k]:+.4f} ± {r['random_sd'][k]:.4f})"
                       if math.isfinite(r["random_mean"][k]) else f"{r['delta'][k]:+.4f}" for k in names]
                    + [_fmt(r["z"][k], 2) for k in names] + [_fmt(r.get("specificity"), 4), _fmt(r.get("si"), 3)])
    rep["tables"].append({"title": f"Erase effects on and off target ({target} on target)", "columns": cols, "rows": rows,
                          "note": f"ΔNLL: mean target NLL (nats/token, per-sample mean then mean over samples) erased "
                                  f"minus untouched; random: mean ± sd over {n_random} layer-matched random sets; "
                                  "z = (ΔNLL - random mean) / random sd; specificity = excess on target minus the "
                                  "largest excess off target (nats/token; favours sets that hurt more overall); SI = "
                                  "(z_on - z_off) / (|z_on| + |z_off|) with the largest off-target z."})
    for sname, r in res["sets"].items():
        key = "plain" if sname == "plain" else "contrast"
        rep["claims"][f"{key}_erase_specificity"] = {"value": r.get("specificity")}
        rep["claims"][f"{key}_erase_si"] = {"value": r.get("si")}
    try:
        plot_erase_specificity(res, out_dir / "fig_erase_specificity.png")
        rep["figures"] = [f for f in rep.get("figures", []) if f.get("file") != "fig_erase_specificity.png"] + [{
            "title": "Erase effect beyond random, per dataset", "file": "fig_erase_specificity.png",
            "caption": f"ΔNLL(set erased) minus the mean ΔNLL of {n_random} layer-matched random sets, on the target "
                       f"({target}) and off-target datasets; error bars: sd of the random sets."}]
    except Exception as e:  # a figure must never lose the numbers
        log.warning("could not draw the erase-specificity figure: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
    atomic_write_json(out_dir / "report.json", rep)
    return res


def plot_erase_specificity(res: dict, path: Path | str) -> Path:
    """Grouped bars: excess ΔNLL (set minus random mean) per dataset for every set, random sd as error bars."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    sets = list(res["sets"])
    dsn = list(next(iter(res["sets"].values()))["delta"]) if sets else []
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(dsn) + 1.5), 3.2), dpi=120)
    w = 0.8 / max(len(sets), 1)
    for j, sname in enumerate(sets):
        r = res["sets"][sname]
        x = np.arange(len(dsn)) + (j - (len(sets) - 1) / 2) * w
        y = [r["excess"][k] if math.isfinite(r["excess"][k]) else 0.0 for k in dsn]
        err = [r["random_sd"][k] if math.isfinite(r["random_sd"][k]) else 0.0 for k in dsn]
        ax.bar(x, y, w, yerr=err, capsize=2, label=f"{sname} ({r['n_neurons']})")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(dsn)))
    ax.set_xticklabels([k + (" *" if k == res.get("target") else "") for k in dsn], fontsize=8)
    ax.set_ylabel("ΔNLL − random (nats/token)", fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title("erase effect beyond random (* = target)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def apply_specificity(lm, run_dir: Path | str, dataset=None, *, contrast_rule: str = "none", references=None,
                      exclude_generic: bool = False, ccfg: ContrastConfig | None = None, gcfg=None,
                      split_seeds: int = 5, progress: bool | None = None) -> NeuronSet:
    """What ``caploc locate --contrast RULE --reference ... --exclude-generic`` does after localizing.

    The plain commonality set is kept as ``run_dir/plain.{json,safetensors}``; the final set (contrastive and/or
    without generic neurons) replaces ``run_dir/neurons.{json,safetensors}``, with ``meta["contrast"]`` /
    ``meta["excluded_generic"]`` saying what was done. Details: ``run_dir/contrast-<rule>/`` (report.json) and
    ``run_dir/generic/`` (report.json); a summary in ``run_dir/specificity.json``.
    """
    from .generic import GenericConfig, find_generic
    from .generic import exclude_generic as _exclude

    run_dir = Path(run_dir)
    plain = NeuronSet.load(run_dir)
    plain.save(run_dir, name="plain")
    final = plain
    summary: dict = {"plain_size": len(plain), "plain": "plain.json"}
    refs: dict[str, Path] = {}
    if contrast_rule and contrast_rule != "none":
        cfg = ccfg or ContrastConfig(rule=contrast_rule)
        if cfg.rule != ContrastConfig(rule=contrast_rule).rule:
            raise CaplocError(f"contrast rule {contrast_rule!r} differs from the given configuration's {cfg.rule!r}")
        res = contrast(run_dir, references, cfg, run_dir / f"contrast-{cfg.rule}", lm=lm, split_seeds=split_seeds,
                       progress=progress)
        refs = {k: Path(v) for k, v in res.references.items()}
        final = res.neurons
        summary.update(contrast=cfg.rule, contrast_dir=f"contrast-{cfg.rule}", contrast_size=len(final),
                       references=res.references)
    elif references:
        refs = resolve_references(run_dir, references, lm=lm, out_root=run_dir / "references", progress=progress)
    if exclude_generic:
        datasets = {}
        if dataset is not None:
            datasets[dataset.name] = dataset
        for name, d in refs.items():
            rm = read_json(d / "neurons.json")
            spec = spec_from_source(rm.get("dataset_source"), rm.get("dataset"))
            if spec is not None:
                from .data import load_dataset

                src = rm.get("dataset_source") or {}
                datasets[name] = load_dataset(spec, n=src.get("n"), seed=int(src.get("seed") or 0))
        runs = {(dataset.name if dataset is not None else "target"): run_dir, **refs}
        rep = find_generic(lm, datasets, runs, gcfg or GenericConfig(chat=bool(locate_config_from_meta(
            read_json(run_dir / "neurons.json")).chat)), progress=progress)
        rep.save(run_dir / "generic")
        before = len(final)
        final = _exclude(final, rep)
        summary.update(generic_dir="generic", generic_flagged=len(rep.generic_pairs), excluded_generic=before - len(final))
    final.save(run_dir)
    summary["final_size"] = len(final)
    atomic_write_json(run_dir / "specificity.json", summary)
    return final
