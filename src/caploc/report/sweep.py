"""Report of a threshold sweep: claims, ``report.json`` dict and one ``fig_sweep_<axis>.png`` per swept axis."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import __version__
from . import figures as F
from .fmt import as_float, ci, json_safe, rnd, rule_value
from .stability import PAPER


def _axes(res) -> list[str]:
    return list(dict.fromkeys(q["axis"] for q in res.points))


def figure_name(axis: str) -> str:
    return f"fig_sweep_{axis}.png"


def claims(res) -> dict:
    """Set size and split IoU at S = 95% (the paper's 19 of 20) and the set size at the run's own S."""
    out = {}
    for p in res.points:
        if p["axis"] == "min_freq" and abs(p["min_freq"] - 0.95) < 1e-9:
            out["sweep_n_neurons_at_S95"] = {"value": p["n_neurons"], "rule": p["rule"],
                                             "rule_value": p["rule_value"], "paper_S": "19 of 20"}
            r = p["agreement"].get("random")
            if r:
                out["sweep_split_iou_at_S95"] = {"value": r["iou"], "ci": [r["iou_lo"], r["iou_hi"]],
                                                 "chance": r["chance_iou"]}
    base = res.base_config
    for p in res.points:
        if p["axis"] == "min_freq" and abs(p["min_freq"] - base["min_freq"]) < 1e-9:
            out["sweep_n_neurons_at_base"] = {"value": p["n_neurons"], "min_freq": p["min_freq"]}
    return json_safe(out)


def to_report(res, out_dir: Path) -> dict:
    """Draw one figure per swept axis into ``out_dir`` and return the ``report.json`` dict."""
    for axis in _axes(res):
        plot_axis(res, axis, Path(out_dir) / figure_name(axis))
    return report(res)


def report(res) -> dict:
    p = res.provenance
    kinds = res.config["split"]["kinds"]
    cols = ["axis", "samples", "rule", "value", "min_freq", "S (full)", "neurons", "share of params",
            "per-sample selected"]
    for k in kinds:
        cols += [f"{k} split set size", f"{k} overlap", f"{k} overlap CI", f"{k} IoU", f"{k} IoU CI",
                 f"{k} chance IoU", f"{k} empty pairs"]
    rows = []
    for q in res.points:
        row = [q["axis"], q["n_samples"], q["rule"], q["rule_value"], q["min_freq"], q["min_count"], q["n_neurons"],
               rnd(q["share_of_params"], 7), round(q["per_sample_selected_mean"], 1)]
        for k in kinds:
            a = q["agreement"].get(k) or {}
            row += [rnd(a.get("size_mean"), 1), rnd(a.get("overlap")), ci(a.get("overlap_lo"), a.get("overlap_hi")),
                    rnd(a.get("iou")), ci(a.get("iou_lo"), a.get("iou_hi")), rnd(a.get("chance_iou"), 6),
                    a.get("n_empty_pairs")]
        rows.append(row)
    g = res.grid
    grid_rows = [[s] + list(r) for s, r in zip(g["sigmas"], g["n_neurons"])]
    sc = res.config["split"]
    figs = [{"title": f"Sweep over {ax}", "file": figure_name(ax),
             "caption": f"Left: set size on all samples. Right: agreement between k={sc['k']} disjoint splits "
                        f"(mean over {len(sc['seeds'])} seeds, bootstrap CI) and the exact chance IoU."}
            for ax in _axes(res)]
    return json_safe({
        "kind": "sweep", "title": f"Threshold sensitivity: {p.get('dataset')} on {p.get('model_id')}",
        "text": [
            f"Sensitivity of the commonality set of {p.get('dataset')} ({p.get('method')} scores of "
            f"{p.get('n_samples')} samples on {p.get('model_id')}) to the per-sample rule (sigma, top-k) and the "
            f"frequency threshold S, from the stored scores only. Each axis varies one knob; the others stay at "
            f"the run's values ({res.base_config['rule']}={rule_value(res.base_config)}, "
            f"min_freq={res.base_config['min_freq']}).",
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
        "figures": figs, "claims": claims(res), "config": res.config, "base_config": res.base_config,
        "provenance": p, "caploc_version": __version__,
    })


def plot_axis(res, axis: str, path: Path) -> Path:
    """Left: set size on all samples (symlog); right: split IoU / overlap with CI bands and the chance IoU."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator  # heavy: loaded only when drawing

    kinds = res.config["split"]["kinds"]
    pts = [q for q in res.points if q["axis"] == axis]
    xs = [q["min_freq"] if axis == "min_freq" else q["n_samples"] if axis == "n_samples" else q["rule_value"]
          for q in pts]
    fig, (a1, a2) = F.new_panels(2, (9.0, 3.9), left=0.7, right=0.15, bottom=1.0, top=0.5, wspace=0.75)
    with F.style():
        counts = [q["n_neurons"] for q in pts]
        a1.plot(xs, counts, "o-", color="tab:green", label="neurons")
        if max(counts) > 20:  # wide range: symlog (0 stays visible), plain tick labels
            a1.set_yscale("symlog", linthresh=1)
            a1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            a1.set_ylim(-0.3, 2.0 * max(counts))
        else:  # counts: integer ticks
            a1.yaxis.set_major_locator(MaxNLocator(integer=True))
            a1.set_ylim(-0.3, max(2, max(counts)) * 1.1)
        a1.set_xlabel(axis)
        a1.set_ylabel("neurons (all samples)")
        empty = [x for x, q in zip(xs, pts) if q["n_neurons"] == 0]
        if empty:
            a1.scatter(empty, [0] * len(empty), marker="v", color="red", zorder=3, label="empty set")
        for k, col in zip(kinds, ("tab:orange", "tab:purple")):
            ag = [q["agreement"].get(k) or {} for q in pts]
            for m, ls in (("iou", "-"), ("overlap", "--")):
                y = np.array([as_float(a.get(m)) for a in ag])
                lo = np.array([as_float(a.get(f"{m}_lo")) for a in ag])
                hi = np.array([as_float(a.get(f"{m}_hi")) for a in ag])
                a2.plot(xs, y, "o" + ls, color=col, ms=3, label=f"{k} split {m}")
                a2.fill_between(xs, lo, hi, color=col, alpha=0.12)
            a2.plot(xs, [as_float(a.get("chance_iou")) for a in ag], "x:", color="k",
                    label="chance IoU" if k == kinds[0] else None)
        a2.axhline(PAPER["split_iou"], color="grey", ls=":", lw=1, label=f"paper IoU {PAPER['split_iou']}")
        a2.set_ylim(-0.02, 1.02)
        a2.set_xlabel(axis)
        a2.set_ylabel("split agreement")
        if axis == "topk":
            a1.set_xscale("log")
            a2.set_xscale("log")
        a2.set_xlim(a1.get_xlim())
        handles, labels = [], []
        for ax in (a1, a2):  # one legend below both panels, outside the data
            h, lab = ax.get_legend_handles_labels()
            handles += h
            labels += lab
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
        fig.suptitle(f"{res.provenance.get('dataset')}: sweep over {axis}", fontsize=10)
    return F.save_figure(fig, path)


__all__ = ["claims", "report", "to_report", "plot_axis", "figure_name"]
