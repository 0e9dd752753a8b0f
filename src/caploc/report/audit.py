"""Report of the individual-knowledge audit (``caploc audit``) and of its knowledge-circuit part: report.json dicts
(tables, claims, figure entries) and the PNG figures, drawn with matplotlib's object API (Figure + its own canvas).

Inputs are the stage's result objects (:class:`caploc.stages.audit.result.AuditResult`,
:class:`caploc.stages.audit.circuit_result.CircuitAudit`) and their summaries; nothing here imports the stage.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ..results import atomic_write_json
from ..stats import per_layer_counts
from .figures import bars_with_ci, save_figure

log = logging.getLogger(__name__)


def strict_json(o):
    """nan/inf -> None (and numpy scalars -> Python) so the JSON is strict."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [strict_json(v) for v in o]
    if isinstance(o, (np.floating,)):
        return strict_json(float(o))
    if isinstance(o, (np.integer,)):
        return int(o)
    return o


# ---------------------------------------------------------------------------------------------------------------------
# the audit report
# ---------------------------------------------------------------------------------------------------------------------
def _fmt(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}" if abs(x) >= 10 ** (-nd) or x == 0 else f"{x:.2e}"


def _ci(m: dict | None, nd=3) -> str:
    if not m or m.get("n", 0) == 0:
        return "n/a"
    lo, hi = m["ci"]
    return f"{_fmt(m['mean'], nd)} [{_fmt(lo, nd)}, {_fmt(hi, nd)}]"


def _fidelity_rows(s: dict, L: int) -> list[tuple[str, str, dict]]:
    rows = []
    if "kn" in s:
        rows.append(("KN", "per-phrasing knowledge neurons (Attr > t*max)", s["kn"]["fidelity"]))
    if "cnl" in s:
        rows.append(("CNL per phrasing", "per-phrasing sigma-rule neurons", s["cnl"]["fidelity"]))
    tr = s.get("tracing", {})
    if "mlp" in tr:
        rows.append(("causal tracing", "MLP of the peak layer (last subject token)", tr["mlp"]))
    if "circuits" in s:
        rows.append(("knowledge circuits", "circuit parameters (parameter-weighted)", s["circuits"]["fidelity"]))
    return rows


def localizable_claim(s: dict, criterion: float) -> dict:
    """facts_localizable: true iff some method's paraphrase IoU CI lower bound is >= ``criterion`` AND above the upper
    CI bound of its same-template other-fact control (the unrelated-fact control when there is none)."""
    text = (f"a method localizes individual facts if the 95% CI lower bound of its paraphrase IoU (common metric) is "
            f">= {criterion} and exceeds the upper CI bound of the same-template/other-fact control "
            f"(unrelated-fact control if no same-template pairs)")
    best, value, any_data = None, False, False
    for name, _unit, fid in _fidelity_rows(s, 0):
        sf = fid["same_fact"]
        if sf["n"] == 0:
            continue
        any_data = True
        ctrl = fid["same_template"] if fid["same_template"]["n"] else fid["unrelated"]
        ok = sf["ci"][0] >= criterion and (ctrl["n"] == 0 or sf["ci"][0] > ctrl["ci"][1])
        value = value or ok
        if best is None or sf["mean"] > best["iou"]:
            best = {"method": name, "iou": sf["mean"], "ci": sf["ci"]}
    return {"value": bool(value) if any_data else None, "criterion": text, "best_method": best}


def build_report(res, summary: dict | None = None) -> dict:
    """The report.json dict of an audit result (``summary``: its summary, default ``res.summary``)."""
    s = summary if summary is not None else res.summary
    cfg = res.config
    L = int(res.model["n_layers"])
    sel = res.selection
    kn_cfg = cfg["kn"]
    tables, claims, text = [], {}, []
    text.append(
        f"Individual-knowledge audit (Huang et al. 2025 §3) of {res.model.get('model_id')} on {s['n_facts']} facts "
        f"({s['n_phrasings']} phrasings, {s['phrasings_per_fact']:.1f} per fact), seed {cfg['seed']}. "
        f"Known filter: {sel['known_filter']['mode']} (threshold {sel['known_filter']['threshold']}, "
        f"top-k {sel['known_filter']['topk']}, on {sel['known_filter']['on']}): {sel['n_known_scanned']} of "
        f"{sel['n_scanned']} scanned facts known; {sel['n_kept']} kept. Mean P(target) on the original prompt "
        f"{_fmt(s['p_target_prompt_mean'])}, on the paraphrases {_fmt(s['p_target_paraphrases_mean'])} "
        f"(target top-1 on {_fmt(100 * s['top1_paraphrases_rate'], 1)}% of paraphrases).")
    text.append(
        "Fidelity = IoU of the localized parameter sets between paraphrases of the same fact (all pairs; per-fact mean; "
        "95% percentile bootstrap over facts). Controls: 'same template, other fact' pairs a phrasing with the SAME "
        "wording filled with another subject of the same relation (if the sets follow the wording rather than the "
        "fact, this is as high as the paraphrase IoU); 'unrelated fact' = a fact of another relation; 'random' = "
        "independent random sets of the same per-layer sizes (exact expectation; 1/L for a layer).")
    if "kn" in s:
        text.append(
            f"KN: IG with m={kn_cfg['steps']} steps ({kn_cfg['alphas']} points) of P(first target token) at the last "
            f"prompt position; coarse neurons Attr > {kn_cfg['t']}*max; refined = neurons in a share of phrasings "
            f"{'>' if kn_cfg['share_rule'] == 'gt' else '>='} p={kn_cfg['p']}; suppress = x0, enhance = "
            f"x{kn_cfg['enhance']} at {kn_cfg['positions']} position(s); effect = mean relative change of P(target) "
            f"over the fact's phrasings; random = layer-matched random sets disjoint from the set, {cfg['n_random']} "
            "seeds per fact.")
    if "tracing" in s:
        tc = cfg["tracing"]
        text.append(
            f"Causal tracing: subject embeddings + Gaussian noise (sd = {tc['noise_mult']} x sd of the embedding "
            f"entries = {_fmt(s.get('tracing_noise_sd'), 4)}), {tc['n_noise']} noise samples, restoring one "
            f"state (kinds {', '.join(tc['kinds'])}; window {tc['window']}) at the subject tokens and the last token. "
            "Peak MLP layer = argmax over layers of the MLP indirect effect at the last subject token (ROME's site). "
            "Reliability = cross-paraphrase restoration recovery: restoring the MLP at the layer traced on phrasing i, "
            "on paraphrase j, as a share of j's best single-layer MLP restoration, vs the mean share over all layers "
            "(a random layer). This is restoration, not a ROME edit.")

    # fidelity table
    rows = []
    for name, unit, fid in _fidelity_rows(s, L):
        sf = fid["same_fact"]
        rows.append([name, unit, _ci(sf), _ci(fid["same_template"]), _ci(fid["unrelated"]),
                     _fmt(fid["random"]["mean"]) if fid.get("random") else "n/a", f"{sf['n']} ({fid['n_pairs']})"])
    tables.append({"title": "Fidelity: IoU of localized parameter sets between paraphrases of one fact",
                   "columns": ["method", "localized parameters", "paraphrase IoU [95% CI]",
                               "same template, other fact", "unrelated fact", "random (same sizes)",
                               "facts (pairs)"], "rows": rows,
                   "note": "tracing: IoU of single-MLP parameter sets = 1 for the same layer, else 0 (all MLPs have "
                           "equal size), i.e. the same-peak-layer rate; random = 1/L."})
    # reliability table
    rows = []
    for m, label in (("kn", "KN"), ("cnl", "CNL per phrasing")):
        if m not in s:
            continue
        rel = s[m]["reliability"]
        for name in ("suppress", "enhance"):
            r = rel[name]
            fac = "x0" if name == "suppress" else f"x{kn_cfg['enhance']}"
            rows.append([label, f"{name} ({fac}) refined set, on the fact's phrasings", _ci(r["refined"]),
                         _ci(r["random"]), ", ".join(_fmt(v) for v in r["random_per_seed"]),
                         r["refined"]["n"], f"median P ratio {_fmt(r['refined_median_ratio']['mean'])}; "
                                            f"{rel['n_empty_refined']} facts with an empty refined set"])
            rows.append([label, f"{name} a phrasing's own set, on that phrasing", _ci(r["own_on_own"]),
                         _ci(r["own_random"]), "", r["own_on_own"]["n"], ""])
            rows.append([label, f"{name} a phrasing's own set, on its paraphrases", _ci(r["own_on_other_phrasings"]),
                         "", "", r["own_on_other_phrasings"]["n"], "transfer across paraphrases"])
            rows.append([label, f"{name} refined set, on an unrelated fact", _ci(r["off_target"]), "", "",
                         r["off_target"]["n"], "specificity (0 = no effect)"])
    tr = s.get("tracing", {})
    if "restoration_transfer" in tr:
        rt = tr["restoration_transfer"]
        rows.append(["causal tracing", "restore MLP at the layer traced on a paraphrase (share of best layer)",
                     _ci(rt["share_of_best"]), _ci(rt["random_layer_share"]), "", rt["share_of_best"]["n"],
                     f"normalized recovery {_ci(rt['normalized_recovery'])}; layer percentile "
                     f"{_ci(rt['layer_percentile'])}"])
    their = (res.circuits.get("their_summary") or {}).get("reliability") if isinstance(res.circuits, dict) else None
    if isinstance(their, dict) and "circuit" in their:
        c_, r_ = their["circuit"], their.get("random", {})
        rows.append(["knowledge circuits", "circuit-only run (all other heads/MLPs mean-ablated): P_circuit / P_full",
                     f"{_fmt(c_.get('mean_ratio'))} [{_fmt(c_['ci'][0])}, {_fmt(c_['ci'][1])}]",
                     f"{_fmt(r_.get('mean_ratio'))} [{_fmt(r_.get('ci', [None, None])[0])}, "
                     f"{_fmt(r_.get('ci', [None, None])[1])}]" if r_ else "n/a", "", their.get("n_phrasings"),
                     "from the circuit audit (per phrasing, random = node sets of the same size)"])
    tables.append({"title": "Reliability: does the method's own manipulation change the fact as promised?",
                   "columns": ["method", "manipulation", "effect [95% CI]", "random control [95% CI]",
                               "random, per seed", "facts", "note"], "rows": rows,
                   "note": "KN/CNL effect = mean over phrasings of (P_after - P_before) / P_before, averaged over "
                           "facts; random = layer-matched random neurons (same count per layer)."})
    if tr:
        rows = []
        for kind in ("mlp", "hidden", "attn"):
            if kind not in tr:
                continue
            f = tr[kind]
            rows.append([kind, _ci(f["same_fact"]), _fmt(1.0 / L), _fmt(f["same_layer_chance_marginal"]),
                         _ci(f["same_template"]), _ci(f["abs_layer_diff"], 2), _fmt(f["abs_layer_diff_uniform"], 2)])
        op = tr["overall_peak"]
        rows.append(["overall peak (kind, layer, token class)", _ci(op["same_fact"]), "", "",
                     _ci(op["same_template"]), "", ""])
        tables.append({"title": "Causal tracing: same peak layer across paraphrases",
                       "columns": ["state", "same peak layer [95% CI]", "chance (uniform layer)",
                                   "chance (pooled peak histogram)", "same template, other fact",
                                   "mean |delta layer|", "uniform |delta layer|"], "rows": rows,
                       "note": f"mlp/hidden at the last subject token, attn at the last token. P(target) clean "
                               f"{_fmt(tr['p_clean_mean'])}, corrupted {_fmt(tr['p_corrupt_mean'])}; "
                               f"{tr['n_corruption_ineffective']} of {tr['n_phrasings']} phrasings lose < 10% of "
                               f"P under corruption. Overall peak classes: {op.get('counts')}."})
    rows = []
    for m in ("kn", "cnl"):
        if m in s:
            f = s[m]["fidelity"]
            rows.append([m, _fmt(f["set_size"]["mean"], 1), _fmt(f["set_size"]["median"], 1), f["set_size"]["n_empty"],
                         _fmt(f["refined_size"]["mean"], 1), f["refined_size"]["n_empty"]])
    if rows:
        tables.append({"title": "Neuron set sizes", "columns": ["method", "per-phrasing mean", "median",
                                                                 "empty phrasing sets", "refined mean",
                                                                 "empty refined sets"], "rows": rows})
    tables.append({"title": "Fact selection", "columns": list(k for k in sel if k != "known_filter"),
                   "rows": [[sel[k] if not isinstance(sel[k], float) else round(sel[k], 4)
                             for k in sel if k != "known_filter"]]})
    if res.circuits.get("status") not in (None, "ran"):
        text.append(f"Circuits: {res.circuits.get('status')} — {res.circuits.get('note', '')}")

    # claims
    claims["facts_localizable"] = localizable_claim(s, float(cfg["fidelity_criterion"]))
    if "kn" in s:
        f = s["kn"]["fidelity"]
        claims["kn_paraphrase_iou"] = {"value": f["same_fact"]["mean"], "ci": f["same_fact"]["ci"],
                                       "chance": f["random"]["mean"], "same_template": f["same_template"]["mean"],
                                       "unrelated": f["unrelated"]["mean"], "n_facts": f["same_fact"]["n"]}
        for name in ("suppress", "enhance"):
            r = s["kn"]["reliability"][name]
            claims[f"kn_{name}_rel_change"] = {"value": r["refined"]["mean"], "ci": r["refined"]["ci"],
                                               "chance": r["random"]["mean"]}
    if "cnl" in s:
        f = s["cnl"]["fidelity"]
        claims["cnl_paraphrase_iou"] = {"value": f["same_fact"]["mean"], "ci": f["same_fact"]["ci"],
                                        "chance": f["random"]["mean"]}
    if "mlp" in tr:
        f = tr["mlp"]
        claims["tracing_same_layer"] = {"value": f["same_fact"]["mean"], "ci": f["same_fact"]["ci"],
                                        "chance": 1.0 / L, "chance_marginal": f["same_layer_chance_marginal"],
                                        "same_template": f["same_template"]["mean"]}
    if "restoration_transfer" in tr:
        rt = tr["restoration_transfer"]
        claims["tracing_restoration_transfer"] = {"value": rt["share_of_best"]["mean"],
                                                  "ci": rt["share_of_best"]["ci"],
                                                  "chance": rt["random_layer_share"]["mean"]}
    if "circuits" in s:
        f = s["circuits"]["fidelity"]
        claims["circuits_paraphrase_iou"] = {"value": f["same_fact"]["mean"], "ci": f["same_fact"]["ci"],
                                             "chance": f["random"]["mean"] if f.get("random") else None}
    fl = claims["facts_localizable"]
    text.append(f"Claim facts_localizable = {fl['value']} (criterion: {fl['criterion']}).")
    figures = [
        {"title": "Knowledge neurons of one fact, per phrasing", "file": "fig_kn_layers.png",
         "caption": "Per-layer counts of the KN neurons found on each phrasing of the same fact (small multiples)."},
        {"title": "Peak layers of causal tracing", "file": "fig_tracing_peaks.png",
         "caption": "Histogram over all facts and phrasings of the peak layer per state kind."},
        {"title": "Peak-layer distance between paraphrases", "file": "fig_tracing_layer_diff.png",
         "caption": "Distribution of |delta peak MLP layer| over paraphrase pairs of the same fact vs two independent "
                    "uniform layers."},
        {"title": "Paraphrase IoU by method", "file": "fig_iou.png",
         "caption": "Common-metric IoU between paraphrases vs the same-template/other-fact, unrelated-fact and "
                    "random controls (95% CI)."},
        {"title": "Mean normalized indirect effect", "file": "fig_tracing_ie.png",
         "caption": "Causal-tracing indirect effect over layers, by state kind and token class, averaged over phrasings."},
    ]
    return {"kind": "audit", "title": f"Individual-knowledge audit of {res.model.get('model_id')}", "text": text,
            "tables": tables, "figures": figures, "claims": claims}




def _grid(nrows: int, ncols: int, figsize, **kw):
    """A figure with a grid of axes (object API: a Figure with its own Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    save_figure(fig, path)


def audit_figures(res, s: dict, out_dir: Path) -> list[str]:
    """Write the audit's PNG figures into ``out_dir``; returns the file names written."""
    L = int(res.model["n_layers"])
    d = int(res.model["d_mlp"])
    made = []
    # 1. KN per-layer distribution of one fact's neurons per phrasing
    if "kn" in s:
        recs = res.records
        idx = max(range(len(recs)), key=lambda i: (sum(1 for x in recs[i]["kn"]["sets"] if x), recs[i]["n_phrasings"]))
        sets = recs[idx]["kn"]["sets"]
        phr = res.facts[idx].phrasings
        n = len(sets)
        fig, axes = _grid(n, 1, (7, 1.3 * n + 0.6), sharex=True)
        for j, (ax, st) in enumerate(zip(axes[:, 0], sets)):
            c = per_layer_counts(np.asarray(st, np.int64), L, d)
            ax.bar(range(L), c, color="C0" if j == 0 else "C1")
            ax.set_ylabel("n", fontsize=7)
            ax.set_title(f"{phr[j]!r} → {res.facts[idx].target!r}: {len(st)} neurons", fontsize=7, loc="left")
            ax.tick_params(labelsize=6)
        axes[-1, 0].set_xlabel("layer")
        _save(fig, out_dir / "fig_kn_layers.png")
        made.append("fig_kn_layers.png")
    tr = s.get("tracing", {})
    kinds = [k for k in ("mlp", "hidden", "attn") if k in tr]
    if kinds:
        fig, axes = _grid(1, len(kinds), (4 * len(kinds), 3))
        for ax, k in zip(axes[0], kinds):
            ax.bar(range(L), tr[k]["peak_hist"], color={"mlp": "C2", "hidden": "C0", "attn": "C3"}[k])
            ax.set_title(f"{k} peak layer ({'last token' if k == 'attn' else 'last subject token'})", fontsize=8)
            ax.set_xlabel("layer")
        axes[0, 0].set_ylabel("phrasings")
        _save(fig, out_dir / "fig_tracing_peaks.png")
        made.append("fig_tracing_peaks.png")
        if "mlp" in tr and sum(tr["mlp"]["abs_layer_diff_hist"]):
            h = np.asarray(tr["mlp"]["abs_layer_diff_hist"], float)
            fig, axes = _grid(1, 1, (5, 3))
            ax = axes[0, 0]
            ax.bar(range(L), h / h.sum(), color="C2", label="paraphrase pairs (same fact)")
            ax.plot(range(L), tr["mlp"]["abs_layer_diff_uniform_pmf"], "k.-", lw=1, ms=3, label="two uniform layers")
            ax.set_xlabel("|peak layer(i) - peak layer(j)|, MLP at the last subject token")
            ax.set_ylabel("share of pairs")
            ax.legend(fontsize=7)
            _save(fig, out_dir / "fig_tracing_layer_diff.png")
            made.append("fig_tracing_layer_diff.png")
        ie = tr.get("mean_normalized_ie", {})
        if ie:
            ks = sorted({k.split("/")[0] for k in ie})
            fig, axes = _grid(1, len(ks), (4 * len(ks), 3), sharey=True)
            for ax, k in zip(axes[0], ks):
                for cls, sty in (("last_subject", "-"), ("last", "--"), ("other", ":")):
                    if f"{k}/{cls}" in ie:
                        ax.plot(range(L), ie[f"{k}/{cls}"], sty, label=cls)
                ax.set_title(k, fontsize=9)
                ax.set_xlabel("layer")
            axes[0, 0].set_ylabel("normalized IE")
            axes[0, 0].legend(fontsize=7)
            _save(fig, out_dir / "fig_tracing_ie.png")
            made.append("fig_tracing_ie.png")
    rows = _fidelity_rows(s, L)
    if rows:
        fig, axes = _grid(1, 1, (1.9 * len(rows) + 2, 3.2))
        ax = axes[0, 0]
        w = 0.2
        for g, (key, lab, col) in enumerate((("same_fact", "paraphrases, same fact", "C0"),
                                             ("same_template", "same template, other fact", "C1"),
                                             ("unrelated", "unrelated fact", "C7"), ("random", "random", "k"))):
            xs, ys, lo, hi = [], [], [], []
            for i, (_n, _u, fid) in enumerate(rows):
                m = fid.get(key)
                if not m or m.get("n", 0) == 0 or m["mean"] != m["mean"]:
                    continue
                xs.append(i + (g - 1.5) * w)
                ys.append(m["mean"])
                lo.append(m["mean"] - m["ci"][0])
                hi.append(m["ci"][1] - m["mean"])
            if xs:
                ax.bar(xs, ys, w, yerr=[lo, hi], label=lab, color=col, capsize=2)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r[0] for r in rows], fontsize=8)
        ax.set_ylabel("IoU of localized parameters")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        _save(fig, out_dir / "fig_iou.png")
        made.append("fig_iou.png")
    return made


def audit_report(res, summary: dict, out_dir: Path | str) -> dict:
    """The report.json dict of an audit result (strict JSON) with its figures written into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = build_report(res, summary)
    made = set(audit_figures(res, summary, out_dir))
    rep["figures"] = [f for f in rep["figures"] if f["file"] in made]
    return strict_json(rep)


def write_report(res, summary: dict, out_dir: Path | str) -> Path:
    """Write the figures and then report.json of an audit result into ``out_dir``; returns the report.json path."""
    rep = audit_report(res, summary, out_dir)
    atomic_write_json(Path(out_dir) / "report.json", rep)
    return Path(out_dir) / "report.json"


# ---------------------------------------------------------------------------------------------------------------------
# the knowledge-circuit report
# ---------------------------------------------------------------------------------------------------------------------
def _r(v, nd: int = 4):
    if isinstance(v, (float, np.floating)):
        return round(float(v), nd) if math.isfinite(v) else None
    return v

def circuit_report(audit, s: dict, out_dir: Path | str | None = None) -> dict:
    """The report.json dict of a circuit audit (``s`` = ``audit.summary()``); figures go into ``out_dir`` when given."""
    fid, rel, size = s["fidelity"], s["reliability"], s["size"]
    k = size["top_k_edges"]
    rows = []
    for name in ("edge_iou", "node_iou", "param_iou"):
        f = fid[name]
        rows.append([name, _r(f["paraphrase"]), f"[{_r(f['ci'][0])}, {_r(f['ci'][1])}]",
                     _r(f["same_relation_other_fact"]), _r(f["other_relation"]), _r(f["random_same_size"])])
    rel_rows = [[name, _r(rel[name]["mean_ratio"]), f"[{_r(rel[name]['ci'][0])}, {_r(rel[name]['ci'][1])}]",
                 _r(rel[name]["median_ratio"]), _r(rel[name]["share_keeps"]),
                 f"[{_r(rel[name]['share_keeps_ci'][0])}, {_r(rel[name]['share_keeps_ci'][1])}]"]
                for name in ("circuit", "random", "empty")]
    figures = []
    if out_dir is not None:
        figures = circuit_figures(Path(out_dir), fid, rel)
    m = audit.meta
    text = [
        f"Knowledge circuits by edge attribution patching on {m.get('model_id', '?')}: {fid['n_facts']} facts, "
        f"{fid['n_phrasings']} phrasings, circuit = top {k} of {size['n_edges']} edges by |EAP score| "
        f"({100 * size['edge_share']:.2f}% of edges, {size['nodes_mean']:.0f} nodes on average = "
        f"{100 * size['node_share_mean']:.1f}% of heads+MLPs, {100 * size['param_share_mean']:.1f}% of parameters).",
        f"Corruption: {audit.config.get('corrupt')} (used: {s['corruptions']}); metric {audit.config.get('metric')}: "
        f"clean {s['m_clean_mean']:.3f}, corrupted {s['m_corrupt_mean']:.3f} (means over phrasings).",
        "Fidelity: do a fact's paraphrases get the same circuit? Compare the paraphrase IoU with phrasings of "
        "different facts (if they are as similar, the circuit follows the prompt type, not the fact) and with "
        "random sets of the same size.",
        "Reliability (node-level mean ablation; edges are not ablated individually): P(first target token) with "
        "every head/MLP outside the circuit replaced by its mean, relative to the full model; random = node sets "
        "with the same numbers of heads and MLPs; empty = every head and MLP ablated.",
    ]
    claims = {
        "circuit_edge_iou": {"value": fid["edge_iou"]["paraphrase"], "ci": fid["edge_iou"]["ci"],
                             "chance": fid["edge_iou"]["random_same_size"]},
        "circuit_param_iou": {"value": fid["param_iou"]["paraphrase"], "ci": fid["param_iou"]["ci"],
                              "chance": fid["param_iou"]["random_same_size"]},
        "circuit_reliability_share": {"value": rel["circuit"]["share_keeps"], "ci": rel["circuit"]["share_keeps_ci"],
                                      "chance": rel["random"]["share_keeps"]},
        "circuit_param_share": {"value": size["param_share_mean"]},
    }
    return {
        "kind": "audit_circuits", "title": "Individual-knowledge audit: knowledge circuits (EAP)", "text": text,
        "tables": [
            {"title": "Circuit fidelity between phrasings (IoU)",
             "columns": ["set", "paraphrases (same fact)", "95% CI", "same relation, other fact",
                         "other relation", "random same size"], "rows": rows,
             "note": f"bootstrap over facts ({fid['n_facts']}); pairs: {fid['n_pairs']}"},
            {"title": f"Circuit reliability: P_circuit / P_full (share keeping >= {rel['threshold']:.0%})",
             "columns": ["circuit", "mean ratio", "95% CI", "median", "share keeps", "95% CI"], "rows": rel_rows,
             "note": f"{rel['n_phrasings']} phrasings; random: {audit.ratio_random.shape[1]} draws per phrasing"},
            {"title": "Circuit size", "columns": list(size), "rows": [[_r(v) for v in size.values()]]},
        ],
        "figures": figures, "claims": claims,
    }

def circuit_figures(out_dir: Path, fid: dict, rel: dict) -> list[dict]:
    """The circuit audit's figure entries (PNGs written into ``out_dir``)."""
    figs = []
    try:
        labels, vals, lo, hi = [], [], [], []
        for name in ("edge_iou", "param_iou"):
            f = fid[name]
            labels += [f"{name}: paraphrase", f"{name}: same rel.", f"{name}: random"]
            vals += [f["paraphrase"], f["same_relation_other_fact"], f["random_same_size"]]
            lo += [f["ci"][0], f["same_relation_other_fact"], f["random_same_size"]]
            hi += [f["ci"][1], f["same_relation_other_fact"], f["random_same_size"]]
        bars_with_ci(labels, vals, lo, hi, out_dir / "fig_circuit_fidelity.png", title="Circuit IoU between phrasings",
                     ylabel="IoU")
        figs.append({"title": "Circuit fidelity", "file": "fig_circuit_fidelity.png",
                     "caption": "IoU of circuits between paraphrases of one fact (95% bootstrap CI over facts), "
                                "between phrasings of different facts of the same relation, and of random sets."})
        labels = ["circuit", "random nodes", "empty"]
        bars_with_ci(labels, [rel[n]["share_keeps"] for n in ("circuit", "random", "empty")],
                     [rel[n]["share_keeps_ci"][0] for n in ("circuit", "random", "empty")],
                     [rel[n]["share_keeps_ci"][1] for n in ("circuit", "random", "empty")],
                     out_dir / "fig_circuit_reliability.png", ylabel=f"share with P ratio >= {rel['threshold']}",
                     title="Circuit alone keeps the answer")
        figs.append({"title": "Circuit reliability", "file": "fig_circuit_reliability.png",
                     "caption": "Share of phrasings whose P(target) keeps at least half its full-model value with "
                                "only the circuit's nodes intact (others mean-ablated)."})
    except Exception as e:  # a figure never sinks the result
        log.warning("circuit figures not written: %s", str(e).splitlines()[0])
    return figs
