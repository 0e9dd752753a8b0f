"""Reports for ``caploc fidelity`` (scorer agreement table + claim rows) and ``caploc stability-gap`` (split IoU vs
sample count per scorer / rule / thresholds: one figure and a table)."""
from __future__ import annotations

from pathlib import Path

from ..results import atomic_write_json
from .figures import _ctx, save_figure


def _r(x, nd=3):
    return None if x is None else round(float(x), nd)


def fidelity_rows(res: dict) -> list[list]:
    rows = []
    for name, c in res["comparisons"].items():
        s, sl = c["sigma"], c["sigma_layer"]
        rows.append([name, res["reference"], c["n_samples"], _r(c["spearman"]), _r(s["sample_jaccard"]),
                     _r(c["topk"]["sample_jaccard"]), _r(s["common_iou"]), s["common_size_ref"],
                     s["common_size_other"], _r(s["common_ref_top_layer_share"]), _r(sl["sample_jaccard"]),
                     _r(sl["common_iou"]), sl["common_size_ref"], sl["common_size_other"]])
    return rows


FIDELITY_COLUMNS = ["scorer", "reference", "samples", "Spearman (per sample)", "σ-set Jaccard (per sample)",
                    "top-k Jaccard (per sample)", "commonality IoU (σ pooled)", "|ref set|", "|scorer set|",
                    "ref set: share in its top layer", "σ_layer-set Jaccard", "commonality IoU (σ per layer)",
                    "|ref set| (per layer)", "|scorer set| (per layer)"]


def write_fidelity_report(res: dict, out_dir: Path | str) -> Path:
    out_dir = Path(out_dir)
    claims = {}
    for name, c in res["comparisons"].items():
        claims[f"spearman[{name} vs {res['reference']}]"] = {"value": _r(c["spearman"])}
        claims[f"sigma_set_jaccard[{name} vs {res['reference']}]"] = {"value": _r(c["sigma"]["sample_jaccard"])}
        claims[f"commonality_iou[{name} vs {res['reference']}]"] = {"value": _r(c["sigma"]["common_iou"])}
        claims[f"commonality_iou_layer[{name} vs {res['reference']}]"] = {"value": _r(c["sigma_layer"]["common_iou"])}
    partial = [n for n, ok in res["complete"].items() if not ok]
    text = [f"{res['n_samples']} samples scored by every run (reference: {res['reference']}); σ = {res['sigma']:g}, "
            f"S = {res['min_freq']:g}, top-k k = {res['topk']}."
            + (f" Runs still incomplete (finished shards only): {', '.join(partial)}." if partial else ""),
            "Attribution settings: " + "; ".join(f"{n}: {a}" for n, a in res["attribution"].items())]
    rep = {"kind": "fidelity", "title": "Scorer fidelity", "text": text,
           "tables": [{"title": "Agreement with the reference scorer", "columns": FIDELITY_COLUMNS,
                       "rows": fidelity_rows(res),
                       "note": "Per-sample values are means over samples; Jaccard = |A∩B|/|A∪B| of the two scorers' "
                               "sets on the same sample; commonality sets use S over the common samples."}],
           "figures": [], "claims": claims}
    atomic_write_json(out_dir / "report.json", rep)
    return out_dir / "report.json"


def stability_figure(rows: list[dict], path: Path | str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys((r["run"], r["rule"], r["sigma"], r["min_freq"]) for r in rows))
    with _ctx():
        fig = Figure(figsize=(7.0, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for c, key in enumerate(keys):
            rs = sorted((r for r in rows if (r["run"], r["rule"], r["sigma"], r["min_freq"]) == key),
                        key=lambda r: r["n_samples"])
            xs = [r["n_samples"] for r in rs if r["iou"] is not None]
            ys = [r["iou"] for r in rs if r["iou"] is not None]
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=f"C{c % 10}",
                        ls="-" if key[1] == "sigma" else "--", label=f"{key[0]} {key[1]} σ={key[2]:g} S={key[3]:g}")
        ax.axhline(0.96, color="#666666", ls=":", lw=1, label="paper split IoU 0.96")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("samples localized (split into 2 halves)")
        ax.set_ylabel("split IoU (mean over seeds)")
        ax.set_ylim(0, 1)
        ax.legend(frameon=False, fontsize=6, ncol=2)
        fig.subplots_adjust(left=0.1, right=0.98, bottom=0.12, top=0.95)
    return save_figure(fig, path)


def write_stability_report(res: dict, out_dir: Path | str) -> Path:
    out_dir = Path(out_dir)
    rows = res["rows"]
    fig = stability_figure(rows, out_dir / "stability_gap.png")
    table = [[r["run"], r["method"], r["rule"], r["sigma"], r["min_freq"], r["n_samples"], _r(r["iou"]),
              _r(r["iou_lo"]), _r(r["iou_hi"]), _r(r["iou_chance"], 5), _r(r["size_mean"], 1), r["n_empty_pairs"]]
             for r in rows]
    rep = {"kind": "stability_gap", "title": "The stability gap: split IoU vs samples, scorer and thresholds",
           "text": ["Random halves of the first n stored samples, 5 split seeds; IoU of the two halves' commonality "
                    "sets (S is a fraction of each half); CI: bootstrap over seeds; chance: exact hypergeometric for "
                    "random sets with the same per-layer sizes."],
           "tables": [{"title": "Split IoU", "columns": ["run", "scorer", "rule", "σ", "S", "samples", "IoU", "lo",
                                                          "hi", "chance", "mean set size", "empty pairs"],
                       "rows": table}],
           "figures": [{"title": "Split IoU vs sample count", "file": fig.name,
                        "caption": "Solid: pooled σ rule; dashed: σ per layer. Dotted: the paper's split IoU."}],
           "claims": {}}
    atomic_write_json(out_dir / "report.json", rep)
    return out_dir / "report.json"
