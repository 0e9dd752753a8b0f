"""Report for ``caploc faithfulness``: one figure (normalized curves per direction x dataset, random band shaded, fixed
sets as points), the AUC table with the random rankings' AUCs, and claim rows. matplotlib object API only."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..results import atomic_write_json
from ..stages.faithfulness import FaithResult, auc, normalized
from .figures import _ctx, save_figure

log = logging.getLogger(__name__)

NORMALIZATION = ("erase: y = (NLL(erase top k) - NLL(model)) / (NLL(all ablated) - NLL(model)); keep: y = (NLL(all "
                 "ablated) - NLL(keep only top k)) / (NLL(all ablated) - NLL(model)); AUC = trapezoidal area of y over "
                 "x = log(k / k_min) / log(k_max / k_min) in [0, 1] (a constant curve c has AUC c).")


def _r(x, nd=4):
    return None if x is None or (isinstance(x, float) and not np.isfinite(x)) else round(float(x), nd)


def figure(res: FaithResult, path: Path | str) -> Path:
    """Panels: rows = directions, columns = datasets; x = budget k (log), y = normalized effect."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dirs = list(res.nll)
    labs = list(res.nll[dirs[0]])
    with _ctx():
        fig = Figure(figsize=(4.2 * len(labs), 3.2 * len(dirs)), dpi=110)
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(dirs), len(labs), squeeze=False)
        for i, d in enumerate(dirs):
            for j, lab in enumerate(labs):
                ax = axes[i][j]
                band = res.random_band(d, lab)
                if band:
                    ax.fill_between(res.ks, band["lo"], band["hi"], color="#999999", alpha=0.3, lw=0,
                                    label=f"random {band['q'][0]}-{band['q'][1]}% ({len(band['auc'])})")
                    ax.plot(res.ks, band["mean"], color="#666666", ls="--", lw=1)
                for c, m in enumerate(res.methods()):
                    ax.plot(res.ks, res.curve(d, lab, m), marker="o", ms=3, lw=1.3, color=f"C{c}", label=m)
                for c, (name, (k, v)) in enumerate(res.points.get(d, {}).get(lab, {}).items()):
                    if k > 0:
                        y = normalized(d, np.array([v]), res.base[lab], res.ablated[d][lab])[0]
                        ax.plot([k], [y], marker="*", ms=9, ls="none", color=f"C{(c + 5) % 10}", label=f"{name} (set)")
                ax.set_xscale("log")
                ax.set_title(f"{d} - {lab} ({res.roles.get(lab, '?')}-target)")
                ax.set_xlabel(f"k neurons (of {res.n_neurons})")
                ax.set_ylabel("share of full-ablation damage" if d == "erase" else "share of model recovered")
                if i == 0 and j == len(labs) - 1:
                    ax.legend(frameon=False, fontsize=6)
        fig.subplots_adjust(hspace=0.45, wspace=0.3, left=0.08, right=0.98, bottom=0.1, top=0.93)
    return save_figure(fig, path)


def write_report(res: FaithResult, out_dir: Path | str) -> Path:
    out_dir = Path(out_dir)
    rows = res.summary_rows()
    fig = figure(res, out_dir / "faithfulness.png")
    table = [[r["direction"], r["dataset"], r["role"], r["method"], _r(r["auc"]),
              f"[{_r(r['auc_ci'][0])}, {_r(r['auc_ci'][1])}]" if r.get("auc_ci") else "-", _r(r["random_auc_mean"]),
              _r(r["random_auc_sd"]), _r(r["random_auc_max"]), _r(r["z_vs_random"], 2), _r(r["share_random_ge"], 3)]
             for r in rows]
    pts = []
    for d, by_lab in res.points.items():
        for lab, items in by_lab.items():
            for name, (k, v) in items.items():
                y = normalized(d, np.array([v]), res.base[lab], res.ablated[d][lab])[0]
                pts.append([d, lab, name, int(k), _r(v), _r(v - res.base[lab]), _r(y)])
    claims = {}
    for r in rows:
        claims[f"auc[{r['direction']},{r['dataset']},{r['method']}]"] = {
            "value": _r(r["auc"]), "ci": [_r(x) for x in r["auc_ci"]] if r.get("auc_ci") else None,
            "chance": _r(r["random_auc_mean"]), "z": _r(r["z_vs_random"], 2)}
    m = res.meta
    text = [f"Model {m.get('model_id')}; {res.n_neurons} MLP neurons; budgets k = {', '.join(map(str, res.ks))} "
            f"({100 * res.ks[0] / res.n_neurons:.3g}% to {100 * res.ks[-1] / res.n_neurons:.3g}% of MLP neurons). "
            f"Held-out data: {m.get('n_samples')} samples ({m.get('n_target_tokens')} target tokens).",
            "Ablation: erase uses " + m.get("config", {}).get("erase_fill", "?") + " ablation of the top k; keep-only "
            "uses " + m.get("config", {}).get("keep_fill", "?") + " ablation of all other neurons (mean = the "
            "neuron's mean activation over reference tokens).",
            "Normalization (MIB-style): " + NORMALIZATION,
            "Untouched NLL/token: " + ", ".join(f"{k} {v:.4g}" for k, v in res.base.items()) + "; fully ablated: "
            + "; ".join(f"{d}: " + ", ".join(f"{k} {v:.4g}" for k, v in a.items()) for d, a in res.ablated.items())]
    rep = {"kind": "faithfulness", "title": "Faithfulness curves (threshold-free localization comparison)",
           "text": text,
           "tables": [{"title": "Area under the normalized curve", "columns": [
               "direction", "dataset", "role", "method", "AUC", "AUC 95% CI (samples)", "random AUC mean",
               "random AUC sd", "random AUC max",
               "z vs random", "share of random AUC >= method"], "rows": table,
               "note": NORMALIZATION + " The CI resamples the held-out samples (percentile bootstrap, 2000 draws); "
               "the random columns vary the ranking on the same samples."},
               {"title": "Fixed neuron sets", "columns": ["direction", "dataset", "set", "k", "NLL/token",
                                                            "ΔNLL/token", "normalized"], "rows": pts}],
           "figures": [{"title": "Faithfulness curves", "file": fig.name,
                        "caption": "Normalized effect of erasing (top row) or keeping only (bottom row) each "
                                   "method's top-k neurons; grey band: random rankings' 5-95% range."}],
           "claims": claims}
    atomic_write_json(out_dir / "report.json", rep)
    return out_dir / "report.json"


__all__ = ["figure", "write_report", "NORMALIZATION", "auc"]
