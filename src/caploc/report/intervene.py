"""``report.json`` and figures of ``caploc intervene`` (an :class:`~caploc.stages.intervene.InterventionResult`).

Figures (object API through :mod:`caploc.report.figures`): per dataset the dose-response curve (ΔNLL vs gain for the
set with its bootstrap CI, the random sets' mean and min-max, the activation-matched set) and, at the primary gain,
the random-set null histogram with the set's effect marked.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any  # the stage's result (not imported here: report modules sit below the stages)

import numpy as np

from .figures import curves, null_histogram

log = logging.getLogger(__name__)


def _r(v, nd: int = 4):
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    v = float(v)
    if math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return round(v, nd)


def fig_dose_response(res: Any, lab: str, path: Path) -> Path:
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
    return curves(ks, ys, path, xlabel="gain k (0 = erase, 1 = untouched)", ylabel="ΔNLL / target token (nats)",
                  title=f"{lab} ({res.role(lab)}-target)", bands=bands)


def fig_null_hist(res: Any, lab: str, k: float, path: Path) -> Path:
    return null_histogram(res.null(lab, k), res.effect(lab, k, "set"), path, title=f"{lab}: k={k:g}",
                          xlabel=f"ΔNLL / target token at k={k:g}", effect_label="neuron set")


MIN_DOSE_GAINS = 3


def _figures(res: Any, out_dir: Path) -> list[dict]:
    figs = []
    pk = res.primary_k
    for i, lab in enumerate(res.labels()):
        try:
            # a curve needs >= 3 measured gains besides the untouched k = 1: with fewer it would be a straight line
            # drawn through an interpolated band
            if len({float(k) for k in res.ks} - {1.0}) >= MIN_DOSE_GAINS:
                fig_dose_response(res, lab, out_dir / f"fig_dose_{i}.png")
                figs.append({"title": f"Dose-response: {lab}", "file": f"fig_dose_{i}.png",
                             "caption": "ΔNLL/token vs gain k: the set (band: 95% paired bootstrap CI), the random "
                                        "sets (mean; band: min-max) and the activation-matched control. k = 1 is the "
                                        "untouched model (0 by definition)."})
            if pk is not None:
                fig_null_hist(res, lab, pk, out_dir / f"fig_null_{i}.png")
                figs.append({"title": f"Random-set null: {lab}, k={pk:g}", "file": f"fig_null_{i}.png",
                             "caption": "ΔNLL/token of each random layer-matched set; the red line is the "
                                        "localized set."})
        except Exception as e:  # a figure must never lose the measured numbers
            log.warning("could not draw the intervention figures for %s: %s", lab, e)
    return figs


def actmatched_sentence(share: float, label: str, k: float, set_effect: float | None = None) -> str:
    """A plain reading of ``caploc.verdicts.actmatched_share`` (effect_actmatched / effect_set) for the report.

    ``set_effect``: the set's ΔNLL/token; the share is only read when it moves the data in the gain's expected
    direction (NLL up for k < 1, down for k > 1). Readings: >= 1 magnitude explains all of it; >= 0.5 much; >= 0.2
    part; > -0.2 not explained by magnitude; below: the matched set moves the data the other way."""
    head = f"The activation-matched set's share of the set's effect on {label} at k={k:g}"
    if not math.isfinite(share):
        return f"{head} is undefined (the set has no effect there)."
    direction = 1 if k < 1 else (-1 if k > 1 else 0)
    if set_effect is not None and direction * set_effect <= 0:
        return (f"{head} is {100 * share:.0f} %, but it is not read: the set itself does not move the data in the "
                f"expected direction (ΔNLL/token {set_effect:+.4g}).")
    if share >= 1:
        reading = ("neurons that merely fire as strongly move the data at least as much as the set: activation "
                   "magnitude alone explains the effect")
    elif share >= 0.5:
        reading = ("much of the set's effect is reproduced by neurons that merely fire as strongly: activation "
                   "magnitude, not the identity of these neurons, explains a large part of it")
    elif share >= 0.2:
        reading = "part of the set's effect is explained by activation magnitude alone"
    elif share > -0.2:
        reading = "the set's effect is not explained by how strongly its neurons fire"
    else:
        reading = "the activation-matched set moves the data the other way, so magnitude does not explain the effect"
    return (f"The activation-matched set reproduces {100 * share:.0f} % of the set's ΔNLL on {label} at k={k:g} "
            f"(effect_actmatched / effect_set): {reading}.")


def _text(res: Any, claims: dict) -> list[str]:
    m = res.meta
    cfg = m.get("config", {})
    n = len(res.random_conditions)
    need = res.min_controls
    ai = m.get("activation_matching") or {}
    margin, share = cfg.get("spec_margin", 0.0), cfg.get("spec_max_off_share", 0.5)  # caploc.verdicts defaults
    text = [
        f"Model {m.get('model_id')} (fingerprint {m.get('model_fingerprint')}); {m.get('n_neurons')} neurons "
        f"({m.get('neuron_site')}) from the set localized on {m.get('neuron_set', {}).get('dataset')} "
        f"({m.get('neuron_set', {}).get('method')}). Gains k = {', '.join(f'{k:g}' for k in res.ks)} "
        "(activation multiplied by k at every position through hooks; 0 = erase).",
        f"Controls: {n} random sets with the same per-layer counts, disjoint from the set "
        f"(seeds {m.get('random_seeds', [None])[0]}..{m.get('random_seeds', [None])[-1]})"
        + (f"; an activation-matched set (mean |a| {ai.get('mean_abs_act_matched', float('nan')):.4g} vs the set's "
           f"{ai.get('mean_abs_set', float('nan')):.4g}, all neurons {ai.get('mean_abs_all', float('nan')):.4g}; "
           f"measured on {ai.get('n_samples')} samples of {ai.get('measured_on')})" if ai else "") + ".",
        "Effect = metric under the intervention minus the untouched model on the same samples. ΔNLL/tok is "
        "token-weighted over the gold target tokens (teacher forced); the CI is a paired bootstrap over samples "
        f"({cfg.get('n_boot')} resamples); z and percentile place the set among the random sets of the same dataset "
        "and gain. p (one-sided) is a permutation p-value in the gain's expected direction (k < 1: NLL up; k > 1: NLL "
        "down): p = (1 + #{random sets with an effect at least as extreme}) / (1 + n_random); with "
        f"{n} random sets the smallest reachable p is {1 / (n + 1):.3f}.",
        f"Verdicts need at least {need} random sets (min_controls); with fewer a claim reads 'insufficient controls' "
        f"(here: {n} random set{'s' if n != 1 else ''}"
        + (", so no claim is decided)." if n < need else ").")
        + " A set beats random when its effect is beyond every random set's in the claimed direction.",
        "Specificity index SI = (z'_on - z'_off)/(|z'_on| + |z'_off|) where z' is the z-score vs the random sets of "
        "that dataset, signed so the gain's expected direction is positive. SI = 1: only the on-target data is moved "
        "beyond random; 0: generic; -1: only off-target. The specificity claim needs, for every off-target dataset, "
        "BOTH the z criterion (z'_on >= 2 and SI >= 1/3) AND the absolute criterion on the set's directed effects Δ' "
        f"(nats/token): Δ'_on - Δ'_off >= {margin:g} and Δ'_off <= {share:g} x Δ'_on. The two are shown side by side "
        "in the specificity table.",
    ]
    am = claims.get("act_matched_share")
    if am is not None:
        text.append(actmatched_sentence(float("nan") if am["value"] is None else am["value"], am["dataset"], am["k"],
                                        am.get("effect_set")))
    return text


def intervene_report(res: Any, out_dir: Path | str, figures: bool = True) -> dict:
    """Draw the figures into ``out_dir`` and return the ``report.json`` dict (tables, figures, claims)."""
    out_dir = Path(out_dir)
    has_acc = bool(res.correct)
    claims = res.claims()
    rows = []
    for r in res.summary_rows():
        row = [r["dataset"], r["role"], r["k"], r["condition"], _r(r["nll_untouched"]), _r(r["nll"]), _r(r["d_nll"]),
               f"[{_r(r['ci_lo'])}, {_r(r['ci_hi'])}]", _r(r["random_mean"]), _r(r["random_sd"]), _r(r["z"], 2),
               _r(r["percentile"], 3), _r(r["p_two_sided"], 3)]
        if has_acc:
            row += [_r(r.get("acc_untouched"), 3), _r(r.get("d_acc"), 3), _r(r.get("acc_random_mean"), 3)]
        row += [_r(r["p_one_sided"], 3), _r(r.get("share_of_set"), 3)]
        rows.append(row)
    cols = ["dataset", "role", "k", "condition", "NLL/tok untouched", "NLL/tok", "ΔNLL/tok", "95% CI (bootstrap)",
            "random mean Δ", "random sd", "z vs random", "percentile", "p (two-sided)"]
    if has_acc:
        cols += ["acc untouched", "Δacc", "random mean Δacc"]
    cols += ["p (one-sided, permutation)", "share of the set's effect"]
    spec_rows = [[s["k"], s["on"], s["off"], _r(s["z_on"], 2), _r(s["z_off"], 2), _r(s["si"], 3),
                  _r(s["excess_on_nats"]), _r(s["excess_off_nats"]), _r(s["excess_ratio"], 3),
                  "yes" if s["z_criterion"] else "no", _r(s["d_on_nats"]), _r(s["d_off_nats"]), _r(s["gap_nats"]),
                  _r(s["off_share"], 3), "yes" if s["abs_criterion"] else "no"] for s in res.specificity()]
    return {
        "kind": "intervention",
        "title": f"Interventions on {res.meta.get('n_neurons')} neurons of {res.meta.get('model_id')} vs random neurons",
        "text": _text(res, claims),
        "tables": [
            {"title": "Effect of the intervention vs random-neuron controls", "columns": cols, "rows": rows,
             "note": "ΔNLL > 0 = worse. condition 'set' = the localized neurons; 'act_matched' = the activation-matched "
                     "control; both compared with the same random sets. share of the set's effect = "
                     "effect_actmatched / effect_set (act_matched rows)."},
            {"title": "Specificity (on-target vs off-target): z criterion and absolute criterion", "columns": [
                "k", "on-target", "off-target", "z'_on", "z'_off", "SI", "excess on (nats)", "excess off (nats)",
                "excess ratio on/off", "z criterion", "Δ'_on (nats)", "Δ'_off (nats)", "Δ'_on - Δ'_off",
                "Δ'_off / Δ'_on", "absolute criterion"], "rows": spec_rows,
             "note": "z', excess and Δ' are signed so that the gain's expected direction is positive. z criterion: "
                     "z'_on >= 2 and SI >= 1/3; absolute criterion: Δ'_on - Δ'_off >= spec_margin and Δ'_off <= "
                     "spec_max_off_share x Δ'_on (settings in the text)."},
        ],
        "figures": _figures(res, out_dir) if figures else [],
        "claims": claims,
    }


__all__ = ["intervene_report", "fig_dose_response", "fig_null_hist", "actmatched_sentence"]
