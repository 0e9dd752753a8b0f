"""Report of a cross-capability result: claims, ``report.json`` dict and the ``fig_crosscap.png`` heatmaps."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import __version__
from . import figures as F
from .fmt import as_float, fmt, fmt_ci, json_safe, num, rule_value

FIGURE = "fig_crosscap.png"


def _mean(v: np.ndarray) -> float | None:
    return num(np.nanmean(v)) if v.size and np.any(~np.isnan(v)) else None


def claims(res) -> dict:
    """Mean within-capability split IoU, mean between-capability IoU (with chance) and the same at equal sample counts."""
    diag = np.array([as_float(x) for x in np.diag(res.iou)])
    out = {"crosscap_within_iou_mean": {"value": _mean(diag), "per_capability": dict(zip(res.names, diag.tolist()))},
           "crosscap_between_iou_mean": {"value": _mean(res.offdiag(res.iou)),
                                         "chance": _mean(res.offdiag(res.chance_iou))}}
    if res.iou_matched is not None:
        out["crosscap_between_iou_matched_mean"] = {
            "value": _mean(res.offdiag(res.iou_matched)), "chance": _mean(res.offdiag(res.chance_iou_matched)),
            "note": "split sets on both sides (same sample count as the within-capability diagonal)"}
    return json_safe(out)


def to_report(res, out_dir: Path) -> dict:
    """Draw ``out_dir/fig_crosscap.png`` and return the ``report.json`` dict."""
    plot(res, Path(out_dir) / FIGURE)
    return report(res)


def report(res) -> dict:
    names, n = res.names, len(res.names)
    sh = res.shared_counts()
    size_rows = [[nm, res.sizes[i], fmt_ci(res.within[nm]["iou"]["mean"], res.within[nm]["iou"]["lo"],
                                           res.within[nm]["iou"]["hi"]),
                  fmt(res.within[nm]["iou"]["chance"], 5), sh["unique"][nm],
                  res.provenance[nm].get("dataset"), res.provenance[nm].get("n_samples"),
                  res.provenance[nm].get("method"), res.provenance[nm].get("run_dir")]
                 for i, nm in enumerate(names)]

    def mat_rows(M, C):
        return [[names[i]] + [f"{fmt(M[i, j])} ({fmt(C[i, j], 4)})" for j in range(n)] for i in range(n)]

    lc, cf = res.locate_config, res.config
    return json_safe({
        "kind": "crosscap", "title": "Cross-capability overlap of commonality neurons",
        "text": [
            f"Commonality neurons of {n} capabilities on {next(iter(res.provenance.values())).get('model_id')}, "
            f"all relocalized from stored scores with the same rule ({lc['rule']}={rule_value(lc)}, "
            f"min_freq={lc['min_freq']}).",
            "Off-diagonal: agreement between the full-data sets of two capabilities; IoU is symmetric, the overlap "
            "rate |A_row ∩ A_col| / |A_row| is normalised by the ROW capability. Diagonal: within-capability "
            f"agreement between k={cf['k']} random disjoint splits (mean over {len(cf['seeds'])} "
            "seeds; for the overlap rate the mean of both orders). In parentheses: exact chance level for random "
            "sets with the same per-layer sizes (for the diagonal: of the split sets). The diagonal's sets use "
            f"1/{cf['k']} of the samples, the off-diagonal full sets all of them; the 'equal sample "
            "counts' table compares split sets on both sides.",
            f"{sh['shared_by_all']} neurons are in every capability's set (generic candidates).",
        ] + res.notes,
        "tables": [
            {"title": "Capabilities", "columns": ["capability", "neurons", "within split IoU [CI]", "chance IoU",
                                                  "neurons in no other set", "dataset", "samples", "method", "run"],
             "rows": size_rows},
            {"title": "IoU (chance)", "columns": [""] + names, "rows": mat_rows(res.iou, res.chance_iou)},
            {"title": "Overlap rate |A_row ∩ A_col| / |A_row| (chance)", "columns": [""] + names,
             "rows": mat_rows(res.overlap_rate, res.chance_overlap_rate)},
            *([{"title": "IoU at equal sample counts: split sets of both capabilities (chance)",
                "columns": [""] + names, "rows": mat_rows(res.iou_matched, res.chance_iou_matched),
                "note": "Off-diagonal: mean IoU between a split set of the row capability and a split set of the "
                        "column capability (all split-part pairs, all seeds), so both sides use as many samples "
                        "as the diagonal's split sets."}] if res.iou_matched is not None else []),
            {"title": "|A_row ∩ A_col|", "columns": [""] + names,
             "rows": [[names[i]] + [int(x) for x in res.intersection[i]] for i in range(n)]},
        ],
        "figures": [{"title": "Cross-capability heatmap", "file": FIGURE,
                     "caption": "IoU and row-normalised overlap rate; diagonal = within-capability split agreement; "
                                "cell text: observed (chance)."}],
        "claims": claims(res), "config": cf, "locate_config": lc, "provenance": res.provenance,
        "caploc_version": __version__,
    })


def plot(res, path: Path) -> Path:
    """IoU and row-normalised overlap heatmaps side by side; cell text: observed (chance)."""
    names, n = res.names, len(res.names)
    lab = max((len(x) for x in names), default=1)
    left, bottom = 0.3 + 0.062 * lab, 0.4 + 0.045 * lab
    pw = 0.8 * n + 0.7
    cbar = 0.85  # colour bar (0.12 in), its gap and tick labels, between a panel and the next panel's labels
    fig, axes = F.new_panels(2, (2 * (left + pw + cbar) + 0.1, bottom + 0.55 * n + 0.9), left=left, right=cbar + 0.1,
                             bottom=bottom, top=0.9, wspace=left + cbar)
    with F.style():
        for ax, M, C, title in ((axes[0], res.iou, res.chance_iou, "IoU"),
                                (axes[1], res.overlap_rate, res.chance_overlap_rate, "overlap rate (row-normalised)")):
            Mf = np.array([[as_float(x) for x in r] for r in M])
            im = ax.imshow(np.nan_to_num(Mf, nan=0.0), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{fmt(Mf[i, j], 2)}\n(ch {fmt(as_float(C[i, j]), 4)})", ha="center",
                            va="center", fontsize=7, color="w" if (math.isnan(Mf[i, j]) or Mf[i, j] < 0.6) else "k")
            ax.set_xticks(range(n), names, rotation=40, ha="right", fontsize=8)
            ax.set_yticks(range(n), names, fontsize=8)
            ax.set_title(title, fontsize=9)
            x0, y0, w, h = ax.get_position().bounds
            fw = fig.get_figwidth()
            fig.colorbar(im, cax=fig.add_axes((x0 + w + 0.1 / fw, y0, 0.12 / fw, h)))
        cm = res.offdiag(np.array([[as_float(x) for x in r] for r in res.chance_iou]))
        fig.suptitle("cross-capability agreement; diagonal = within-capability split agreement"
                     + (f"\nmean chance IoU off-diagonal {np.nanmean(cm):.1e}" if cm.size and np.any(~np.isnan(cm))
                        else ""), fontsize=10)
    return F.save_figure(fig, path)


__all__ = ["claims", "report", "to_report", "plot"]
