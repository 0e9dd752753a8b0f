"""Contrastive rules: keep the neurons that are common on a target capability but NOT on reference capabilities.

A commonality set can beat random neurons and still be *generic*: a few high-impact neurons that every text needs
(massive-activation / every-text neurons). Measured on SmolLM2-135M: an 18-neuron gsm set (grad x act, sigma = 6,
>= 50 % of 16 problems) raised gsm NLL by +0.85 when erased, but facts NLL by +2.15. The rules below compare the target
run with runs on a *reference mix* of other capabilities, all computed from the stored per-sample scores
(``RUN/scores``), so no new attribution is needed once every dataset has been scored with the same settings. This
module holds the rules (pure functions over frequency tables and per-sample scores); the ``caploc contrast`` verb over
run directories is :mod:`caploc.stages.contrast`.

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
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..config import check, setting
from ..errors import CaplocError, IncompatibleResultError
from ..localize import LocateConfig, min_count, select
from ..results import NeuronSet

log = logging.getLogger(__name__)

CONTRAST_RULES = ("none", "subtract", "freq-diff", "freq-ratio", "score-diff", "lape")
REF_AGGS = ("mean", "max")
NORMS = ("z", "rank")
REF_MODES = ("any", "pooled")

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

    rule: str = setting("subtract", help="Contrast rule: none | subtract | freq-diff | freq-ratio | score-diff | lape.",
                        choices=CONTRAST_RULES)
    threshold: float | None = setting(None, help="Rule threshold (default: freq-diff 0.5, freq-ratio 3, score-diff 3 "
                                      "sd (z) / 0.3 (rank)).")
    top_n: int | None = setting(None, help="Keep the n best neurons instead of a threshold (not for subtract / none).",
                                min=1)
    min_target_freq: float | None = setting(None, help="Floor on the target frequency, fraction or count (default: "
                                            "locate min_freq; score-diff: none).", min=0.0)
    ref_agg: str = setting("mean", help="Combine references: mean (equal-weight mix) | max.", choices=REF_AGGS)
    ref_min_freq: float | None = setting(None, help="subtract: reference commonality threshold (default: locate "
                                         "min_freq).", min=0.0)
    ref_mode: str = setting("any", help="subtract: any (each reference separately) | pooled.", choices=REF_MODES)
    smoothing: float = setting(1.0, help="freq-ratio additive (Laplace) smoothing.", min=0.0)
    norm: str = setting("z", help="score-diff per-sample normalisation: z | rank.", choices=NORMS)
    max_entropy: float = setting(0.5, help="lape: normalised entropy threshold.", min=0.0, max=1.0)
    entropy_quantile: float | None = setting(None, help="lape: keep this lowest quantile of entropies instead (LAPE: "
                                             "0.01).", min=0.0, max=1.0, min_exclusive=True)

    def __post_init__(self):
        self.rule = str(self.rule).strip().lower().replace("_", "-")
        if self.rule not in CONTRAST_RULES:
            raise CaplocError(f"unknown contrast rule {self.rule!r}; choose one of {', '.join(CONTRAST_RULES)}")
        if self.ref_agg not in REF_AGGS:
            raise CaplocError(f"unknown ref_agg {self.ref_agg!r}; choose mean or max")
        if self.ref_mode not in REF_MODES:
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
        check(self)

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
    """scores [N, L, d] or [N, n] -> per-neuron selection counts [n] under the locate per-sample rule
    (``sigma_layer`` needs the [N, L, d] form)."""
    n_layers = scores.shape[1] if scores.dim() == 3 else None
    return select(_flat(scores), lcfg.rule, lcfg.rule_value, n_layers=n_layers).sum(0).numpy().astype(np.int64)


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


__all__ = [
    "CONTRAST_RULES", "REF_AGGS", "NORMS", "REF_MODES", "DEFAULT_REFERENCE_POOL", "ContrastConfig", "family_of",
    "default_references", "aggregate_ref", "normalised_entropy", "contrast_from_counts", "selection_counts",
    "normalise_scores", "contrast_arrays", "contrastive_set",
]
