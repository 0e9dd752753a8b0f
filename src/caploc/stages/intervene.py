"""Interventions on a neuron set, validated against random-neuron controls (DESIGN.md §1 "Validation", "Specificity").

The intervention multiplies the set's neuron activations by a gain ``k`` at every position through
:func:`caploc.neurons.intervention` (erase: k = 0; enhance: k > 1). Weights are never touched.

:func:`run_intervention` measures, for every dataset (the ``on``-target ones first, then ``off``-target ones) and
every gain k: the untouched model; the neuron set; ``n_random`` random sets with the set's per-layer sizes drawn from
the neurons NOT in the set (seeds ``seed .. seed + n_random - 1``); an activation-matched control (for every set
neuron, the unused neuron of the same layer, outside the set, whose mean |activation| on the first on-target dataset
is closest); see :mod:`caploc.stages.controls`.

Effect = metric under the intervention minus the untouched model on the same samples: ΔNLL per target token
(token-weighted) and Δaccuracy. The set's effect is placed in the distribution of the random sets' effects
(``stats.compare_to_null``: z, percentile, empirical two-sided p), gets a one-sided permutation p in the gain's
expected direction, ``p = (1 + #{random effects at least as extreme}) / (1 + n_random)``, and a paired bootstrap CI
over samples.

Verdicts
--------
Every claim needs at least ``min_controls`` (default 20) random sets; with fewer its verdict is "insufficient
controls" and ``holds`` is None (with n random sets the smallest reachable p is 1 / (n + 1)).

``erase_beats_random`` (k = 0) / ``enhance_beats_random`` (largest k > 1): the set's ΔNLL is beyond every random
set's in the claimed direction (equivalently: the one-sided permutation p is 1 / (n_random + 1)).

``specificity`` (primary gain). For gain k the *expected direction* is d = +1 (NLL up) when k < 1 and d = -1 (NLL
down) when k > 1. With ``z_on`` / ``z_off`` the set's z-scores on an on-target / off-target dataset, each against the
random sets ON THAT DATASET, and directed z' = d * z::

    SI = (z'_on - z'_off) / (|z'_on| + |z'_off|)        in [-1, 1]

SI = +1: the set moves only the on-target data beyond random; 0: on- and off-target equally unusual (a generic set);
-1: only off-target. z-scores put each effect on the scale of "what a random set of the same per-layer sizes does to
THIS data", but ignore size (a tiny off-target effect of a set whose random null is even tinier gets a large z'_off,
and a large off-target effect with a wide null a small one). So the claim needs, for EVERY off-target dataset, both

* the z criterion: z'_on >= 2 and SI >= 1/3 (for positive z': z'_on is at least twice z'_off), and
* the absolute criterion on directed set effects Δ' = d * ΔNLL (nats/token): the off-target effect is small against
  the on-target one, Δ'_off <= ``spec_max_off_share`` * Δ'_on (default 0.5: off-target at most half the on-target
  effect; Δ'_on must be > 0; an off-target effect in the other direction passes), AND Δ'_on - Δ'_off >=
  ``spec_margin`` (default 0: no extra margin).

The activation-matched control is read as the share of the set's effect it reproduces: effect_actmatched /
effect_set (claim ``act_matched_share``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch

from .. import __version__
from ..answers import answer_kind
from ..config import check, setting
from ..data import encode_dataset
from ..errors import CaplocError
from ..measure import METRICS, accuracy, nll_sums
from ..memory import MEMORY_HELP
from ..neurons import flat_indices, intervention
from ..progress import bar as progress_bar
from ..report import intervene as report_iv
from ..results import NeuronSet, atomic_save_tensors, atomic_write_json, check_out_dir, read_result
from ..runs import commit
from ..stats import bootstrap_ci, compare_to_null
from ..verdicts import (
    MIN_CONTROLS,
    SPEC_MARGIN,
    SPEC_MAX_OFF_SHARE,
    absolute_specificity,
    actmatched_share,
    permutation_p,
    verdict,
)
from .controls import activation_matched_set, mean_abs_activation, random_controls

log = logging.getLogger(__name__)

ROLES = ("on", "off")


# ---------------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class InterveneConfig:
    """Settings of ``caploc intervene``."""

    ks: tuple = setting((0.0,), help="Gains to apply, e.g. 0,0.5,1,2 (0 = erase, 1 = untouched, > 1 = enhance).",
                        min=0.0, item=float)
    primary_k: float | None = setting(None, help="The gain of the headline claims (default: the first of ks).", min=0.0)
    n_random: int = setting(MIN_CONTROLS, help="Random layer-matched control sets (a claim needs at least min_controls).", min=2)
    min_controls: int = setting(MIN_CONTROLS, help="Random sets a claim needs for a verdict; with fewer it reads 'insufficient "
                                "controls'.", min=2)
    seed: int = setting(0, help="Random sets use seeds seed..seed+n_random-1.")
    act_matched: bool = setting(True, help="Also run the activation-matched control.")
    act_samples: int = setting(8, help="Samples for the mean |activation| of the matched control.", min=1)
    spec_margin: float = setting(SPEC_MARGIN, help="Specificity: the directed on-target ΔNLL must exceed the "
                                 "off-target one by at least this many nats/token.", min=0.0)
    spec_max_off_share: float = setting(SPEC_MAX_OFF_SHARE, help="Specificity: the directed off-target ΔNLL may be at "
                                        "most this share of the on-target one.", min=0.0)
    metrics: tuple = setting(("nll",), help="nll, accuracy or both (accuracy generates: slow).", choices=METRICS,
                             item=str)
    chat: bool = setting(False, help="Wrap prompts in the chat template.")
    batch_size: int = setting(8, help="At most this many samples per forward pass.", min=1)
    memory_mb: float | None = setting(None, min=0, min_exclusive=True, help=MEMORY_HELP)
    max_length: int | None = setting(None, help="Refuse samples longer than this many tokens.", min=1)
    max_new_tokens: int | None = setting(None, help="Generation length for accuracy (default: longest target + 8).",
                                         min=1)
    n_boot: int = setting(2000, help="Bootstrap resamples for the CI.", min=1)

    def __post_init__(self):
        check(self)
        self.ks = tuple(float(k) for k in self.ks)
        if not self.ks:
            raise CaplocError("ks is empty: give at least one gain, e.g. --ks 0,2")
        if len(set(self.ks)) != len(self.ks):
            raise CaplocError(f"ks {list(self.ks)} has duplicates")
        self.primary_k = self.ks[0] if self.primary_k is None else float(self.primary_k)
        if self.primary_k not in self.ks:
            raise CaplocError(f"primary gain {self.primary_k} is not in ks {list(self.ks)}; add it to --ks")
        self.metrics = tuple(self.metrics)
        if not self.metrics:
            raise CaplocError(f"metrics is empty; choose from {', '.join(METRICS)}")

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


# ---------------------------------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class InterventionResult:
    """Per-sample NLL sums (and correctness) of every dataset x gain x condition; summaries are derived on demand.

    ``datasets``: [{label, role, name, fingerprint, n, source}] in order (on-target first).
    ``sums[(label|k|cond)]``: [n] summed target NLL; ``base[label]``: untouched sums; ``tokens[label]``: [n] counts.
    ``correct`` / ``base_correct``: the same for accuracy (empty when not measured).
    ``sets``: flat neuron indices of "set", "act_matched" and "random_<seed>".
    """

    kind: ClassVar[str] = "intervention"

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

    @property
    def provenance(self) -> dict:
        """Model, neuron set, settings, seeds and timing of the run (``meta``)."""
        return self.meta

    # ---- settings recorded with the result ---------------------------------------------------------------------
    def _cfg(self, name: str, default):
        v = (self.meta.get("config") or {}).get(name)
        return default if v is None else v

    @property
    def min_controls(self) -> int:
        return int(self._cfg("min_controls", MIN_CONTROLS))

    @property
    def primary_k(self) -> float | None:
        pk = float(self._cfg("primary_k", self.ks[0]))
        return next((k for k in self.ks if k != 1.0), None) if pk == 1.0 else pk

    # ---- derived quantities ------------------------------------------------------------------------------------
    @property
    def random_conditions(self) -> list[str]:
        return [c for c in self.conditions if c.startswith("random_")]

    def labels(self, role: str | None = None) -> list[str]:
        return [d["label"] for d in self.datasets if role is None or d["role"] == role]

    def role(self, label: str) -> str:
        return next(d["role"] for d in self.datasets if d["label"] == label)

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
        """``stats.compare_to_null`` of the condition's effect vs the random sets, plus ``p_one_sided``: the
        permutation p in the gain's expected direction (NLL up for k < 1, down for k > 1; accuracy the other way;
        k = 1 counts as "up")."""
        eff = self.effect(label, k, cond) if metric == "nll" else self.acc_effect(label, k, cond)
        if eff is None:
            return None
        null = self.null(label, k, metric)
        null = null[~np.isnan(null)]
        if null.size == 0:
            return None
        if np.all(null == null[0]):  # degenerate null (e.g. accuracy 0 for every random set): same numbers, no warning
            diff = eff - float(null[0])
            out = {"effect": float(eff), "null_mean": float(null[0]), "null_sd": 0.0,
                   "z": math.copysign(math.inf, diff) if diff != 0 else 0.0,
                   "percentile": float((np.count_nonzero(null < eff) + 0.5 * np.count_nonzero(null == eff)) / null.size),
                   "p_two_sided": (1.0 + (null.size if diff == 0 else 0)) / (1.0 + null.size),
                   "n_null": int(null.size), "degenerate_null": True}
        else:
            out = compare_to_null(eff, null)
        direction = (_dir(k) or 1) * (1 if metric == "nll" else -1)
        out["p_one_sided"] = permutation_p(eff, null, direction)
        return out

    def summary_rows(self) -> list[dict]:
        """One row per dataset x gain x {set, act_matched}: effects, random null, z, percentile, p-values, CI, and
        for the activation-matched set its share of the set's effect."""
        rows = []
        n_boot = int(self._cfg("n_boot", 2000))
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
                           "p_one_sided": cmp_["p_one_sided"], "n_random": cmp_["n_null"]}
                    if cond == "act_matched":
                        share = actmatched_share(est, self.effect(lab, k, "set"))
                        row["share_of_set"] = share if math.isfinite(share) else None  # undefined when the set has no effect
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
        effects in nats and their ratio, the directed set effects and the absolute criterion (module docstring)."""
        out = []
        margin, share = float(self._cfg("spec_margin", SPEC_MARGIN)), float(self._cfg("spec_max_off_share", SPEC_MAX_OFF_SHARE))
        for kk in ([k] if k is not None else [x for x in self.ks if x != 1.0]):
            d = _dir(kk)
            for on in self.labels("on"):
                c_on = self.compare(on, kk)
                for off in self.labels("off"):
                    c_off = self.compare(off, kk)
                    z_on, z_off = d * c_on["z"], d * c_off["z"]
                    ex_on = d * (c_on["effect"] - c_on["null_mean"])
                    ex_off = d * (c_off["effect"] - c_off["null_mean"])
                    si = specificity_index(z_on, z_off)
                    absol = absolute_specificity(d * c_on["effect"], d * c_off["effect"], margin, share)
                    z_ok = bool(z_on >= 2 and si >= 1 / 3)
                    out.append({
                        "k": kk, "on": on, "off": off, "z_on": z_on, "z_off": z_off, "si": si,
                        "excess_on_nats": ex_on, "excess_off_nats": ex_off,
                        "excess_ratio": ex_on / ex_off if ex_off != 0 else float("nan"),
                        "rel_excess_on": ex_on / self.base_nll(on), "rel_excess_off": ex_off / self.base_nll(off),
                        "d_on_nats": d * c_on["effect"], "d_off_nats": d * c_off["effect"],
                        "gap_nats": absol["gap_nats"], "off_share": absol["off_share"],
                        "z_criterion": z_ok, "abs_criterion": absol["holds"],
                        "p_on": c_on["p_one_sided"], "p_off": c_off["p_one_sided"],
                    })
        return out

    def claims(self) -> dict:
        """``erase_beats_random`` (k = 0), ``enhance_beats_random`` (largest k > 1), ``specificity`` and
        ``act_matched_share`` (primary k); verdicts as in the module docstring."""
        claims: dict = {}
        on = self.labels("on")
        if not on:
            return claims
        main = on[0]
        n_boot = int(self._cfg("n_boot", 2000))
        n_rand, need = len(self.random_conditions), self.min_controls

        def beats(k, sign):
            c = self.compare(main, k)
            _, lo, hi = self.effect_ci(main, k, n_boot=n_boot)
            null = self.null(main, k)
            holds, word = verdict(bool(sign * c["effect"] > np.max(sign * null)), n_rand, need)
            return {"value": c["effect"], "ci": [lo, hi], "chance": c["null_mean"], "chance_sd": c["null_sd"],
                    "z": c["z"], "percentile": c["percentile"], "p_two_sided": c["p_two_sided"],
                    "p": permutation_p(c["effect"], null, sign), "n_random": c["n_null"], "min_controls": need,
                    "k": k, "dataset": main, "holds": holds, "verdict": word,
                    "definition": "ΔNLL/token of the set vs the untouched model; holds = beyond every random set "
                                  f"({'higher' if sign > 0 else 'lower'} ΔNLL), i.e. one-sided permutation p = "
                                  f"1/(n_random+1); needs n_random >= {need}"}

        if 0.0 in self.ks:
            claims["erase_beats_random"] = beats(0.0, +1)
        enh = [k for k in self.ks if k > 1]
        if enh:
            claims["enhance_beats_random"] = beats(max(enh), -1)
        pk = self.primary_k
        if pk is not None and self.labels("off"):
            spec = [s for s in self.specificity(pk) if s["on"] == main]
            worst = max(spec, key=lambda s: s["z_off"])
            worst_abs = max(spec, key=lambda s: s["d_off_nats"])
            z_ok = all(s["z_criterion"] for s in spec)
            abs_ok = all(s["abs_criterion"] for s in spec)
            holds, word = verdict(z_ok and abs_ok, n_rand, need)
            claims["specificity"] = {
                "value": worst["si"], "k": pk, "on": main, "worst_off": worst["off"], "z_on": worst["z_on"],
                "z_off": worst["z_off"], "excess_ratio": worst["excess_ratio"],
                "per_off_target": {s["off"]: s["si"] for s in spec},
                "d_on_nats": worst_abs["d_on_nats"], "d_off_nats": worst_abs["d_off_nats"],
                "worst_off_abs": worst_abs["off"], "gap_nats": worst_abs["gap_nats"],
                "off_share": worst_abs["off_share"], "z_criterion": z_ok, "abs_criterion": abs_ok,
                "p_on": worst["p_on"], "n_random": n_rand, "min_controls": need, "holds": holds, "verdict": word,
                "definition": "SI = (z'_on - z'_off)/(|z'_on| + |z'_off|), z' = z-score vs the random sets of the same "
                              "dataset, signed so that the expected direction of the gain is positive; holds = for "
                              "every off-target dataset z'_on >= 2 and SI >= 1/3 (z criterion) AND, on directed set "
                              f"effects Δ' (nats/token), Δ'_on - Δ'_off >= {self._cfg('spec_margin', SPEC_MARGIN):g} and "
                              f"Δ'_off <= {self._cfg('spec_max_off_share', SPEC_MAX_OFF_SHARE):g} Δ'_on (absolute criterion); "
                              f"needs n_random >= {need}",
            }
        if pk is not None and "act_matched" in self.conditions:
            e_set, e_am = self.effect(main, pk, "set"), self.effect(main, pk, "act_matched")
            claims["act_matched_share"] = {
                "value": actmatched_share(e_am, e_set), "k": pk, "dataset": main, "effect_set": e_set,
                "effect_act_matched": e_am,
                "definition": "share of the set's ΔNLL/token that the activation-matched set reproduces "
                              "(effect_actmatched / effect_set); near 1: activation magnitude explains the effect"}
        return claims

    # ---- persistence -------------------------------------------------------------------------------------------
    def save(self, out_dir: Path | str) -> Path:
        """``intervene.safetensors`` (per-sample numbers, sets) + ``intervene.json`` (meta, summaries, claims)."""
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
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> "InterventionResult":
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

    def to_report(self, out_dir: Path | str, figures: bool = True) -> dict:
        """Figures into ``out_dir`` and the ``report.json`` dict (:func:`caploc.report.intervene.intervene_report`)."""
        return report_iv.intervene_report(self, out_dir, figures=figures)


# ---------------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------------
def _measure(lm, ds, enc, cfg: InterveneConfig, kind: str | None):
    sums, counts = nll_sums(lm, enc, batch_size=cfg.batch_size, progress=False, memory_mb=cfg.memory_mb)
    correct = None
    if "accuracy" in cfg.metrics:
        _, correct, _ = accuracy(lm, ds, chat=cfg.chat, batch_size=cfg.batch_size,
                                 max_new_tokens=cfg.max_new_tokens, parser=kind, progress=False)
    return sums, counts, correct


def _check_inputs(site, neurons, datasets) -> np.ndarray:
    if isinstance(neurons, NeuronSet):
        neurons.check_compatible(site)
    flat = flat_indices(neurons, site.d_mlp)
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
    return flat


def run_intervention(lm, neurons, datasets: Sequence[tuple[str, object, str]], cfg: InterveneConfig | None = None,
                     *, out_dir: Path | str | None = None, progress: bool | None = None) -> InterventionResult:
    """Measure ``neurons`` (a NeuronSet) against its controls on ``datasets`` = [(label, Dataset, role)] with role
    "on" (on-target) or "off" (off-target); on-target entries must come first. See the module docstring."""
    cfg = cfg or InterveneConfig()
    if out_dir is not None:
        out_dir = check_out_dir(out_dir)  # before any computation
    site = lm.site
    flat = _check_inputs(site, neurons, datasets)
    labels = [lab for lab, _, _ in datasets]
    if cfg.n_random < cfg.min_controls:
        log.warning("%d random sets < min_controls %d: every claim will read 'insufficient controls'", cfg.n_random,
                    cfg.min_controls)
    t0 = time.time()
    sets: dict[str, np.ndarray] = {"set": flat}
    first_on = datasets[0][1]
    if cfg.act_matched:
        act = mean_abs_activation(lm, first_on, n_samples=cfg.act_samples, chat=cfg.chat, max_length=cfg.max_length)
        sets["act_matched"] = activation_matched_set(flat, act)
        act_flat = act.reshape(-1).numpy()
        act_info = {"mean_abs_set": float(act_flat[flat].mean()),
                    "mean_abs_act_matched": float(act_flat[sets["act_matched"]].mean()),
                    "mean_abs_all": float(act_flat.mean()), "measured_on": labels[0],
                    "n_samples": min(cfg.act_samples, len(first_on))}
    else:
        act_info = None
    for i, r in enumerate(random_controls(flat, site.n_layers, site.d_mlp, cfg.n_random, cfg.seed)):
        sets[f"random_{cfg.seed + i}"] = r
    conditions = list(sets)
    for name, s in sets.items():
        if name != "set" and np.intersect1d(s, flat).size:
            raise CaplocError(f"control {name} overlaps the neuron set")  # pragma: no cover - guaranteed by the draw

    max_len = cfg.max_length or getattr(lm.model.config, "max_position_embeddings", None)
    tokens, base, sums, base_correct, correct = {}, {}, {}, {}, {}
    gains = list(cfg.ks)
    n_evals = sum(1 + sum(len(conditions) for k in gains if k != 1.0) for _ in datasets)
    with progress_bar(n_evals, "intervene", "eval", progress) as bar:
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
    res = InterventionResult(meta=meta, datasets=ds_meta, ks=gains, conditions=conditions, tokens=tokens,
                             base=base, sums=sums, sets=sets, base_correct=base_correct, correct=correct)
    if out_dir is not None:
        commit(res, out_dir)
    return res


__all__ = ["InterveneConfig", "InterventionResult", "run_intervention", "specificity_index", "ROLES",
           "random_controls", "activation_matched_set", "mean_abs_activation"]
