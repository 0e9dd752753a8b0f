"""Threshold-free faithfulness curves: how much of a capability does each localization method's top-k remove (or
keep), over a log-spaced grid of budgets, next to random rankings.

A *ranking* is a permutation of all ``n = n_layers * d_mlp`` flat neuron indices, most important first. For every
budget k and ranking we intervene on the top k with hooks only and measure the teacher-forced NLL per target token
on held-out on-target and off-target data:

* ``erase``: ablate the top k (default zero ablation, the paper's erase);
* ``keep``: ablate every neuron EXCEPT the top k (default mean ablation: each ablated neuron is set to its mean
  activation over reference tokens; zero-ablating 99 % of all MLP neurons destroys any model, whichever k are kept).

Normalization (as MIB, Mueller et al. 2025, relative to the untouched model M and the fully ablated model ∅ with the
same fill): erase ``y(k) = (NLL(erase top k) - NLL(M)) / (NLL(∅) - NLL(M))`` (share of the full-ablation damage);
keep ``y(k) = (NLL(∅) - NLL(keep top k)) / (NLL(∅) - NLL(M))`` (share of the model recovered). The area under the
curve (AUC) is the trapezoidal integral of ``y`` over ``x = log(k / k_min) / log(k_max / k_min)`` in [0, 1], so a
constant curve c has AUC c. Random rankings (uniform permutations, seeded) give the band.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------------------
from ..config import check, setting
from ..errors import CaplocError
from ..hooks import neuron_hooks

# --- stage-layer imports (redirect after the stage refactor) ---------------------------------------------------------
from ..measure import nll_sums
from ..memory import MEMORY_HELP
from ..progress import bar as progress_bar
from ..results import NeuronSet, atomic_write_json, read_json
from .masklearn import FILLS

log = logging.getLogger(__name__)

NORMS = ("raw", "pooled", "layer_z", "layer_max")
DIRECTIONS = ("erase", "keep")


# ---------------------------------------------------------------------------------------------------------------------
# rankings (pure)
# ---------------------------------------------------------------------------------------------------------------------
def normalize_scores(scores: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample normalization of scores [N, L, d] (float64 out).

    ``raw``: unchanged; ``pooled``: z-score over all neurons of the sample (what the sigma rule thresholds);
    ``layer_z``: z-score within each layer of the sample (the sigma_layer rule); ``layer_max``: divided by the
    layer's largest |score| in the sample (a per-layer max normalization)."""
    s = scores.double()
    if norm == "raw":
        return s
    if norm == "pooled":
        flat = s.reshape(s.shape[0], -1)
        return ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True, unbiased=False).clamp_min(1e-30)
                ).reshape(s.shape)
    if norm == "layer_z":
        return (s - s.mean(2, keepdim=True)) / s.std(2, keepdim=True, unbiased=False).clamp_min(1e-30)
    if norm == "layer_max":
        return s / s.abs().amax(2, keepdim=True).clamp_min(1e-30)
    raise CaplocError(f"unknown score normalization {norm!r}; choose one of {', '.join(NORMS)}")


def rank_by(primary: np.ndarray, *secondary: np.ndarray) -> np.ndarray:
    """All indices sorted by ``primary`` descending, ties by ``secondary`` keys descending, then by index."""
    keys = [np.arange(primary.size)] + [-np.asarray(s, dtype=np.float64) for s in reversed(secondary)]
    return np.lexsort(keys + [-np.asarray(primary, dtype=np.float64)]).astype(np.int64)


def score_ranking(scores: torch.Tensor, norm: str = "pooled") -> np.ndarray:
    """Ranking by the dataset-level score: the mean over samples of the normalized per-sample scores."""
    return rank_by(normalize_scores(scores, norm).mean(0).reshape(-1).numpy())


def frequency_ranking(scores: torch.Tensor, sigma: float = 6.0, norm: str = "pooled") -> np.ndarray:
    """The commonality rule made threshold-free: neurons ordered by how many samples select them under the sigma
    rule on ``norm``-normalized scores (``pooled`` = the paper's sigma rule, ``layer_z`` = sigma_layer), ties by the
    mean normalized score."""
    z = normalize_scores(scores, "pooled" if norm == "raw" else norm)
    counts = (z > sigma).sum(0).reshape(-1).double().numpy()
    return rank_by(counts, z.mean(0).reshape(-1).numpy())


def contrast_rankings(name: str, target: torch.Tensor, references: dict[str, torch.Tensor],
                      sigma: float = 6.0) -> dict[str, np.ndarray]:
    """The contrastive rules (:mod:`caploc.stages.contrast_rules`) made threshold-free, from per-sample scores of the
    target [N, L, d] and of reference capabilities {name: [N_r, L, d]} (same model and scorer):

    * ``<name>:contrast_z`` -- the ``score-diff`` statistic: the mean per-sample z-score (pooled over all neurons) on
      the target minus its mean over the references (an equal-weight mix), ties by the target's mean z;
    * ``<name>:contrast_freq`` -- the ``freq-diff`` statistic: the sigma rule's selection frequency on the target
      minus the mean over the references (``subtract`` with the frequency threshold swept), ties by ``contrast_z``.
    """
    if not references:
        raise CaplocError("contrastive rankings need at least one reference run")
    shape = tuple(target.shape[1:])
    for k, v in references.items():
        if tuple(v.shape[1:]) != shape:
            raise CaplocError(f"reference run {k!r} scores {tuple(v.shape[1:])} neurons per layer x layers, the "
                              f"target {shape}: score every run on the same model")
    zt = normalize_scores(target, "pooled")
    zr = [normalize_scores(v, "pooled") for v in references.values()]
    mt = zt.mean(0).reshape(-1).numpy()
    stat_z = mt - np.mean([z.mean(0).reshape(-1).numpy() for z in zr], axis=0)
    ft = (zt > sigma).double().mean(0).reshape(-1).numpy()
    stat_f = ft - np.mean([(z > sigma).double().mean(0).reshape(-1).numpy() for z in zr], axis=0)
    return {f"{name}:contrast_z": rank_by(stat_z, mt), f"{name}:contrast_freq": rank_by(stat_f, stat_z)}


def random_rankings(n: int, n_rankings: int, seed: int) -> list[np.ndarray]:
    """``n_rankings`` uniform random permutations of ``n`` neurons (seeds seed .. seed + n_rankings - 1)."""
    return [np.random.default_rng(seed + i).permutation(n).astype(np.int64) for i in range(n_rankings)]


def budget_grid(n: int, lo: float = 5e-5, hi: float = 0.02, points: int = 10) -> np.ndarray:
    """Log-spaced budgets k (distinct integers >= 1) from ``lo * n`` to ``hi * n`` neurons."""
    if not 0 < lo <= hi <= 1 or points < 2:
        raise CaplocError(f"budgets need 0 < lo <= hi <= 1 and >= 2 points, got lo={lo}, hi={hi}, points={points}")
    ks = np.unique(np.maximum(1, np.round(np.geomspace(lo * n, hi * n, points))).astype(np.int64))
    if ks.size < 2:
        raise CaplocError(f"the budget range {lo}..{hi} of {n} neurons gives fewer than 2 distinct budgets")
    return ks


def auc(ks, y):
    """Trapezoidal area under ``y`` over ``x = log(k / k_min) / log(k_max / k_min)`` (a constant c gives c). ``y``
    [K] gives a float; ``y`` [K, ...] one area per trailing index (e.g. bootstrap resamples)."""
    ks = np.asarray(ks, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if ks.size < 2 or y.shape[:1] != (ks.size,) or np.any(np.diff(ks) <= 0):
        raise CaplocError("auc needs >= 2 increasing budgets and one value per budget")
    x = np.log(ks / ks[0]) / math.log(ks[-1] / ks[0])
    a = np.tensordot(np.diff(x), (y[1:] + y[:-1]) / 2, axes=1)
    return float(a) if a.ndim == 0 else a


def normalized(direction: str, nll: np.ndarray, base, ablated) -> np.ndarray:
    """MIB-style normalization of NLLs (see the module docstring); ``base`` / ``ablated`` scalars or arrays that
    broadcast against ``nll``; NaN where the full ablation changes nothing (|ablated - base| < 1e-12)."""
    den = np.asarray(ablated, dtype=np.float64) - base
    den = np.where(np.abs(den) < 1e-12, np.nan, den)
    nll = np.asarray(nll, dtype=np.float64)
    return (nll - base) / den if direction == "erase" else (ablated - nll) / den


def rankings_from_scores(name: str, scores: torch.Tensor, norms=("pooled", "layer_z"), freq: bool = True,
                         sigma: float = 6.0) -> dict[str, np.ndarray]:
    """The rankings of one scorer's per-sample scores [N, L, d]: ``<name>:<norm>`` (mean normalized score) for each
    norm and, with ``freq``, ``<name>:cnl`` / ``<name>:cnl_layer`` (selection frequency under the pooled / per-layer
    sigma rule: the commonality rule with its threshold S swept)."""
    out = {f"{name}:{nm}": score_ranking(scores, nm) for nm in norms}
    if freq:
        out[f"{name}:cnl"] = frequency_ranking(scores, sigma, "pooled")
        out[f"{name}:cnl_layer"] = frequency_ranking(scores, sigma, "layer_z")
    return out


def encoded_sets(lm, specs: list[tuple[str, str]], n: int, seed: int, *, target: str = "cot",
                 exclude_prompts=frozenset()) -> list[tuple[str, list, str]]:
    """[(label, encoded, role)] for ``specs`` = [(spec, role)]: ``n`` samples of each (seed ``seed``), dropping any
    sample whose prompt is in ``exclude_prompts`` (e.g. the mask's training data)."""
    from ..data import encode_dataset, load_dataset

    labels = [spec for spec, _ in specs]
    if len(set(labels)) != len(labels):
        raise CaplocError(f"the evaluation data {labels} name one dataset twice; give each of --data / --off once")
    out = []
    for spec, role in specs:
        ds = load_dataset(spec, n=n + len(exclude_prompts), seed=seed, target=target)
        keep = [i for i, s in enumerate(ds) if s.prompt not in exclude_prompts][:n]
        if not keep:
            raise CaplocError(f"no held-out samples of {spec} left after excluding the training prompts")
        ds = ds.subset(keep, name=f"{ds.name}[seed {seed}]")
        max_len = getattr(lm.model.config, "max_position_embeddings", None)
        out.append((spec, encode_dataset(lm.tokenizer, ds, max_length=max_len), role))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the intervention: ablate a set (or its complement) with a fill
# ---------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ablate(site, flat, fill: torch.Tensor | None = None, *, complement: bool = False):
    """Set the neurons ``flat`` (or, with ``complement``, all others) to ``fill[l, i]`` (None: 0) at every position.
    Hooks only; an empty ablated set installs nothing."""
    n = site.n_layers * site.d_mlp
    chosen = torch.zeros(n, dtype=torch.bool)
    flat = torch.as_tensor(np.asarray(flat, dtype=np.int64))
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n):
        raise CaplocError(f"neuron index outside 0..{n - 1}")
    chosen[flat] = True
    drop = (~chosen if complement else chosen).reshape(site.n_layers, site.d_mlp)
    layers = [l for l in range(site.n_layers) if bool(drop[l].any())]

    def fn(layer, x):
        m = drop[layer].to(x.device)
        v = torch.zeros((), dtype=x.dtype, device=x.device) if fill is None else fill[layer].to(x.device, x.dtype)
        return torch.where(m, v, x)

    with neuron_hooks(site, {l: fn for l in layers}):
        yield


# ---------------------------------------------------------------------------------------------------------------------
# the curves
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class FaithConfig:
    lo: float = setting(5e-5, min=0, min_exclusive=True, max=1, help="Smallest budget (share of all MLP neurons).")
    hi: float = setting(0.02, min=0, min_exclusive=True, max=1, help="Largest budget (share of all MLP neurons).")
    points: int = setting(10, min=2, help="Log-spaced budgets between lo and hi.")
    n_random: int = setting(20, min=0, help="Random rankings for the band.")
    seed: int = setting(0, help="Seed of the random rankings.")
    directions: tuple = setting(DIRECTIONS, choices=DIRECTIONS, item=str,
                                help="erase (remove the top-k) and/or keep (keep only the top-k).")
    erase_fill: str = setting("zero", choices=FILLS, help="What an erased neuron is set to: zero | mean.")
    keep_fill: str = setting("mean", choices=FILLS, help="What the neurons outside the kept top-k are set to.")
    batch_size: int = setting(8, min=1, help="At most this many samples per forward pass.")
    memory_mb: float | None = setting(None, min=0, min_exclusive=True, help=MEMORY_HELP)

    def __post_init__(self):
        self.directions = tuple(self.directions)
        check(self)
        if not self.directions:
            raise CaplocError(f"directions must name at least one of {', '.join(DIRECTIONS)}")
        if self.lo >= self.hi:
            raise CaplocError(f"the smallest budget lo={self.lo} must be below the largest hi={self.hi}")

    def fill_of(self, direction: str) -> str:
        return self.erase_fill if direction == "erase" else self.keep_fill

    def to_dict(self) -> dict:
        d = asdict(self)
        d["directions"] = list(self.directions)
        return d


@dataclass
class FaithResult:
    """``nll[direction][label][method]``: NLL per target token at each budget ``ks`` (random rankings are methods
    ``random:<i>``); ``points[direction][label][name]``: (k, NLL) of fixed sets; ``base[label]``, ``ablated[direction]
    [label]``: the untouched and the fully ablated model."""

    ks: np.ndarray
    n_neurons: int
    nll: dict
    base: dict
    ablated: dict
    points: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)  # label -> on | off
    meta: dict = field(default_factory=dict)
    #: per held-out sample, for bootstrap CIs: ``counts[label]`` target tokens, ``base[label]`` / ``ablated[direction]
    #: [label]`` summed NLLs, ``nll[direction][label][method]`` summed NLLs per budget ([K][S]); empty in results
    #: written before it was recorded
    samples: dict = field(default_factory=dict)

    def methods(self) -> list[str]:
        d = next(iter(self.nll.values()))
        return [m for m in next(iter(d.values())) if not m.startswith("random:")]

    def randoms(self) -> list[str]:
        d = next(iter(self.nll.values()))
        return [m for m in next(iter(d.values())) if m.startswith("random:")]

    def curve(self, direction: str, label: str, method: str) -> np.ndarray:
        return normalized(direction, np.asarray(self.nll[direction][label][method]), self.base[label],
                          self.ablated[direction][label])

    def area(self, direction: str, label: str, method: str) -> float:
        return auc(self.ks, self.curve(direction, label, method))

    def auc_ci(self, direction: str, label: str, method: str, n_boot: int = 2000, seed: int = 0,
               level: float = 0.95) -> tuple[float, float] | None:
        """Percentile bootstrap CI of the method's AUC over the held-out samples of ``label``: each resample draws
        samples with replacement and recomputes every NLL per token (untouched, fully ablated, each budget) as a
        ratio of summed NLL to summed tokens over the drawn samples, then the normalized curve and its AUC. None
        when the result has no per-sample record."""
        sp = self.samples
        if not sp or method not in sp.get("nll", {}).get(direction, {}).get(label, {}):
            return None
        c = np.asarray(sp["counts"][label], dtype=np.float64)
        idx = np.random.default_rng(seed).integers(0, c.size, size=(n_boot, c.size))
        tok = c[idx].sum(1)
        ratio = lambda v: np.asarray(v, dtype=np.float64)[..., idx].sum(-1) / tok  # noqa: E731 - [..., n_boot]
        y = normalized(direction, ratio(sp["nll"][direction][label][method]), ratio(sp["base"][label]),
                       ratio(sp["ablated"][direction][label]))  # [K, n_boot]
        a = auc(self.ks, y)
        a = a[np.isfinite(a)]
        if not a.size:
            return None
        return float(np.percentile(a, 100 * (1 - level) / 2)), float(np.percentile(a, 100 * (1 + level) / 2))

    def random_band(self, direction: str, label: str, q=(5, 95)) -> dict:
        """Per budget: mean and percentiles of the random rankings' normalized curves, and their AUCs."""
        rs = self.randoms()
        if not rs:
            return {}
        Y = np.stack([self.curve(direction, label, r) for r in rs])
        aucs = np.array([auc(self.ks, y) for y in Y])
        return {"mean": Y.mean(0), "lo": np.percentile(Y, q[0], axis=0), "hi": np.percentile(Y, q[1], axis=0),
                "auc": aucs, "q": list(q)}

    def summary_rows(self) -> list[dict]:
        """One row per direction x dataset x method: AUC, the random AUCs (mean, sd, max) and the method's rank."""
        rows = []
        for d in self.nll:
            for lab in self.nll[d]:
                band = self.random_band(d, lab)
                ra = band.get("auc", np.zeros(0))
                for m in self.methods():
                    a = self.area(d, lab, m)
                    rows.append({
                        "direction": d, "dataset": lab, "role": self.roles.get(lab), "method": m, "auc": a,
                        "auc_ci": self.auc_ci(d, lab, m),
                        "random_auc_mean": float(ra.mean()) if ra.size else None,
                        "random_auc_sd": float(ra.std(ddof=1)) if ra.size > 1 else None,
                        "random_auc_max": float(ra.max()) if ra.size else None,
                        "z_vs_random": float((a - ra.mean()) / ra.std(ddof=1)) if ra.size > 1 and ra.std() > 0 else None,
                        "share_random_ge": float((ra >= a).mean()) if ra.size else None,
                        "nll_at_max_budget": float(self.nll[d][lab][m][-1]), "base_nll": self.base[lab],
                    })
        return rows

    def to_dict(self) -> dict:
        return {"kind": "faithfulness", "ks": self.ks.tolist(), "n_neurons": self.n_neurons, "nll": _lists(self.nll),
                "base": self.base, "ablated": self.ablated, "points": _lists(self.points), "roles": self.roles,
                "meta": self.meta, "samples": _lists(self.samples)}

    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        atomic_write_json(out_dir / "faithfulness.json", self.to_dict())
        return out_dir / "faithfulness.json"

    @classmethod
    def load(cls, out_dir: Path | str) -> "FaithResult":
        js = read_json(Path(out_dir) / "faithfulness.json")
        if js.get("kind") != "faithfulness":
            raise CaplocError(f"{out_dir} is not a caploc faithfulness directory")
        return cls(np.asarray(js["ks"], dtype=np.int64), int(js["n_neurons"]), js["nll"], js["base"], js["ablated"],
                   js.get("points", {}), js.get("roles", {}), js.get("meta", {}), js.get("samples", {}))


def _lists(d):
    if isinstance(d, dict):
        return {k: _lists(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_lists(v) for v in d]
    if isinstance(d, np.ndarray):
        return d.tolist()
    return d


def _nll(lm, encoded, cfg: FaithConfig) -> tuple[float, np.ndarray, np.ndarray]:
    """NLL per target token of ``encoded``, and the per-sample summed NLLs and token counts behind it."""
    sums, counts = nll_sums(lm, encoded, batch_size=cfg.batch_size, progress=False, memory_mb=cfg.memory_mb)
    return float(sums.sum() / counts.sum()), sums, counts


def faithfulness(lm, rankings: dict[str, np.ndarray], datasets: list[tuple[str, list, str]],
                 cfg: FaithConfig | None = None, *, means: torch.Tensor | None = None,
                 sets: dict[str, NeuronSet] | None = None, progress: bool | None = None,
                 meta: dict | None = None) -> FaithResult:
    """Curves for every ranking (plus ``cfg.n_random`` random ones) on ``datasets`` = [(label, encoded, role)].

    ``means`` [L, d]: the fill of mean ablation (needed when a direction uses it). ``sets``: fixed neuron sets
    (e.g. thresholded CNL sets, the learned mask's set) measured as single points at their own size."""
    cfg = cfg or FaithConfig()
    site = lm.site
    n = site.n_layers * site.d_mlp
    for name, r in rankings.items():
        if np.asarray(r).shape != (n,) or np.unique(r).size != n:
            raise CaplocError(f"ranking {name!r} is not a permutation of the model's {n} MLP neurons")
    if any(cfg.fill_of(d) == "mean" for d in cfg.directions) and means is None:
        raise CaplocError("mean ablation needs the neurons' mean activations (means)")
    ks = budget_grid(n, cfg.lo, cfg.hi, cfg.points)
    allr = dict(rankings)
    for i, r in enumerate(random_rankings(n, cfg.n_random, cfg.seed)):
        allr[f"random:{i}"] = r
    first = {lab: _nll(lm, enc, cfg) for lab, enc, _ in datasets}
    base = {lab: v[0] for lab, v in first.items()}
    per = {"counts": {lab: v[2] for lab, v in first.items()}, "base": {lab: v[1] for lab, v in first.items()},
           "ablated": {}, "nll": {}}
    nll, ablated, points = {}, {}, {}
    jobs = len(cfg.directions) * (len(allr) * len(ks) + len(sets or {}))
    with progress_bar(jobs, "faithfulness", "intervention", progress) as bar:
        for d in cfg.directions:
            fill = means if cfg.fill_of(d) == "mean" else None
            keep = d == "keep"
            with ablate(site, np.arange(n), fill):
                full = {lab: _nll(lm, enc, cfg) for lab, enc, _ in datasets}
            ablated[d] = {lab: v[0] for lab, v in full.items()}
            per["ablated"][d] = {lab: v[1] for lab, v in full.items()}
            nll[d] = {lab: {} for lab, _, _ in datasets}
            per["nll"][d] = {lab: {} for lab, _, _ in datasets}
            for name, r in allr.items():
                for lab, _, _ in datasets:
                    nll[d][lab][name], per["nll"][d][lab][name] = [], []
                for k in ks:
                    with ablate(site, r[:k], fill, complement=keep):
                        for lab, enc, _ in datasets:
                            v, sums, _ = _nll(lm, enc, cfg)
                            nll[d][lab][name].append(v)
                            per["nll"][d][lab][name].append(sums)
                    bar.update(1)
            points[d] = {lab: {} for lab, _, _ in datasets}
            for name, s in (sets or {}).items():
                s.check_compatible(site)
                with ablate(site, s.flat, fill, complement=keep):
                    for lab, enc, _ in datasets:
                        points[d][lab][name] = [len(s), _nll(lm, enc, cfg)[0]]
                bar.update(1)
            log.info("faithfulness: %s done", d)
    info = {"config": cfg.to_dict(), "model_id": lm.info.get("model_id"),
            "model_fingerprint": lm.info.get("fingerprint"), "n_samples": {lab: len(enc) for lab, enc, _ in datasets},
            "n_target_tokens": {lab: int(sum(e.target_len for e in enc)) for lab, enc, _ in datasets}, **(meta or {})}
    return FaithResult(ks, n, nll, base, ablated, points, {lab: role for lab, _, role in datasets}, info,
                       _lists(per))
