"""Report of ``caploc decouple``: the report.json dict (table, text, claims) and one figure per domain (object API
via :mod:`caploc.report.figures`). Input: a :class:`caploc.stages.decouple.DecoupleResult` and its summary."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .figures import bars_with_ci

log = logging.getLogger(__name__)

KINDS = ("commonality", "content", "random")


def _r(v, nd: int = 4):
    if isinstance(v, (float, np.floating)):
        return round(float(v), nd) if math.isfinite(v) else None
    return v


def build_report(res, s: dict, out_dir: Path | str | None = None) -> dict:
    """The report.json dict of a decoupling result (``s`` = ``res.summary()``); figures go into ``out_dir``."""
    rows, figs, claims, text = [], [], {}, []
    cfg = res.config
    sel = f"sigma={cfg['sigma']}" if cfg["rule"] == "sigma" else f"top-{cfg['topk']}"
    text.append(
        f"Decoupling on {res.meta.get('model_id', '?')}: per-sample neuron sets ({cfg['method']}, {sel} per sample), "
        f"{cfg['n_groups']} groups x {cfg['group_size']} samples per kind; within-group mean pairwise IoU, mean over "
        f"groups with 95% bootstrap CIs over groups (seed {cfg['seed']}, {cfg['n_boot']} resamples).")
    for dom, d in s.items():
        for kind in KINDS:
            v = d["iou"][kind]
            o = d["overlap"][kind]
            sh = d["sharing"].get(kind, {})
            rows.append([dom, kind, d["n_groups"].get(kind, 0), _r(v["mean"]), f"[{_r(v['ci'][0])}, {_r(v['ci'][1])}]",
                         _r(o["mean"]), _r(d["chance_iou"]), _r(sh.get("shared_by_all_mean")),
                         _r(sh.get("pairwise_content_jaccard"))])
        diff = d["iou"]["commonality_minus_content"]
        text.append(
            f"{dom}: commonality IoU {d['iou']['commonality']['mean']:.3f} vs content {d['iou']['content']['mean']:.3f} "
            f"vs random {d['iou']['random']['mean']:.3f} (chance for independent random sets of the same sizes "
            f"{d['chance_iou']:.4f}); commonality - content = {diff['mean']:.3f} [{diff['ci'][0]:.3f}, "
            f"{diff['ci'][1]:.3f}] -> follows commonality: {d['follows_commonality']}. Mean per-sample set size "
            f"{d['set_size_mean']:.1f} neurons.")
        pre = "" if dom == "gsm_symbolic" else "facts_"
        for kind in KINDS:
            v = d["iou"][kind]
            claims[f"{pre}decoupling_{kind}_iou"] = {"value": v["mean"], "ci": v["ci"], "chance": d["chance_iou"]}
        claims[f"{pre}follows_commonality"] = {
            "value": d["follows_commonality"], "commonality_minus_content": diff["mean"], "ci": diff["ci"],
            "criterion": "95% bootstrap CI of (commonality IoU - content IoU) above 0"}
        if out_dir is not None:
            figs.extend(domain_figure(Path(out_dir), dom, d))
    for dom, why in (res.meta.get("skipped_domains") or {}).items():
        text.append(f"{dom} was skipped: {why}.")
    if "facts" in s:
        text.append("facts: content groups share the answer (attribute) and commonality groups do not, so the "
                    "target tokens that the attribution objective scores favour content; same-subject groups "
                    "cannot be built (14 subjects occur in 2 relations, none in more).")
    if "gsm_symbolic" in s:
        sh = s["gsm_symbolic"]["sharing"]
        text.append(
            "gsm_symbolic content groups are searched in the generated pool (reasoning-gym cannot render a template "
            "with given values); measured content shared by all members: "
            + ", ".join(f"{k} {v['shared_by_all_mean']:.2f} items (pairwise Jaccard {v['pairwise_content_jaccard']:.2f})"
                        for k, v in sh.items()) + ".")
    return {
        "kind": "decouple", "title": "Decoupling: commonality vs content (paper §4)", "text": text,
        "tables": [{"title": "Within-group agreement of per-sample neuron sets",
                    "columns": ["domain", "groups", "n", "IoU", "95% CI", "overlap", "chance IoU",
                                "content items shared by all", "pairwise content Jaccard"], "rows": rows,
                    "note": "IoU/overlap: mean over groups of the mean pairwise value; chance: independent random "
                            "sets with the same per-layer sizes (exact expectation)."}],
        "figures": figs, "claims": claims,
    }

def domain_figure(out_dir: Path, dom: str, d: dict) -> list[dict]:
    """The within-group IoU bars of one domain (a figure entry list; empty when the figure cannot be drawn)."""
    try:
        name = f"fig_decouple_{dom}.png"
        bars_with_ci(list(KINDS), [d["iou"][k]["mean"] for k in KINDS], [d["iou"][k]["ci"][0] for k in KINDS],
                     [d["iou"][k]["ci"][1] for k in KINDS], out_dir / name, chance=d["chance_iou"],
                     title=f"{dom}: within-group IoU", ylabel="mean pairwise IoU")
        return [{"title": f"Decoupling ({dom})", "file": name,
                 "caption": "Within-group IoU of per-sample neuron sets for groups sharing the problem type "
                            "(commonality), sharing content across types, and random groups (95% bootstrap CI)."}]
    except Exception as e:
        log.warning("decoupling figure not written: %s", str(e).splitlines()[0])
        return []
