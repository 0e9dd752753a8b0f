"""Generic-neuron diagnostics: neurons that matter for every text rather than for one capability.

A neuron is flagged by any of these criteria (``GenericConfig.criteria`` says which ones make it *generic*):

``massive`` (after Sun et al. 2024, "Massive Activations in Large Language Models", arXiv 2402.17762)
    Sun et al. call a hidden-state activation massive when its magnitude is > 100 and about 1000x the median
    magnitude of its hidden state, and observe that such activations are input-agnostic (same dimensions for every
    input). Ours, on MLP neurons: on EVERY dataset given, the neuron's peak ``max |a|`` (over all tokens of the
    dataset) is >= ``massive_ratio`` (default 100) times the layer's *typical peak* (the median over the layer's
    neurons of their ``max |a|``), and the neuron is among the ``massive_top`` (default 10) largest peaks of the model
    (ranked by its smallest peak over datasets). Why not Sun et al.'s entry median: gated MLP neurons are mostly near 0,
    so 100x the median entry is passed by hundreds of SmolLM2-135M neurons on 4 gsm problems (637), while the
    typical-peak ratio singles out the few outliers (7; the top three, L11 n1229, L28 n678, L11 n1487, peak at
    1000-3000 on every dataset). Thresholds are ours.
``common_all``
    Selected (by each run's own per-sample rule) in >= ``common_freq`` (default 0.5) of the samples of EVERY run given
    (needs >= 2 runs).
``erase_all`` (optional, ``erase=True``)
    Erasing the single neuron raises the mean target NLL by >= ``erase_min_delta`` nats/token (default 0.05) on EVERY
    dataset. Evaluated only for candidates (neurons flagged otherwise, plus the ``erase_candidates`` neurons with the
    highest minimum frequency over runs), because erasing all neurons one by one is too expensive.

NLL here: teacher-forced, per sample the mean over its target tokens, then the mean over samples (each sample counts
once, whatever its target length).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .. import __version__, stats
from ..config import check, setting
from ..data import collate, encode_dataset, pad_id
from ..errors import CaplocError, IncompatibleResultError
from ..hooks import capture, erase_neurons
from ..measure import nll_sums
from ..neurons import pairs_of
from ..progress import bar as progress_bar
from ..report import generic as report_generic
from ..results import NeuronSet, atomic_save_tensors, atomic_write_json, read_json

log = logging.getLogger(__name__)

CRITERIA = ("massive", "common_all", "erase_all")


@dataclass
class GenericConfig:
    """Settings of ``caploc generic`` (see the module docstring for the criteria)."""

    massive_ratio: float = setting(100.0, help="Peak |a| / the layer's typical peak, on every dataset.", min=0.0,
                                   min_exclusive=True)
    massive_top: int = setting(10, help="And among the model's this many largest peaks.", min=1)
    common_freq: float = setting(0.5, help="Selection frequency on every run.", min=0.0, max=1.0, min_exclusive=True)
    erase: bool = setting(False, help="Also erase candidates one at a time on every dataset.")
    erase_min_delta: float = setting(0.05, help="Erase criterion: ΔNLL (nats/token) on every dataset.")
    erase_candidates: int = setting(20, help="Extra erase candidates: the neurons with the highest minimum frequency "
                                    "over runs.", min=0)
    criteria: tuple = setting(("massive", "common_all"), help="Flags that make a neuron generic (any of them): "
                              "massive, common_all, erase_all.", item=str)
    batch_size: int = setting(4, help="Samples per forward pass.", min=1)
    chat: bool = setting(False, help="Wrap prompts in the chat template.")

    def __post_init__(self):
        self.criteria = tuple(self.criteria)
        bad = [c for c in self.criteria if c not in CRITERIA]
        if not bad and self.criteria:
            check(self)
        if bad or not self.criteria:
            raise CaplocError(f"unknown generic criteria {bad or '(none)'}; choose from {', '.join(CRITERIA)}")
        if self.massive_ratio <= 0 or self.massive_top < 1:
            raise CaplocError("massive_ratio must be > 0 and massive_top >= 1")
        if not 0 < self.common_freq <= 1:
            raise CaplocError(f"common_freq is a fraction in (0, 1], got {self.common_freq}")
        if "erase_all" in self.criteria and not self.erase:
            raise CaplocError("criterion erase_all needs erase=True (--erase)")
        if self.batch_size < 1 or self.erase_candidates < 0:
            raise CaplocError("batch_size must be >= 1 and erase_candidates >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["criteria"] = list(self.criteria)
        return d


# ---------------------------------------------------------------------------------------------------------------------
# model passes
# ---------------------------------------------------------------------------------------------------------------------
def _batches(encoded, batch_size: int, pad: int):
    for b in range(0, len(encoded), batch_size):
        chunk = encoded[b: b + batch_size]
        ids, att = collate([e.input_ids for e in chunk], pad)
        yield chunk, ids, att


@torch.no_grad()
def activation_stats(lm, encoded, batch_size: int = 4, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Neuron activation magnitudes over every (non-padding) token of ``encoded``.

    Returns ``max_abs [L, d]``, ``mean_abs [L, d]`` (token-weighted), ``first_token_share [L, d]`` (share of samples
    whose peak is at position 0), ``typical_peak [L]`` (median over neurons of max_abs) and ``n_tokens``.
    """
    site = lm.site
    L, d = site.n_layers, site.d_mlp
    mx = torch.zeros(L, d, dtype=torch.float64)
    sm = torch.zeros(L, d, dtype=torch.float64)
    first = torch.zeros(L, d, dtype=torch.float64)
    ntok = 0
    dev = site.input_device()
    batches = list(_batches(encoded, batch_size, pad_id(lm.tokenizer, lm.model.config)))
    with progress_bar(len(batches), "activations", "batch", progress) as pbar:
        for _chunk, ids, att in batches:
            with capture(site) as st:
                lm.model(input_ids=ids.to(dev), attention_mask=att.to(dev))
            m = att.bool()
            ntok += int(m.sum())
            for l in range(L):
                a = st[l].abs().double().cpu() * m[..., None]  # [B, T, d], padding zeroed
                mx[l] = torch.maximum(mx[l], a.amax((0, 1)))
                sm[l] += a.sum((0, 1))
                first[l] += (a.argmax(1) == 0).double().sum(0)
            pbar.update(1)
    return {"max_abs": mx, "mean_abs": sm / max(ntok, 1), "first_token_share": first / max(len(encoded), 1),
            "typical_peak": mx.median(1).values, "n_tokens": torch.tensor(ntok)}


@torch.no_grad()
def sample_nll(lm, encoded, neurons=None, batch_size: int = 4) -> torch.Tensor:
    """Per-sample mean NLL (nats/token) of the target tokens, teacher-forced; ``neurons`` (pairs) erased if given."""
    ctx = erase_neurons(lm.site, neurons) if neurons is not None and len(neurons) else contextlib.nullcontext()
    with ctx:
        sums, counts = nll_sums(lm, encoded, batch_size=batch_size, progress=False)
    return torch.from_numpy(sums / counts)


def mean_nll(lm, encoded, neurons=None, batch_size: int = 4) -> float:
    return float(sample_nll(lm, encoded, neurons, batch_size).mean())


def erase_specificity(lm, sets: dict, data: dict, target: str | None = None, n_random: int = 5, seed: int = 0,
                      batch_size: int = 4, chat: bool = False, progress: bool | None = None) -> dict:
    """Erase each neuron set and layer-matched random sets; mean target-NLL change on every dataset.

    ``sets``: {name: NeuronSet or [[layer, index], ...]}; ``data``: {name: Dataset or list of Encoded}; ``target``:
    the on-target dataset name (others are off-target). For every set and dataset: ``delta`` = NLL(erased) - NLL(clean)
    (nats/token), the mean and sd of ``delta`` over ``n_random`` random sets with the set's per-layer sizes (drawn
    outside the set), ``excess = delta - random mean`` and ``z = excess / random sd``. Per set: ``specificity`` =
    excess on the target minus the largest excess off target (> 0: the set hurts the target more than any other
    capability, beyond what random neurons do), and ``si = (z_on - z_off) / (|z_on| + |z_off|)`` with the largest
    off-target z (the specificity index of :mod:`caploc.stages.intervene`, in [-1, 1]; it ignores significance, so read it
    next to the z-scores). Caveat: ``specificity`` is a difference in nats, so a set that adds a generic neuron to a
    specific one can score higher than the specific neuron alone (it hurts the target more AND the others); compare
    sets by ``si`` and by their off-target excess as well.
    """
    site = lm.site
    L, d = site.n_layers, site.d_mlp
    enc = {k: (v if isinstance(v, list) else encode_dataset(lm.tokenizer, v, chat=chat)) for k, v in data.items()}
    if target is not None and target not in enc:
        raise CaplocError(f"target {target!r} is not one of the evaluation datasets {', '.join(enc)}")
    clean = {k: sample_nll(lm, e, None, batch_size) for k, e in enc.items()}
    rng = np.random.default_rng(seed)
    res: dict = {"clean": {k: float(v.mean()) for k, v in clean.items()}, "sets": {}, "n_random": int(n_random),
                 "target": target, "n_samples": {k: len(e) for k, e in enc.items()}}
    work = [(name, pairs_of(s)) for name, s in sets.items()]
    bar = progress_bar(len(work) * (1 + n_random), "erase", "set", progress)
    for name, pairs in work:
        flat = pairs[:, 0] * d + pairs[:, 1]
        sizes = np.bincount(pairs[:, 0], minlength=L) if len(pairs) else np.zeros(L, int)
        row = {"n_neurons": int(len(pairs)), "delta": {}, "random_mean": {}, "random_sd": {}, "excess": {}, "z": {},
               "delta_sem": {}}
        for k, e in enc.items():
            v = sample_nll(lm, e, pairs, batch_size) - clean[k]
            row["delta"][k] = float(v.mean())
            row["delta_sem"][k] = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
        bar.update(1)
        rand = {k: [] for k in enc}
        for _ in range(n_random if len(pairs) else 0):
            rs = stats.random_layer_matched_set(sizes, d, rng, exclude=flat)
            rp = np.stack([rs // d, rs % d], 1)
            for k, e in enc.items():
                rand[k].append(float((sample_nll(lm, e, rp, batch_size) - clean[k]).mean()))
            bar.update(1)
        for k in enc:
            r = np.asarray(rand[k], dtype=np.float64)
            mu = float(r.mean()) if r.size else float("nan")
            sd = float(r.std(ddof=1)) if r.size > 1 else float("nan")
            row["random_mean"][k], row["random_sd"][k] = mu, sd
            row["excess"][k] = row["delta"][k] - mu if r.size else float("nan")
            row["z"][k] = row["excess"][k] / sd if r.size > 1 and sd > 0 else float("nan")
        row["random"] = rand
        if target is not None:
            off = [k for k in enc if k != target]
            row["specificity"] = row["excess"][target] - max(row["excess"][k] for k in off) if off else float("nan")
            # the intervention module's specificity index on z-scores (erase: expected direction +1), worst off-target
            zon = row["z"][target]
            zoff = max((row["z"][k] for k in off), default=float("nan"))
            den = abs(zon) + abs(zoff)
            row["si"] = (zon - zoff) / den if math.isfinite(den) and den > 0 else float("nan")
        res["sets"][name] = row
    bar.close()
    return res


# ---------------------------------------------------------------------------------------------------------------------
# pure flagging functions
# ---------------------------------------------------------------------------------------------------------------------
def massive_flags(max_abs: torch.Tensor, ratio: float, top: int) -> dict[str, np.ndarray]:
    """max_abs [K, L, d] (one peak table per dataset) -> per-neuron ``flag``, ``ratio_min`` and ``peak_min`` (flat [L*d]).

    ratio_k = max_abs_k / median over the layer's neurons of max_abs_k; a neuron is flagged if ``min_k ratio_k >=
    ratio`` and its ``peak_min = min_k max_abs_k`` is among the ``top`` largest of the model (ties: lower index first).
    """
    m = torch.as_tensor(max_abs, dtype=torch.float64)
    if m.dim() == 2:
        m = m[None]
    K, L, d = m.shape
    typical = m.median(2).values  # [K, L]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (m / typical[..., None]).numpy()
    r = np.where(np.isnan(r), 0.0, r)
    ratio_min = r.min(0).reshape(-1)
    peak_min = m.min(0).values.reshape(-1).numpy()
    order = np.lexsort((np.arange(peak_min.size), -peak_min))
    rank = np.empty(peak_min.size, dtype=np.int64)
    rank[order] = np.arange(peak_min.size)
    flag = (ratio_min >= ratio) & (rank < int(top))
    return {"flag": flag, "ratio_min": ratio_min, "peak_min": peak_min, "rank": rank, "typical_peak": typical.numpy()}


def common_everywhere(freqs: np.ndarray, min_freq: float) -> np.ndarray:
    """freqs [K, n] selection frequencies on K runs -> bool [n]: >= min_freq on every run (K >= 2)."""
    f = np.asarray(freqs, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise CaplocError("common-on-every-dataset needs frequencies from at least 2 runs")
    return (f >= min_freq - 1e-12).all(0)


# ---------------------------------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class GenericReport:
    """Flagged neurons with their evidence. ``rows``: one dict per flagged (or erase-tested) neuron; ``meta`` (the
    provenance: model id and fingerprint, random single-neuron erase effects for scale)."""

    kind: ClassVar[str] = "generic"

    n_layers: int
    d_mlp: int
    rows: list[dict] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)  # activation datasets
    runs: list[str] = field(default_factory=list)  # frequency runs
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def provenance(self) -> dict:
        return self.meta

    @property
    def generic_pairs(self) -> np.ndarray:
        p = [(r["layer"], r["index"]) for r in self.rows if r.get("generic")]
        return np.asarray(p, dtype=np.int64).reshape(-1, 2)

    def neuron_set(self) -> NeuronSet:
        return NeuronSet(self.generic_pairs, self.n_layers, self.d_mlp,
                         meta={**self.meta, "kind_detail": "generic neurons", "criteria": self.config.get("criteria")})

    def save(self, out_dir: Path | str, *, report: bool = True) -> Path:
        """``generic.safetensors`` (activation / frequency tables), ``generic.json``, the generic neurons as
        ``neurons.{json,safetensors}`` and, with ``report``, ``report.json`` (last)."""
        out_dir = Path(out_dir)
        if self.tensors:
            atomic_save_tensors(out_dir / "generic.safetensors", {k: v.contiguous() for k, v in self.tensors.items()})
        atomic_write_json(out_dir / "generic.json", {
            "kind": "generic_report", "caploc_version": __version__, "n_layers": self.n_layers, "d_mlp": self.d_mlp,
            "datasets": self.datasets, "runs": self.runs, "config": self.config, "meta": self.meta, "rows": self.rows})
        self.neuron_set().save(out_dir)
        if report:
            atomic_write_json(out_dir / "report.json", self.to_report(out_dir))
        return out_dir

    @classmethod
    def load(cls, path: Path | str) -> "GenericReport":
        path = Path(path)
        j = read_json(path / "generic.json" if path.is_dir() else path)
        if j.get("kind") != "generic_report":
            raise CaplocError(f"{path} is not a caploc generic-neuron report (run caploc generic)")
        return cls(int(j["n_layers"]), int(j["d_mlp"]), j.get("rows", []), j.get("datasets", []), j.get("runs", []),
                   j.get("config", {}), j.get("meta", {}))

    def to_report(self, out_dir: Path | str | None = None) -> dict:
        """The ``report.json`` dict (:func:`caploc.report.generic.generic_report`); no figures."""
        return report_generic.generic_report(self)


def _run_freqs(runs: dict[str, Path]) -> tuple[np.ndarray, int, int]:
    freqs, dims = [], None
    for name, d in runs.items():
        ns = NeuronSet.load(d)
        if ns.counts is None or not ns.n_samples:
            raise CaplocError(f"{d} has no per-neuron selection counts: re-run caploc locate there")
        if dims is not None and dims != (ns.n_layers, ns.d_mlp):
            raise IncompatibleResultError(f"{d} is for a model with {ns.n_layers}x{ns.d_mlp} neurons, not {dims[0]}x{dims[1]}")
        dims = (ns.n_layers, ns.d_mlp)
        freqs.append(np.asarray(ns.counts, dtype=np.float64) / ns.n_samples)
    return np.stack(freqs), dims[0], dims[1]


def find_generic(lm=None, datasets: dict | None = None, runs: dict | None = None, cfg: GenericConfig | None = None,
                 progress: bool | None = None) -> GenericReport:
    """Flag generic neurons.

    ``datasets``: {name: Dataset or list of Encoded} for activation magnitudes (needs ``lm``); ``runs``: {name: locate
    run dir} for selection frequencies. At least one of them. With ``cfg.erase`` (needs ``lm`` and ``datasets``),
    candidates are erased one at a time on every dataset.
    """
    cfg = cfg or GenericConfig()
    datasets = dict(datasets or {})
    runs = {k: Path(v) for k, v in (runs or {}).items()}
    if not datasets and not runs:
        raise CaplocError("generic diagnostics need activation datasets (--data) and/or locate runs (--runs)")
    if datasets and lm is None:
        raise CaplocError("activation statistics need a model")
    tensors: dict[str, torch.Tensor] = {}
    L = d = None
    stats_by = {}
    if datasets:
        L, d = lm.site.n_layers, lm.site.d_mlp
        enc = {k: (v if isinstance(v, list) else encode_dataset(lm.tokenizer, v, chat=cfg.chat)) for k, v in datasets.items()}
        for k, e in enc.items():
            stats_by[k] = activation_stats(lm, e, cfg.batch_size, progress)
        mx = torch.stack([stats_by[k]["max_abs"] for k in enc])  # [K, L, d]
        mflags = massive_flags(mx, cfg.massive_ratio, cfg.massive_top)
        tensors.update(max_abs=mx, typical_peak=torch.from_numpy(mflags["typical_peak"]),
                       mean_abs=torch.stack([stats_by[k]["mean_abs"] for k in enc]),
                       first_token_share=torch.stack([stats_by[k]["first_token_share"] for k in enc]))
    else:
        enc, mflags = {}, None
    if runs:
        F, Lr, dr = _run_freqs(runs)
        if L is not None and (Lr, dr) != (L, d):
            raise IncompatibleResultError(f"the runs are for {Lr}x{dr} neurons but the model has {L}x{d}")
        L, d = Lr, dr
        tensors["freq"] = torch.from_numpy(F)
        common = common_everywhere(F, cfg.common_freq) if len(runs) >= 2 else np.zeros(L * d, dtype=bool)
        if len(runs) < 2 and "common_all" in cfg.criteria:
            log.warning("common_all needs >= 2 runs; only %d given, so nothing is flagged by it", len(runs))
    else:
        F, common = None, np.zeros(L * d, dtype=bool)
    n = L * d
    massive = mflags["flag"] if mflags is not None else np.zeros(n, dtype=bool)
    candidates = set(np.nonzero(massive | common)[0].tolist())
    erase_delta: dict[int, dict] = {}
    meta: dict = {"model_id": lm.model_id if lm is not None else None,
                  "model_fingerprint": lm.info.get("fingerprint") if lm is not None else None}
    if cfg.erase:
        if lm is None or not enc:
            raise CaplocError("erase diagnostics need a model and activation datasets")
        if F is not None and cfg.erase_candidates:
            fmin = F.min(0)
            order = np.lexsort((np.arange(n), -fmin))
            candidates |= set(order[: cfg.erase_candidates].tolist())
        clean = {k: sample_nll(lm, e, None, cfg.batch_size) for k, e in enc.items()}
        for c in sorted(candidates):
            p = [[c // d, c % d]]
            erase_delta[c] = {k: float((sample_nll(lm, e, p, cfg.batch_size) - clean[k]).mean()) for k, e in enc.items()}
        rng = np.random.default_rng(0)
        rnd = rng.choice(n, size=min(5, n), replace=False)
        rd = {k: [float((sample_nll(lm, e, [[int(c) // d, int(c) % d]], cfg.batch_size) - clean[k]).mean()) for c in rnd]
              for k, e in enc.items()}
        meta["random_single_erase"] = {k: {"mean": float(np.mean(v)), "max": float(np.max(v)), "n": len(v)} for k, v in rd.items()}
    erase_all = np.zeros(n, dtype=bool)
    for c, dl in erase_delta.items():
        erase_all[c] = all(v >= cfg.erase_min_delta for v in dl.values())
    flags = {"massive": massive, "common_all": common, "erase_all": erase_all}
    generic = np.zeros(n, dtype=bool)
    for c in cfg.criteria:
        generic |= flags[c]
    show = sorted(set(np.nonzero(massive | common | erase_all)[0].tolist()) | set(erase_delta))
    rows = []
    for c in show:
        r = {"layer": int(c // d), "index": int(c % d), "generic": bool(generic[c]),
             "flags": [k for k in CRITERIA if flags[k][c]]}
        if mflags is not None:
            r["peak"] = float(mflags["peak_min"][c])
            r["peak_ratio"] = float(mflags["ratio_min"][c])
            r["peak_rank"] = int(mflags["rank"][c])
            r["first_token_share"] = float(tensors["first_token_share"].reshape(len(enc), -1)[:, c].mean())
            r["peak_by_dataset"] = {k: float(tensors["max_abs"][j].reshape(-1)[c]) for j, k in enumerate(enc)}
        if F is not None:
            r["freq"] = {k: float(F[j, c]) for j, k in enumerate(runs)}
        if c in erase_delta:
            r["erase_delta"] = erase_delta[c]
        rows.append(r)
    rows.sort(key=lambda r: (not r["generic"], -(r.get("peak") or 0.0), r["layer"], r["index"]))
    log.info("generic diagnostics: %d flagged, %d generic", len(rows), int(generic.sum()))
    return GenericReport(L, d, rows, list(enc), list(runs), cfg.to_dict(), meta, tensors)


def exclude_generic(ns: NeuronSet, generic: GenericReport | NeuronSet | np.ndarray) -> NeuronSet:
    """``ns`` without the generic neurons (a GenericReport, a NeuronSet, or [[layer, index], ...])."""
    if isinstance(generic, GenericReport):
        g = generic.generic_pairs
    elif isinstance(generic, NeuronSet):
        g = generic.pairs
    else:
        g = np.asarray(generic, dtype=np.int64).reshape(-1, 2)
    if isinstance(generic, (GenericReport, NeuronSet)) and (generic.n_layers, generic.d_mlp) != (ns.n_layers, ns.d_mlp):
        raise IncompatibleResultError("the generic-neuron report is for a model of other dimensions than the neuron set")
    gflat = set((g[:, 0] * ns.d_mlp + g[:, 1]).tolist())
    keep = np.asarray([f not in gflat for f in ns.flat.tolist()], dtype=bool)
    meta = {**ns.meta, "excluded_generic": [[int(a), int(b)] for a, b in ns.pairs[~keep]]}
    return NeuronSet(ns.pairs[keep], ns.n_layers, ns.d_mlp,
                     frequency=ns.frequency[keep] if ns.frequency is not None else None,
                     mean_score=ns.mean_score[keep] if ns.mean_score is not None else None,
                     counts=ns.counts, n_samples=ns.n_samples, meta=meta)


__all__ = ["CRITERIA", "GenericConfig", "GenericReport", "activation_stats", "sample_nll", "mean_nll",
           "erase_specificity", "massive_flags", "common_everywhere", "find_generic", "exclude_generic"]
