"""Interventions on a neuron set, validated against random-neuron controls (DESIGN.md §1 "Validation", "Specificity").

The intervention multiplies the set's neuron activations by a gain ``k`` at every position through
:func:`caploc.hooks.scale_neurons` (erase: k = 0; enhance: k > 1). Weights are never touched.

:func:`run_intervention` measures, for every dataset (the first ``on``-target ones, then ``off``-target ones) and every
gain k:

* the untouched model;
* the neuron set;
* ``n_random`` random sets with the set's per-layer sizes, drawn from the neurons NOT in the set
  (``stats.random_layer_matched_set``, seeds ``seed .. seed + n_random - 1``);
* an activation-matched control: for every set neuron, the neuron of the same layer, not in the set and not yet
  used, whose mean |activation| on the first on-target dataset (``act_samples`` samples, all real tokens) is closest.

Effect = metric under the intervention minus the untouched model on the same samples: ΔNLL per target token
(token-weighted) and Δaccuracy. The set's effect is placed in the distribution of the random sets' effects
(``stats.compare_to_null``: z, percentile, empirical two-sided p) and gets a paired bootstrap CI over samples.

Specificity index (our definition; the paper has none)
------------------------------------------------------
For gain k the *expected direction* is d = +1 (NLL up) when k < 1 and d = -1 (NLL down) when k > 1. With
``z_on`` / ``z_off`` the set's z-scores on an on-target / off-target dataset, each against the random sets ON THAT
DATASET, and directed z' = d * z::

    SI = (z'_on - z'_off) / (|z'_on| + |z'_off|)        in [-1, 1]

SI = +1: the set moves only the on-target data beyond random; 0: on- and off-target equally unusual (a generic set);
-1: only off-target. We use z-scores rather than effects in nats because NLL scales differ between datasets (a facts
attribute token vs a chain-of-thought token): z puts each effect on the scale of "what a random set of the same
per-layer sizes does to THIS data". SI alone ignores significance (z'_on = 1, z'_off = 0 gives SI = 1), so it is
reported next to z'_on, z'_off, and the excess effects in nats ``Δ_set - mean(Δ_random)`` with their ratio
``excess_on / excess_off`` (and excess relative to the untouched NLL). The ``specificity`` claim uses the worst
off-target dataset (the largest z'_off) and holds when z'_on >= 2 and SI >= 1/3 (for positive z-scores: the on-target
z' is at least twice the off-target one). With n random sets the smallest reachable two-sided p is 1 / (n + 1).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import __version__
from .errors import CaplocError

log = logging.getLogger(__name__)

MODES = ("erase", "enhance")
ROLES = ("on", "off")


# ---------------------------------------------------------------------------------------------------------------------
# the intervention itself
# ---------------------------------------------------------------------------------------------------------------------
def gain_for(mode: str, k: float) -> float:
    """The activation gain of a mode: erase -> 0, enhance -> k (>= 0)."""
    if mode == "erase":
        return 0.0
    if mode == "enhance":
        if not (isinstance(k, (int, float)) and math.isfinite(k) and k >= 0):
            raise CaplocError(f"enhance needs a finite gain k >= 0, got {k!r}; pass e.g. --k 2")
        return float(k)
    raise CaplocError(f"unknown mode {mode!r}; choose erase or enhance")


def by_layer(neurons, d_mlp: int | None = None) -> dict[int, np.ndarray]:
    """{layer: indices} from a NeuronSet, (layer, index) pairs, a {layer: indices} mapping, or flat indices
    (``layer * d_mlp + index``; needs ``d_mlp``)."""
    from .results import NeuronSet

    if isinstance(neurons, NeuronSet):
        return {int(l): np.asarray(ix, dtype=np.int64) for l, ix in neurons.by_layer().items()}
    if isinstance(neurons, Mapping):
        return {int(l): np.asarray(ix, dtype=np.int64).reshape(-1) for l, ix in neurons.items()}
    arr = np.asarray(neurons, dtype=np.int64)
    if arr.ndim == 1:
        if d_mlp is None:
            raise CaplocError("flat neuron indices need d_mlp to be split into (layer, index)")
        arr = np.stack([arr // d_mlp, arr % d_mlp], 1) if arr.size else arr.reshape(0, 2)
    arr = arr.reshape(-1, 2)
    out: dict[int, list[int]] = {}
    for l, i in arr.tolist():
        out.setdefault(int(l), []).append(int(i))
    return {l: np.asarray(ix, dtype=np.int64) for l, ix in out.items()}


@contextlib.contextmanager
def intervention(site, neurons, gain: float) -> Iterator[None]:
    """Scale ``neurons``' activations by ``gain`` (0 = erase) at every position, via hooks only; gain 1 installs
    nothing. ``neurons``: as :func:`by_layer` (flat indices use ``site.d_mlp``)."""
    bl = {l: ix for l, ix in by_layer(neurons, site.d_mlp).items() if len(ix)}
    if float(gain) == 1.0 or not bl:
        yield
        return
    from .hooks import scale_neurons

    with scale_neurons(site, {l: torch.as_tensor(ix) for l, ix in bl.items()}, float(gain)):
        yield


# ---------------------------------------------------------------------------------------------------------------------
# controls
# ---------------------------------------------------------------------------------------------------------------------
def random_controls(neurons, n_layers: int, d_mlp: int, n: int, seed: int) -> list[np.ndarray]:
    """``n`` random flat sets with the per-layer sizes of ``neurons``, excluding its neurons; seeds seed..seed+n-1."""
    from .stats import per_layer_counts, random_layer_matched_set

    flat = _flat(neurons, d_mlp)
    sizes = per_layer_counts(flat, n_layers, d_mlp)
    return [random_layer_matched_set(sizes, d_mlp, np.random.default_rng(seed + i), exclude=flat) for i in range(n)]


def _flat(neurons, d_mlp: int) -> np.ndarray:
    bl = by_layer(neurons, d_mlp)
    if not bl:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([l * d_mlp + ix for l, ix in bl.items()])).astype(np.int64)


@torch.no_grad()
def mean_abs_activation(lm, dataset, *, n_samples: int = 8, chat: bool = False, batch_size: int = 4,
                        max_length: int | None = None) -> torch.Tensor:
    """Mean |activation| of every neuron over all real (non-padding) tokens of the first ``n_samples`` samples:
    float64 ``[n_layers, d_mlp]``, measured with ``hooks.capture``."""
    from .data import encode_dataset
    from .evaluate import _pad_id
    from .hooks import capture

    site = lm.site
    ds = dataset.subset(range(min(n_samples, len(dataset))))
    max_len = max_length or getattr(lm.model.config, "max_position_embeddings", None)
    enc = encode_dataset(lm.tokenizer, ds, chat=chat, max_length=max_len)
    pad = _pad_id(lm.tokenizer)
    dev = site.input_device()
    total = torch.zeros(site.n_layers, site.d_mlp, dtype=torch.float64)
    count = 0
    for start in range(0, len(enc), batch_size):
        chunk = enc[start:start + batch_size]
        T = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, e in enumerate(chunk):
            ids[r, :len(e)] = torch.tensor(e.input_ids)
            mask[r, :len(e)] = 1
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
# configuration and result
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class InterveneConfig:
    """``ks``: gains to apply (0 = erase, 1 = identity, > 1 = enhance). ``primary_k``: the gain of the headline
    (mode/k of the CLI; default: the first of ks). ``metrics``: nll and/or accuracy."""

    ks: tuple[float, ...] = (0.0,)
    primary_k: float | None = None
    n_random: int = 10
    seed: int = 0
    act_matched: bool = True
    act_samples: int = 8
    metrics: tuple[str, ...] = ("nll",)
    chat: bool = False
    batch_size: int = 8
    max_length: int | None = None
    max_new_tokens: int | None = None
    n_boot: int = 2000

    def __post_init__(self):
        self.ks = tuple(float(k) for k in self.ks)
        if not self.ks:
            raise CaplocError("ks is empty: give at least one gain, e.g. --ks 0,2")
        for k in self.ks:
            if not math.isfinite(k) or k < 0:
                raise CaplocError(f"gain {k} is invalid: gains must be finite and >= 0")
        if len(set(self.ks)) != len(self.ks):
            raise CaplocError(f"ks {list(self.ks)} has duplicates")
        if self.primary_k is None:
            self.primary_k = self.ks[0]
        self.primary_k = float(self.primary_k)
        if self.primary_k not in self.ks:
            raise CaplocError(f"primary gain {self.primary_k} is not in ks {list(self.ks)}; add it to --ks")
        if not isinstance(self.n_random, int) or self.n_random < 2:
            raise CaplocError(f"n_random must be an integer >= 2 (a null distribution needs a spread), got {self.n_random!r}")
        self.metrics = tuple(self.metrics)
        from .evaluate import METRICS

        if not self.metrics or any(m not in METRICS for m in self.metrics):
            raise CaplocError(f"metrics {list(self.metrics)} invalid; choose from {', '.join(METRICS)}")
        if self.act_samples < 1 or self.batch_size < 1 or self.n_boot < 1:
            raise CaplocError("act_samples, batch_size and n_boot must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ks"], d["metrics"] = list(self.ks), list(self.metrics)
        return d


def _key(label: str, k: float, cond: str) -> str:
    return f"{label}|k={k:g}|{cond}"


def _dir(k: float) -> int:
    """Expected direction of ΔNLL under gain k: +1 (worse) for k < 1, -1 (better) for k > 1, 0 for k == 1."""
    return 1 if k < 1 else (-1 if k > 1 else 0)


def specificity_index(z_on: float, z_off: float) -> float:
    """SI = (z_on - z_off) / (|z_on| + |z_off|) on DIRECTED z-scores; infinities (degenerate nulls) handled as limits;
    nan when both are 0."""
    if math.isnan(z_on) or math.isnan(z_off):
        return float("nan")
    if math.isinf(z_on) or math.isinf(z_off):
        if math.isinf(z_on) and math.isinf(z_off):
            return 0.0 if z_on == z_off else math.copysign(1.0, z_on)
        return math.copysign(1.0, z_on) if math.isinf(z_on) else -math.copysign(1.0, z_off)
    den = abs(z_on) + abs(z_off)
    return float("nan") if den == 0 else (z_on - z_off) / den


@dataclass
class InterventionResult:
    """Per-sample NLL sums (and correctness) of every dataset x gain x condition; summaries are derived on demand.

    ``datasets``: [{label, role, name, fingerprint, n, source}] in order (on-target first).
    ``sums[(label|k|cond)]``: [n] summed target NLL; ``base[label]``: untouched sums; ``tokens[label]``: [n] counts.
    ``correct`` / ``base_correct``: the same for accuracy (empty when not measured).
    ``sets``: flat neuron indices of "set", "act_matched" and "random_<seed>".
    """

    meta: dict
    datasets: list[dict]
    ks: list[float]
    conditions: list[str]
    tokens: dict[str, np.ndarray]
    base: dict[str, np.ndarray]
    sums: dict[str, np.ndarray]
    sets: dict[str, np.ndarray]
    base_correct: dict[str, np.ndarray] = field(default_factory=dict)
    correct: dict[str, np.ndarray] = field(default_factory=dict)

    # ---- derived quantities ---------------------------------------------------------------------------------------
    @property
    def random_conditions(self) -> list[str]:
        return [c for c in self.conditions if c.startswith("random_")]

    def labels(self, role: str | None = None) -> list[str]:
        return [d["label"] for d in self.datasets if role is None or d["role"] == role]

    def base_nll(self, label: str) -> float:
        return float(self.base[label].sum() / self.tokens[label].sum())

    def nll(self, label: str, k: float, cond: str) -> float:
        return float(self.sums[_key(label, k, cond)].sum() / self.tokens[label].sum())

    def effect(self, label: str, k: float, cond: str) -> float:
        """ΔNLL per target token (token-weighted) vs the untouched model."""
        return float((self.sums[_key(label, k, cond)] - self.base[label]).sum() / self.tokens[label].sum())

    def acc_effect(self, label: str, k: float, cond: str) -> float | None:
        key = _key(label, k, cond)
        if key not in self.correct or label not in self.base_correct:
            return None
        return float(self.correct[key].mean() - self.base_correct[label].mean())

    def effect_ci(self, label: str, k: float, cond: str = "set", n_boot: int = 2000, seed: int = 0):
        """Paired percentile bootstrap over samples of the token-weighted ΔNLL: (estimate, lo, hi)."""
        from .stats import bootstrap_ci

        d = self.sums[_key(label, k, cond)] - self.base[label]
        t = self.tokens[label].astype(np.float64)

        def stat(idx, axis=None):
            idx = np.asarray(idx, dtype=np.int64)
            return d[idx].sum(axis=-1) / t[idx].sum(axis=-1)

        return bootstrap_ci(np.arange(len(d), dtype=np.float64), n_boot=n_boot, seed=seed, stat=stat)

    def null(self, label: str, k: float, metric: str = "nll") -> np.ndarray:
        if metric == "nll":
            return np.array([self.effect(label, k, c) for c in self.random_conditions])
        vals = [self.acc_effect(label, k, c) for c in self.random_conditions]
        return np.array([np.nan if v is None else v for v in vals])

    def compare(self, label: str, k: float, cond: str = "set", metric: str = "nll") -> dict | None:
        from .stats import compare_to_null

        eff = self.effect(label, k, cond) if metric == "nll" else self.acc_effect(label, k, cond)
        if eff is None:
            return None
        null = self.null(label, k, metric)
        null = null[~np.isnan(null)]
        if null.size == 0:
            return None
        if np.all(null == null[0]):  # degenerate null (e.g. accuracy 0 for every random set): same numbers, no warning
            diff = eff - float(null[0])
            return {"effect": float(eff), "null_mean": float(null[0]), "null_sd": 0.0,
                    "z": math.copysign(math.inf, diff) if diff != 0 else 0.0,
                    "percentile": float((np.count_nonzero(null < eff) + 0.5 * np.count_nonzero(null == eff)) / null.size),
                    "p_two_sided": (1.0 + (null.size if diff == 0 else 0)) / (1.0 + null.size),
                    "n_null": int(null.size), "degenerate_null": True}
        return compare_to_null(eff, null)

    def summary_rows(self) -> list[dict]:
        """One row per dataset x gain x {set, act_matched}: effects, random null, z, percentile, CI."""
        rows = []
        n_boot = int(self.meta.get("config", {}).get("n_boot", 2000))
        for d in self.datasets:
            lab = d["label"]
            for k in self.ks:
                for cond in [c for c in ("set", "act_matched") if c in self.conditions]:
                    cmp_ = self.compare(lab, k, cond)
                    est, lo, hi = self.effect_ci(lab, k, cond, n_boot=n_boot)
                    row = {"dataset": lab, "role": d["role"], "k": k, "condition": cond,
                           "nll_untouched": self.base_nll(lab), "nll": self.nll(lab, k, cond), "d_nll": est,
                           "ci_lo": lo, "ci_hi": hi, "random_mean": cmp_["null_mean"], "random_sd": cmp_["null_sd"],
                           "random_min": float(self.null(lab, k).min()), "random_max": float(self.null(lab, k).max()),
                           "z": cmp_["z"], "percentile": cmp_["percentile"], "p_two_sided": cmp_["p_two_sided"],
                           "n_random": cmp_["n_null"]}
                    acc = self.acc_effect(lab, k, cond)
                    if acc is not None:
                        cmp_a = self.compare(lab, k, cond, "accuracy")
                        row.update({"acc_untouched": float(self.base_correct[lab].mean()),
                                    "d_acc": acc, "acc_random_mean": cmp_a["null_mean"] if cmp_a else None,
                                    "acc_random_sd": cmp_a["null_sd"] if cmp_a else None,
                                    "acc_z": cmp_a["z"] if cmp_a else None})
                    rows.append(row)
        return rows

    def specificity(self, k: float | None = None) -> list[dict]:
        """For every on-target x off-target pair at gain k (default: every gain != 1): directed z-scores, SI, excess
        effects in nats and their ratio (see module docstring)."""
        out = []
        for kk in ([k] if k is not None else [x for x in self.ks if x != 1.0]):
            d = _dir(kk)
            for on in self.labels("on"):
                c_on = self.compare(on, kk)
                for off in self.labels("off"):
                    c_off = self.compare(off, kk)
                    z_on, z_off = d * c_on["z"], d * c_off["z"]
                    ex_on = d * (c_on["effect"] - c_on["null_mean"])
                    ex_off = d * (c_off["effect"] - c_off["null_mean"])
                    out.append({
                        "k": kk, "on": on, "off": off, "z_on": z_on, "z_off": z_off,
                        "si": specificity_index(z_on, z_off),
                        "excess_on_nats": ex_on, "excess_off_nats": ex_off,
                        "excess_ratio": ex_on / ex_off if ex_off != 0 else float("nan"),
                        "rel_excess_on": ex_on / self.base_nll(on), "rel_excess_off": ex_off / self.base_nll(off),
                    })
        return out

    def claims(self) -> dict:
        """``erase_beats_random`` (k = 0), ``enhance_beats_random`` (largest k > 1), ``specificity`` (primary k)."""
        claims: dict = {}
        on = self.labels("on")
        if not on:
            return claims
        main = on[0]
        n_boot = int(self.meta.get("config", {}).get("n_boot", 2000))

        def beats(k, sign):
            c = self.compare(main, k)
            _, lo, hi = self.effect_ci(main, k, n_boot=n_boot)
            null = self.null(main, k)
            holds = bool(sign * c["effect"] > np.max(sign * null))
            return {"value": c["effect"], "ci": [lo, hi], "chance": c["null_mean"], "chance_sd": c["null_sd"],
                    "z": c["z"], "percentile": c["percentile"], "p_two_sided": c["p_two_sided"],
                    "n_random": c["n_null"], "k": k, "dataset": main, "holds": holds,
                    "definition": "ΔNLL/token of the set vs the untouched model; holds = beyond every random set "
                                  f"({'higher' if sign > 0 else 'lower'} ΔNLL)"}

        if 0.0 in self.ks:
            claims["erase_beats_random"] = beats(0.0, +1)
        enh = [k for k in self.ks if k > 1]
        if enh:
            claims["enhance_beats_random"] = beats(max(enh), -1)
        pk = float(self.meta.get("config", {}).get("primary_k", self.ks[0]))
        if pk == 1.0:
            pk = next((k for k in self.ks if k != 1.0), None)
        if pk is not None and self.labels("off"):
            spec = [s for s in self.specificity(pk) if s["on"] == main]
            worst = max(spec, key=lambda s: s["z_off"])
            claims["specificity"] = {
                "value": worst["si"], "k": pk, "on": main, "worst_off": worst["off"], "z_on": worst["z_on"],
                "z_off": worst["z_off"], "excess_ratio": worst["excess_ratio"],
                "per_off_target": {s["off"]: s["si"] for s in spec},
                "holds": bool(worst["si"] >= 1 / 3 and worst["z_on"] >= 2),
                "definition": "SI = (z'_on - z'_off)/(|z'_on| + |z'_off|), z' = z-score vs the random sets of the same "
                              "dataset, signed so that the expected direction of the gain is positive; worst off-target; "
                              "holds = z'_on >= 2 and SI >= 1/3 (for positive z': z'_on >= 2 z'_off)",
            }
        return claims

    # ---- persistence ---------------------------------------------------------------------------------------------
    def save(self, out_dir: Path | str, figures: bool = True) -> Path:
        """``intervene.json`` + ``intervene.safetensors`` + ``report.json`` (+ PNG figures), atomically per file."""
        from .results import atomic_save_tensors, atomic_write_json

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        t = {}
        for lab in self.tokens:
            t[f"tokens|{lab}"] = torch.from_numpy(np.asarray(self.tokens[lab], dtype=np.int64))
            t[f"base|{lab}"] = torch.from_numpy(np.asarray(self.base[lab], dtype=np.float64))
        for key, v in self.sums.items():
            t[f"sums|{key}"] = torch.from_numpy(np.asarray(v, dtype=np.float64))
        for lab, v in self.base_correct.items():
            t[f"base_correct|{lab}"] = torch.from_numpy(np.asarray(v, dtype=np.uint8))
        for key, v in self.correct.items():
            t[f"correct|{key}"] = torch.from_numpy(np.asarray(v, dtype=np.uint8))
        for name, s in self.sets.items():
            t[f"set|{name}"] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        atomic_save_tensors(out_dir / "intervene.safetensors", t)
        atomic_write_json(out_dir / "intervene.json", {
            "kind": "intervention", "caploc_version": __version__, "meta": self.meta, "datasets": self.datasets,
            "ks": self.ks, "conditions": self.conditions, "summary": self.summary_rows(),
            "specificity": self.specificity(), "claims": self.claims(),
        })
        write_report(self, out_dir, figures=figures)
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> "InterventionResult":
        from .results import read_result

        out_dir = Path(out_dir)
        meta, t = read_result(out_dir, "intervene.json", "intervention", "intervention", "intervene.safetensors")
        parts: dict[str, dict] = {"tokens": {}, "base": {}, "sums": {}, "base_correct": {}, "correct": {}, "set": {}}
        for name, v in t.items():
            kind, key = name.split("|", 1)
            arr = v.numpy()
            if kind in ("base_correct", "correct"):
                arr = arr.astype(bool)
            parts[kind][key] = arr
        return cls(meta=meta["meta"], datasets=meta["datasets"], ks=[float(k) for k in meta["ks"]],
                   conditions=meta["conditions"], tokens=parts["tokens"], base=parts["base"], sums=parts["sums"],
                   sets=parts["set"], base_correct=parts["base_correct"], correct=parts["correct"])


IntervenResult = InterventionResult  # the name used in the issue


# ---------------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------------
def _measure(lm, ds, enc, cfg: InterveneConfig, kind: str | None):
    from .evaluate import accuracy, nll_sums

    sums, counts = nll_sums(lm, enc, batch_size=cfg.batch_size, progress=False)
    correct = None
    if "accuracy" in cfg.metrics:
        _, correct, _ = accuracy(lm, ds, chat=cfg.chat, batch_size=cfg.batch_size,
                                 max_new_tokens=cfg.max_new_tokens, parser=kind, progress=False)
    return sums, counts, correct


def run_intervention(lm, neurons, datasets: Sequence[tuple[str, object, str]], cfg: InterveneConfig | None = None,
                     *, out_dir: Path | str | None = None, progress: bool | None = None) -> InterventionResult:
    """Measure ``neurons`` (a NeuronSet) against its controls on ``datasets`` = [(label, Dataset, role)] with role
    "on" (on-target) or "off" (off-target); on-target entries must come first. See the module docstring."""
    from tqdm.auto import tqdm

    from .data import encode_dataset
    from .evaluate import answer_kind
    from .results import NeuronSet

    cfg = cfg or InterveneConfig()
    site = lm.site
    if isinstance(neurons, NeuronSet):
        neurons.check_compatible(site)
    flat = _flat(neurons, site.d_mlp)
    if flat.size == 0:
        raise CaplocError("the neuron set is empty: nothing to intervene on (localize with a looser threshold)")
    if flat[-1] >= site.n_layers * site.d_mlp:
        raise CaplocError(f"neuron index {int(flat[-1])} is outside this model ({site.n_layers} x {site.d_mlp})")
    if not datasets:
        raise CaplocError("no datasets given: pass --data at least once")
    roles = [r for _, _, r in datasets]
    if any(r not in ROLES for r in roles):
        raise CaplocError(f"dataset roles must be 'on' or 'off', got {roles}")
    if roles[0] != "on" or roles != sorted(roles, key=lambda r: r != "on"):
        raise CaplocError("on-target datasets must come first (the first --data is the on-target one)")
    labels = [lab for lab, _, _ in datasets]
    if len(set(labels)) != len(labels):
        raise CaplocError(f"dataset labels must be unique, got {labels}")

    t0 = time.time()
    sets: dict[str, np.ndarray] = {"set": flat}
    first_on = datasets[0][1]
    if cfg.act_matched:
        act = mean_abs_activation(lm, first_on, n_samples=cfg.act_samples, chat=cfg.chat, max_length=cfg.max_length)
        sets["act_matched"] = activation_matched_set(flat, act)
        L, d = site.n_layers, site.d_mlp
        act_flat = act.reshape(-1).numpy()
        act_info = {"mean_abs_set": float(act_flat[flat].mean()), "mean_abs_act_matched": float(act_flat[sets["act_matched"]].mean()),
                    "mean_abs_all": float(act_flat.mean()), "measured_on": labels[0], "n_samples": min(cfg.act_samples, len(first_on))}
    else:
        act_info = None
    randoms = random_controls(flat, site.n_layers, site.d_mlp, cfg.n_random, cfg.seed)
    for i, r in enumerate(randoms):
        sets[f"random_{cfg.seed + i}"] = r
    conditions = list(sets)
    for name, s in sets.items():
        if name != "set":
            assert np.intersect1d(s, flat).size == 0, name

    max_len = cfg.max_length or getattr(lm.model.config, "max_position_embeddings", None)
    tokens, base, sums, base_correct, correct = {}, {}, {}, {}, {}
    gains = [k for k in cfg.ks]
    n_evals = sum(1 + sum(len(conditions) for k in gains if k != 1.0) for _ in datasets)
    with tqdm(total=n_evals, desc="intervene", unit="eval", leave=False,
              disable=(not progress) if progress is not None else None) as bar:
        for lab, ds, role in datasets:
            enc = encode_dataset(lm.tokenizer, ds, chat=cfg.chat, max_length=max_len)
            kind = answer_kind(ds) if "accuracy" in cfg.metrics else None
            s0, counts, c0 = _measure(lm, ds, enc, cfg, kind)
            tokens[lab], base[lab] = counts, s0
            if c0 is not None:
                base_correct[lab] = c0
            bar.update(1)
            for k in gains:
                for cond in conditions:
                    key = _key(lab, k, cond)
                    if k == 1.0:  # identity: no hooks at all, exactly the untouched model
                        sums[key] = s0.copy()
                        if c0 is not None:
                            correct[key] = c0.copy()
                        continue
                    with intervention(site, sets[cond], k):
                        s, _, c = _measure(lm, ds, enc, cfg, kind)
                    sums[key] = s
                    if c is not None:
                        correct[key] = c
                    bar.update(1)
            log.info("%s (%s): untouched NLL/token %.4f; set k=%s: %s", lab, role, s0.sum() / counts.sum(),
                     gains, ", ".join(f"{sums[_key(lab, k, 'set')].sum() / counts.sum():.4f}" for k in gains))

    ns_meta = neurons.meta if isinstance(neurons, NeuronSet) else {}
    meta = {
        "model_id": lm.info.get("model_id"), "model_fingerprint": lm.info.get("fingerprint"),
        "model_type": site.model_type, "n_layers": site.n_layers, "d_mlp": site.d_mlp,
        "neuron_site": site.describe()["neuron_site"], "n_neurons": int(flat.size),
        "per_layer": np.bincount(flat // site.d_mlp, minlength=site.n_layers).tolist(),
        "neuron_set": {k: ns_meta.get(k) for k in ("dataset", "dataset_fingerprint", "method", "rule", "rule_value",
                                                     "min_freq", "model_fingerprint") if k in ns_meta},
        "config": cfg.to_dict(), "random_seeds": list(range(cfg.seed, cfg.seed + cfg.n_random)),
        "activation_matching": act_info, "seconds": round(time.time() - t0, 2), "caploc_version": __version__,
    }
    ds_meta = [{"label": lab, "role": role, "name": ds.name, "fingerprint": ds.fingerprint(), "n": len(ds),
                "source": ds.source} for lab, ds, role in datasets]
    res = InterventionResult(meta=meta, datasets=ds_meta, ks=list(gains), conditions=conditions, tokens=tokens,
                             base=base, sums=sums, sets=sets, base_correct=base_correct, correct=correct)
    if out_dir is not None:
        res.save(out_dir)
    return res


# ---------------------------------------------------------------------------------------------------------------------
# report.json + figures
# ---------------------------------------------------------------------------------------------------------------------
def _r(v, nd: int = 4):
    if v is None:
        return None
    v = float(v)
    if math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return round(v, nd)


def _fig_dose_response(res: InterventionResult, lab: str, path: Path) -> None:
    from .report.figures import curves

    ks = sorted(set(res.ks) | {1.0})

    def eff(k, c):
        return 0.0 if k == 1.0 else res.effect(lab, k, c)

    rnd = np.array([[eff(k, c) for c in res.random_conditions] for k in ks])  # [n_k, n_random]
    ci = np.array([(0.0, 0.0) if k == 1.0 else res.effect_ci(lab, k, n_boot=500)[1:] for k in ks])
    ys = {"neuron set (95% CI)": [eff(k, "set") for k in ks],
          f"random sets: mean, min-max (n={rnd.shape[1]})": rnd.mean(1)}
    bands = {"neuron set (95% CI)": (ci[:, 0], ci[:, 1]),
             f"random sets: mean, min-max (n={rnd.shape[1]})": (rnd.min(1), rnd.max(1))}
    if "act_matched" in res.conditions:
        ys["activation-matched"] = [eff(k, "act_matched") for k in ks]
    role = next(d["role"] for d in res.datasets if d["label"] == lab)
    curves(ks, ys, path, xlabel="gain k (0 = erase, 1 = untouched)", ylabel="ΔNLL / target token (nats)",
           title=f"{lab} ({role}-target)", bands=bands)


def _fig_null_hist(res: InterventionResult, lab: str, k: float, path: Path) -> None:
    from .report.figures import null_histogram

    null_histogram(res.null(lab, k), res.effect(lab, k, "set"), path, title=f"{lab}: k={k:g}",
                   xlabel=f"ΔNLL / target token at k={k:g}", effect_label="neuron set")


def write_report(res: InterventionResult, out_dir: Path | str, figures: bool = True) -> None:
    """``report.json`` (tables, figures, claims) per docs/DEVELOPING.md."""
    from .results import atomic_write_json

    out_dir = Path(out_dir)
    m = res.meta
    cfg = m.get("config", {})
    has_acc = bool(res.correct)
    rows = []
    for r in res.summary_rows():
        row = [r["dataset"], r["role"], r["k"], r["condition"], _r(r["nll_untouched"]), _r(r["nll"]), _r(r["d_nll"]),
               f"[{_r(r['ci_lo'])}, {_r(r['ci_hi'])}]", _r(r["random_mean"]), _r(r["random_sd"]), _r(r["z"], 2),
               _r(r["percentile"], 3), _r(r["p_two_sided"], 3)]
        if has_acc:
            row += [_r(r.get("acc_untouched"), 3), _r(r.get("d_acc"), 3), _r(r.get("acc_random_mean"), 3)]
        rows.append(row)
    cols = ["dataset", "role", "k", "condition", "NLL/tok untouched", "NLL/tok", "ΔNLL/tok", "95% CI (bootstrap)",
            "random mean Δ", "random sd", "z vs random", "percentile", "p (two-sided)"]
    if has_acc:
        cols += ["acc untouched", "Δacc", "random mean Δacc"]
    spec_rows = [[s["k"], s["on"], s["off"], _r(s["z_on"], 2), _r(s["z_off"], 2), _r(s["si"], 3),
                  _r(s["excess_on_nats"]), _r(s["excess_off_nats"]), _r(s["excess_ratio"], 3)] for s in res.specificity()]
    ai = m.get("activation_matching") or {}
    text = [
        f"Model {m.get('model_id')} (fingerprint {m.get('model_fingerprint')}); {m.get('n_neurons')} neurons "
        f"({m.get('neuron_site')}) from the set localized on {m.get('neuron_set', {}).get('dataset')} "
        f"({m.get('neuron_set', {}).get('method')}). Gains k = {', '.join(f'{k:g}' for k in res.ks)} "
        "(activation multiplied by k at every position through hooks; 0 = erase).",
        f"Controls: {len(res.random_conditions)} random sets with the same per-layer counts, disjoint from the set "
        f"(seeds {m.get('random_seeds', [None])[0]}..{m.get('random_seeds', [None])[-1]})"
        + (f"; an activation-matched set (mean |a| {ai.get('mean_abs_act_matched', float('nan')):.4g} vs the set's "
           f"{ai.get('mean_abs_set', float('nan')):.4g}, all neurons {ai.get('mean_abs_all', float('nan')):.4g}; "
           f"measured on {ai.get('n_samples')} samples of {ai.get('measured_on')})" if ai else "") + ".",
        "Effect = metric under the intervention minus the untouched model on the same samples. ΔNLL/tok is "
        "token-weighted over the gold target tokens (teacher forced); the CI is a paired bootstrap over samples "
        f"({cfg.get('n_boot')} resamples); z and percentile place the set among the random sets of the same dataset "
        f"and gain; with {len(res.random_conditions)} random sets the smallest two-sided p is "
        f"{1 / (len(res.random_conditions) + 1):.3f}.",
        "Specificity index SI = (z'_on - z'_off)/(|z'_on| + |z'_off|) where z' is the z-score vs the random sets of "
        "that dataset, signed so the gain's expected direction (k<1: NLL up; k>1: NLL down) is positive. SI = 1: "
        "only the on-target data is moved beyond random; 0: generic; -1: only off-target. z-scores are used instead "
        "of nats because NLL scales differ across datasets; excess effects in nats (set minus random mean) are shown "
        "next to it.",
    ]
    figs = []
    if figures:
        pk = float(cfg.get("primary_k", res.ks[0]))
        if pk == 1.0:
            pk = next((k for k in res.ks if k != 1.0), None)
        for i, lab in enumerate(res.labels()):
            try:
                _fig_dose_response(res, lab, out_dir / f"fig_dose_{i}.png")
                figs.append({"title": f"Dose-response: {lab}", "file": f"fig_dose_{i}.png",
                             "caption": "ΔNLL/token vs gain k: the set (band: 95% paired bootstrap CI), the random "
                                        "sets (mean; band: min-max) and the activation-matched control. k = 1 is the "
                                        "untouched model (0 by definition)."})
                if pk is not None:
                    _fig_null_hist(res, lab, pk, out_dir / f"fig_null_{i}.png")
                    figs.append({"title": f"Random-set null: {lab}, k={pk:g}", "file": f"fig_null_{i}.png",
                                 "caption": "ΔNLL/token of each random layer-matched set; the red line is the "
                                            "localized set."})
            except Exception as e:  # a figure must never lose the measured numbers
                log.warning("could not draw the intervention figures for %s: %s", lab, e)
    atomic_write_json(out_dir / "report.json", {
        "kind": "intervention",
        "title": f"Interventions on {m.get('n_neurons')} neurons of {m.get('model_id')} vs random neurons",
        "text": text,
        "tables": [
            {"title": "Effect of the intervention vs random-neuron controls", "columns": cols, "rows": rows,
             "note": "ΔNLL > 0 = worse. condition 'set' = the localized neurons; 'act_matched' = the activation-matched "
                     "control; both compared with the same random sets."},
            {"title": "Specificity (on-target vs off-target)", "columns": [
                "k", "on-target", "off-target", "z'_on", "z'_off", "SI", "excess on (nats)", "excess off (nats)",
                "excess ratio on/off"], "rows": spec_rows,
             "note": "z' and excess are signed so that the gain's expected direction is positive."},
        ],
        "figures": figs,
        "claims": res.claims(),
    })
