"""Comparisons of a fine-tuning experiment: the neuron arm against the random arms' distribution per dataset, a
paired per-sample CI against the untuned model, the on- vs off-target specificity index, and the claims."""
from __future__ import annotations

import numpy as np

from ...stats import bootstrap_ci, compare_to_null
from ...verdicts import MIN_CONTROLS, permutation_p, verdict
from .result import ArmResult


def compare_arms(arms: list[ArmResult], untuned: dict, roles: dict, per_sample: dict) -> tuple[dict, dict, dict]:
    """Neuron arm vs the random arms' distribution per dataset, paired per-sample CI, specificity, claims."""
    by = {a.name: a for a in arms}
    rnd = [a for a in arms if a.kind == "random"]
    comparisons: dict = {}
    specificity: dict = {}
    claims: dict = {}
    neu = by.get("neurons")
    if neu is None:
        return comparisons, specificity, claims
    for d in untuned:
        c: dict = {"role": roles.get(d), "delta_neurons": neu.eval[d]["delta"]}
        if rnd:
            c.update(compare_to_null(neu.eval[d]["delta"], [a.eval[d]["delta"] for a in rnd]))
            c["random_deltas"] = [a.eval[d]["delta"] for a in rnd]
            c["better_than_all_random"] = bool(neu.eval[d]["delta"] < min(c["random_deltas"]))
        a, b = per_sample.get(f"neurons|{d}"), per_sample.get(f"untuned|{d}")
        if a is not None and b is not None and len(a) == len(b):
            est, lo, hi = bootstrap_ci(np.asarray(a) - np.asarray(b), seed=0)
            c["paired_delta_per_sample_mean"] = {"value": est, "ci": [lo, hi]}
        comparisons[d] = c
    on = [d for d in untuned if roles.get(d) == "on"]
    off = [d for d in untuned if roles.get(d) == "off"]

    def spec_index(arm: ArmResult) -> float | None:
        if not on or not off:
            return None
        return float(np.mean([arm.eval[d]["delta"] for d in on]) - np.mean([arm.eval[d]["delta"] for d in off]))

    if on:
        main = on[0]
        c = comparisons[main]
        claims["finetune_beats_random"] = {
            "value": c["delta_neurons"], "dataset": main, "metric": "delta NLL/token (after - before; < 0 = better)",
            "null_mean": c.get("null_mean"), "null_sd": c.get("null_sd"), "z": c.get("z"),
            "p_two_sided": c.get("p_two_sided"), "n_null": c.get("n_null"),
            "beats": c.get("better_than_all_random") if rnd else None,
        }
        cl = claims["finetune_beats_random"]
        if rnd:  # the intervention rules: a verdict needs MIN_CONTROLS random arms; permutation p, lower is better
            cl["p"] = permutation_p(c["delta_neurons"], np.asarray(c["random_deltas"]), -1)
            cl["holds"], cl["verdict"] = verdict(bool(cl["beats"]), len(rnd), MIN_CONTROLS)
            cl["min_controls"] = MIN_CONTROLS
        if "full" in by:
            f = by["full"].eval[main]["delta"]
            claims["neurons_share_of_full_gain"] = {
                "value": (c["delta_neurons"] / f) if f else None, "dataset": main,
                "params_share": neu.n_trainable / max(1, by["full"].n_trainable)}
    si = spec_index(neu)
    if si is not None:
        specificity = {"on_target": on, "off_target": off, "index_neurons": si,
                       "definition": "mean ΔNLL on on-target sets − mean ΔNLL on off-target sets (more negative = "
                                     "more specific improvement)",
                       "per_arm": {a.name: spec_index(a) for a in arms}}
        if rnd:
            specificity["vs_random"] = compare_to_null(si, [spec_index(a) for a in rnd])
        claims["finetune_specific"] = {"value": si, **({"null_mean": specificity["vs_random"]["null_mean"],
                                                       "z": specificity["vs_random"]["z"],
                                                       "p": specificity["vs_random"]["p_two_sided"]} if rnd else {})}
        off_d = [neu.eval[d]["delta"] for d in off]
        claims["finetune_off_target_delta"] = {"value": float(np.mean(off_d)), "datasets": off}
    return comparisons, specificity, claims


__all__ = ["compare_arms"]
