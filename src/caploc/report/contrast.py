"""``report.json`` of ``caploc contrast`` (a :class:`~caploc.stages.contrast.ContrastResult`) and the erase section
that ``caploc contrast --eval`` adds to it (table, claims and a grouped-bar figure drawn with the object API of
:mod:`caploc.report.figures`)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any  # the stage's result (not imported here: report modules sit below the stages)

import numpy as np

from .figures import _ctx, new_figure, save_figure

log = logging.getLogger(__name__)


def _fmt(v, nd=3):
    if v is None:
        return None
    if isinstance(v, float):
        return None if not math.isfinite(v) else round(v, nd)
    return v


def _pct(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.0f} %"


def contrast_report(res: Any) -> dict:
    """Text, the plain-vs-contrastive table, set sizes / store specificity / split IoU as claims, and the settings."""
    meta, cfg, lcfg, rows, names = res.meta, res.config, res.locate_config, res.table, res.ref_names
    cols = ["set", "neurons", "split IoU (mean ± sd)", "chance IoU", "target freq"] + [f"freq {k}" for k in names] + [
        "common on ≥1 ref", "common on all refs"]
    trows = []
    for r in rows:
        iou = None if r["split_iou"] is None else (f"{r['split_iou']:.3f} ± {r['split_iou_sd']:.3f}"
                                                   if math.isfinite(r["split_iou"]) else "nan")
        trows.append([r["set"], r["n_neurons"], iou, _fmt(r["chance_iou"], 5), _fmt(r["target_freq"])]
                     + [_fmt(r["ref_freq"].get(k)) for k in names] + [_fmt(r["common_elsewhere"]), _fmt(r["common_everywhere"])])
    plain, con = rows[0], rows[1]
    text = [
        f"Contrastive localization ({cfg.rule}) of {meta.get('dataset')} ({res.n_samples} samples, "
        f"{lcfg.attribution.method}, {lcfg.rule}={lcfg.rule_value}, min_freq={lcfg.min_freq}) against "
        f"{', '.join(names) or 'no references'}.",
        f"The plain commonality set has {plain['n_neurons']} neurons, of which "
        f"{_pct(plain['common_elsewhere'])} are also commonality neurons of at least one reference and "
        f"{_pct(plain['common_everywhere'])} of every reference; the {cfg.rule} set keeps {con['n_neurons']}.",
        "Specificity here is measured from selection frequencies only; erase effects on and off target are measured "
        "by `caploc intervene` (or `caploc contrast --eval`).",
    ]
    claims = {"contrast_set_size": {"value": con["n_neurons"]}, "plain_set_size": {"value": plain["n_neurons"]},
              "plain_common_elsewhere": {"value": plain["common_elsewhere"]}}
    if con["split_iou"] is not None:
        claims["contrast_split_iou"] = {"value": con["split_iou"], "chance": con["chance_iou"]}
        claims["plain_split_iou"] = {"value": plain["split_iou"], "chance": plain["chance_iou"]}
    return {
        "kind": "contrast", "title": f"Contrastive localization ({cfg.rule}): {meta.get('dataset')}",
        "text": text,
        "tables": [{"title": "Plain vs contrastive set", "columns": cols, "rows": trows,
                    "note": "freq = mean selection frequency of the set's neurons on each dataset; split IoU: random "
                            "2-splits of target and reference samples; chance IoU: random sets of the same per-layer sizes."}],
        "figures": [], "claims": claims,
        "config": {"contrast": cfg.to_dict(), "locate": lcfg.to_dict(), "references": dict(res.references),
                   "source_run": res.source_run},
    }


def add_erase_section(rep: dict, res: dict, names: list[str], target: str, n_random: int, out_dir: Path | str) -> dict:
    """``rep`` (a contrast ``report.json`` dict) with the erase table, the erase claims and the figure
    ``fig_erase_specificity.png`` (drawn into ``out_dir``) of :func:`caploc.stages.generic.erase_specificity` ``res``."""
    cols = ["set", "neurons"] + [f"ΔNLL {k} (random)" for k in names] + [f"z {k}" for k in names] + [
        "specificity (nats)", "SI (z)"]
    rows = []
    for sname, r in res["sets"].items():
        rows.append([sname, r["n_neurons"]]
                    + [f"{r['delta'][k]:+.4f} ({r['random_mean'][k]:+.4f} ± {r['random_sd'][k]:.4f})"
                       if math.isfinite(r["random_mean"][k]) else f"{r['delta'][k]:+.4f}" for k in names]
                    + [_fmt(r["z"][k], 2) for k in names] + [_fmt(r.get("specificity"), 4), _fmt(r.get("si"), 3)])
    rep["tables"].append({"title": f"Erase effects on and off target ({target} on target)", "columns": cols, "rows": rows,
                          "note": f"ΔNLL: mean target NLL (nats/token, per-sample mean then mean over samples) erased "
                                  f"minus untouched; random: mean ± sd over {n_random} layer-matched random sets; "
                                  "z = (ΔNLL - random mean) / random sd; specificity = excess on target minus the "
                                  "largest excess off target (nats/token; favours sets that hurt more overall); SI = "
                                  "(z_on - z_off) / (|z_on| + |z_off|) with the largest off-target z."})
    for sname, r in res["sets"].items():
        key = "plain" if sname == "plain" else "contrast"
        rep["claims"][f"{key}_erase_specificity"] = {"value": r.get("specificity")}
        rep["claims"][f"{key}_erase_si"] = {"value": r.get("si")}
    try:
        fig_erase_specificity(res, Path(out_dir) / "fig_erase_specificity.png")
        rep["figures"] = [f for f in rep.get("figures", []) if f.get("file") != "fig_erase_specificity.png"] + [{
            "title": "Erase effect beyond random, per dataset", "file": "fig_erase_specificity.png",
            "caption": f"ΔNLL(set erased) minus the mean ΔNLL of {n_random} layer-matched random sets, on the target "
                       f"({target}) and off-target datasets; error bars: sd of the random sets."}]
    except Exception as e:  # a figure must never lose the numbers
        log.warning("could not draw the erase-specificity figure: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
    return rep


def fig_erase_specificity(res: dict, path: Path | str) -> Path:
    """Grouped bars: excess ΔNLL (set minus random mean) per dataset for every set, random sd as error bars."""
    sets = list(res["sets"])
    dsn = list(next(iter(res["sets"].values()))["delta"]) if sets else []
    fig, ax = new_figure((max(4.0, 1.3 * len(dsn) + 1.5), 3.2))
    with _ctx():
        w = 0.8 / max(len(sets), 1)
        for j, sname in enumerate(sets):
            r = res["sets"][sname]
            x = np.arange(len(dsn)) + (j - (len(sets) - 1) / 2) * w
            y = [r["excess"][k] if math.isfinite(r["excess"][k]) else 0.0 for k in dsn]
            err = [r["random_sd"][k] if math.isfinite(r["random_sd"][k]) else 0.0 for k in dsn]
            ax.bar(x, y, w, yerr=err, capsize=2, label=f"{sname} ({r['n_neurons']})")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(np.arange(len(dsn)))
        ax.set_xticklabels([k + (" *" if k == res.get("target") else "") for k in dsn], fontsize=8)
        ax.set_ylabel("ΔNLL − random (nats/token)", fontsize=8)
        ax.legend(fontsize=7, frameon=False)
        ax.set_title("erase effect beyond random (* = target)", fontsize=9)
    return save_figure(fig, path)


__all__ = ["contrast_report", "add_erase_section", "fig_erase_specificity"]
