"""Report of a split-stability result: claims, ``report.json`` dict and the ``fig_stability.png`` figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import __version__
from ..localize import min_count
from . import figures as F
from .fmt import ci, json_safe, rnd, rule_value

PAPER = {"split_overlap": 0.9642, "split_iou": 0.9595}  # Huang et al. 2025, GSM8K splits
FIGURE = "fig_stability.png"


def claims(res) -> dict:
    """Headline numbers: split overlap / IoU (with CI, chance and the paper's value), chance IoU, share of params."""
    hk = res.headline_kind()
    out = {}
    if hk is not None:
        s = res.summary[hk]
        for key, m in (("split_overlap", "overlap"), ("split_iou", "iou")):
            out[key] = {"value": s[m]["mean"], "ci": [s[m]["lo"], s[m]["hi"]], "chance": s[m]["chance"],
                        "paper": PAPER[key], "split_kind": hk, "k": res.config["k"],
                        "n_seeds": s["n_seeds"], "ci_unit": s["ci_unit"]}
        out["chance_iou"] = {"value": s["iou"]["chance"], "mc": s["iou"].get("chance_mc"),
                             "mc_q95": s["iou"].get("chance_mc_q95"), "split_kind": hk}
        for kind, s2 in res.summary.items():
            if kind != hk:
                for key, m in (("split_overlap", "overlap"), ("split_iou", "iou")):
                    out[f"{key}_{kind}"] = {"value": s2[m]["mean"], "ci": [s2[m]["lo"], s2[m]["hi"]],
                                            "chance": s2[m]["chance"], "split_kind": kind}
    out["share_of_params"] = {"value": res.full_set.share_of_params(), "n_neurons": len(res.full_set),
                              "share_of_neurons": res.full_set.share_of_neurons(),
                              "n_samples": res.full_set.n_samples}
    return json_safe(out)


def to_report(res, out_dir: Path) -> dict:
    """Draw ``out_dir/fig_stability.png`` and return the ``report.json`` dict."""
    plot(res, Path(out_dir) / FIGURE)
    return report(res)


def report(res) -> dict:
    p, lc = res.provenance, res.locate_config
    rule_txt = f"{lc['rule']}={rule_value(lc)}, min_freq={lc['min_freq']}"
    rows = []
    for kind, s in res.summary.items():
        rows.append([kind, res.config["k"], s["n_seeds"], s["n_pairs"], round(s["samples_per_split"], 1),
                     round(s["size_mean"], 1), rnd(s["overlap"]["mean"]), ci(s["overlap"]["lo"], s["overlap"]["hi"]),
                     rnd(s["overlap_ab"]["mean"]), rnd(s["overlap_ba"]["mean"]), rnd(s["overlap_min"]["mean"]),
                     rnd(s["iou"]["mean"]), ci(s["iou"]["lo"], s["iou"]["hi"]), rnd(s["dice"]["mean"]),
                     rnd(s["overlap"]["chance"], 6), rnd(s["iou"]["chance"], 6), rnd(s["iou"].get("chance_mc"), 6),
                     rnd(s["iou"].get("chance_mc_sd"), 6), s["n_empty_pairs"], s["ci_unit"]])
    pair_rows = [[r["kind"], r["seed"], f"{r['a']}-{r['b']}", r["n_samples_a"], r["n_samples_b"], r["size_a"],
                  r["size_b"], r["intersection"], rnd(r["overlap_ab"]), rnd(r["overlap_ba"]), rnd(r["iou"]),
                  rnd(r["chance_iou"], 6)] for r in res.pairs]
    fs = res.full_set
    text = [
        f"Stability of the commonality neurons of {p.get('dataset')} on {p.get('model_id')} "
        f"({p.get('method')} scores of {p.get('n_samples')} samples, rule {rule_txt}), relocalized from the stored "
        f"per-sample scores on k={res.config['k']} disjoint splits for {len(res.config['seeds'])} seeds.",
        "Overlap = mean of |A∩B|/|A| and |A∩B|/|B| (the paper's overlap rate is |A∩B|/|A|, asymmetric; both "
        "directions are listed, A = the lower-numbered split); overlap_min = |A∩B|/min(|A|,|B|); "
        "IoU = |A∩B|/|A∪B|; Dice = 2|A∩B|/(|A|+|B|). min_freq is applied per split (a fraction of the split's samples).",
        f"CIs: {int(100 * res.config['level'])}% percentile bootstrap ({res.config['n_boot']} resamples). Pairs "
        "of one seed share samples, so with >= 3 seeds the per-seed mean is resampled (unit 'seed'); with fewer, "
        "pairs are resampled. All seeds re-split the same samples: the CI covers split-to-split variation only.",
        "Chance = two independent uniformly random sets with the same per-layer sizes as the two split sets "
        "(exact hypergeometric expectation; Monte Carlo mean ± sd when computed). It is a weak null.",
        f"The full-data set ({fs.n_samples} samples) has {len(fs)} neurons "
        f"({100 * fs.share_of_neurons():.4f}% of MLP neurons"
        + (f", {100 * fs.share_of_params():.5f}% of parameters)." if fs.share_of_params() is not None else ")."),
        f"Paper (GSM8K, Huang et al. 2025): overlap 96.42%, IoU 95.95%. Groups: {res.groups_note or 'n/a'}.",
    ]
    for kind, why in res.kinds_skipped.items():
        text.append(f"Split kind '{kind}' skipped: {why}.")
    return json_safe({
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
        "figures": [{"title": "Split agreement vs chance", "file": FIGURE,
                     "caption": "Mean overlap and IoU per split kind with bootstrap CI; dots = per-seed values; "
                                "crosses = chance level (random sets with the same per-layer sizes)."}],
        "claims": claims(res),
        "config": res.config, "locate_config": lc, "provenance": p, "caploc_version": __version__,
    })


def plot(res, path: Path) -> Path:
    """Mean overlap and IoU per split kind with CI, per-unit dots, chance crosses and the paper's values."""
    kinds = list(res.summary)
    legend_w = 2.3  # the legend sits right of the axes, outside the data
    fig, ax = F.new_figure((1.8 + 2.2 * max(1, len(kinds)) + legend_w, 3.6), left=0.7, right=0.15 + legend_w,
                           bottom=0.6, top=0.35)
    colors = {"overlap": "tab:blue", "iou": "tab:orange"}
    with F.style():
        for xi, kind in enumerate(kinds):
            s = res.summary[kind]
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
        ax.set_xticks(range(len(kinds)), [f"{k}\n(k={res.config['k']})" for k in kinds])
        ax.set_xlim(-0.6, max(1, len(kinds)) - 0.4)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("agreement between disjoint splits")
        ax.set_title(f"{res.provenance.get('dataset')}: split stability", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)
    return F.save_figure(fig, path)


__all__ = ["PAPER", "claims", "report", "to_report", "plot"]
