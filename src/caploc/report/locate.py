"""Built-in report renderer for locate results (``neurons.json`` + ``neurons.safetensors`` [+ ``summary.json``]).

Draws what a reader needs to judge a neuron set even when the stage wrote no figure: the per-layer distribution of
the set (count per layer, share of the layer on the right axis, a uniform random set of the same size as reference)
and the histogram of every neuron's selection count (log y, the threshold S marked), plus a table with the size,
shares, rule, thresholds, dataset and model. Registered for kind ``locate`` (and ``neuron_set``); a directory
without report.json is detected by its ``neurons.json`` of kind ``neuron_set``. When the stage did write a
report.json, its own text/tables/figures/claims come first and generated items with the same title are skipped.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..cards import Context, top_neurons
from ..errors import CaplocError
from ..results import NeuronSet, read_json
from . import figures as F
from .registry import register_renderer

log = logging.getLogger(__name__)

PER_LAYER_TITLE = "Neurons per layer"
FREQ_TITLE = "Selection-count histogram"


def _pct(x) -> float | None:
    return None if x is None else round(100.0 * float(x), 6)


def _describe_rule(meta: dict) -> str:
    rule, val = meta.get("rule"), meta.get("rule_value")
    if rule is None:
        return "unknown"
    return {"sigma": f"sigma: Attr > mean + {val:g} sd", "sigma_layer": f"sigma per layer: Attr > mean_l + {val:g} sd_l",
            "topk": f"topk: top {int(val)} per sample",
            "kn": f"kn: Attr > {val:g} x max"}.get(rule, f"{rule} = {val}")


TOP_NEURONS = 200


def neuron_table(ns: NeuronSet, top: int = TOP_NEURONS) -> dict:
    """The set's neurons, most frequently selected first (all of them live in neurons.json)."""
    rows = []
    for k in top_neurons(ns, top):
        rows.append([f"L{int(ns.pairs[k, 0])}:{int(ns.pairs[k, 1])}",
                     None if ns.frequency is None else round(float(ns.frequency[k]), 4),
                     None if ns.mean_score is None else float(f"{float(ns.mean_score[k]):.4g}")])
    note = f"The {min(top, len(ns))} most frequently selected of {len(ns)} neurons; every pair is in neurons.json."
    return {"title": "Neurons", "columns": ["neuron (layer:index)", "selection frequency", "mean score"],
            "rows": rows, "note": note}


def _cards(run_dir: Path) -> dict | None:
    """Neuron cards written by ``caploc locate`` (cards.json): where each top neuron fires most."""
    path = run_dir / "cards.json"
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        rows = []
        for c in data["cards"]:
            ctxs = []
            for x in c["contexts"]:
                ctx = Context(str(x.get("sample_id", "")), int(x.get("position", 0)), float(x["activation"]),
                              [str(t) for t in x["tokens"]], int(x["mark"]))
                ctxs.append(f"{ctx.text('[', ']').strip()} ({ctx.activation:.3g})")
            rows.append([f"L{int(c['layer'])}:{int(c['index'])}", c.get("frequency"), c.get("mean_score"),
                         " · ".join(ctxs)])
    except (CaplocError, KeyError, TypeError, ValueError, IndexError):
        log.warning("%s is unreadable; the report leaves the neuron cards out", path)
        return None
    return {"title": "Neuron cards", "columns": ["neuron", "frequency", "mean score",
                                                  "where it fires most (token in [brackets], activation)"],
            "rows": rows, "note": "The dataset contexts with the largest activation of each top neuron."}


def locate_report(ns: NeuronSet) -> dict:
    """The report.json a locate stage writes (the renderer adds figures and tables from the neuron set itself)."""
    share_p = ns.share_of_params()
    return {
        "kind": "locate", "title": f"Commonality neurons of {ns.meta.get('dataset')}",
        "text": [f"{len(ns)} neurons = {100 * ns.share_of_neurons():.4f} % of MLP neurons"
                 + (f" = {100 * share_p:.4f} % of parameters" if share_p is not None else "")
                 + f", selected in >= {ns.meta.get('min_count')} of {ns.n_samples} samples."],
        "tables": [], "figures": [],
        "claims": {"n_neurons": {"value": len(ns)}, "share_of_params": {"value": share_p}},
    }


def render_locate(run_dir: Path, report: dict | None, fig_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if report is not None and not (run_dir / "neurons.json").is_file():
        return report  # a locate-kind report.json without a neuron set next to it: render it as written
    ns = NeuronSet.load(run_dir)
    meta = ns.meta
    summary = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s/summary.json is unreadable; reporting without it", run_dir)
    n, L, d = len(ns), ns.n_layers, ns.d_mlp
    per_layer = ns.per_layer_counts()
    S = meta.get("min_count")
    N = ns.n_samples
    cfg = meta.get("config") or {}
    att = cfg.get("attribution") or {}
    dataset = meta.get("dataset", "?")
    model = meta.get("model_id", "?")
    share_p = ns.share_of_params()

    figs = []
    expected = np.full(L, n / L) if n else None
    figs.append({"title": PER_LAYER_TITLE, "generated": True, "file": str(F.per_layer_bars(
        per_layer, fig_dir / "per_layer.png", d_mlp=d, expected=expected,
        title=f"{n} neurons over {L} layers ({d} neurons each)")),
        "caption": "Neurons of the set in each layer (left axis) and as a share of the layer's neurons (right "
                   "axis); the dashed line is the expected count per layer of a uniform random set of the same size."})
    text = []
    if ns.counts is not None:
        counts = np.asarray(ns.counts)
        figs.append({"title": FREQ_TITLE, "generated": True, "file": str(F.count_histogram(
            counts, fig_dir / "frequency.png", n_samples=N or None, threshold=S,
            title=f"How many of {N} samples selected each of {counts.size} neurons")),
            "caption": f"Number of neurons (log scale) by how many samples selected them under the per-sample rule; "
                       f"neurons at or right of the dashed line (S = {S}) form the set."})
        n_any = int((counts > 0).sum())
        text.append(f"{n_any} of {counts.size} neurons ({100 * n_any / max(counts.size, 1):.3g} %) were selected by "
                    f"at least one sample; {n} reach the threshold S = {S} of {N}.")
    else:
        text.insert(0, "This set has no per-neuron selection counts (imported or hand-made), so the frequency "
                       "histogram is not available.")
    size_txt = (f"{n} neurons = {100 * ns.share_of_neurons():.4g} % of the MLP neurons"
                + (f" = {100 * share_p:.4g} % of the parameters" if share_p is not None else ""))
    lead = (f"Commonality neurons of {dataset} on {model}: {size_txt}, selected per sample by "
            f"{_describe_rule(meta)} and kept when selected in at least S = {S} of {N} samples "
            f"(min_freq = {meta.get('min_freq')}).")
    if n == 0:
        lead += " The set is empty: no neuron reached S; lower --min-freq or the per-sample threshold."
    text.insert(0, lead)

    method = meta.get("method") or att.get("method")
    mdesc = method or "?"
    if att:
        bits = [f"{att['steps']} steps" if method == "ig" and "steps" in att else None,
                f"objective {att.get('objective')}" if att.get("objective") else None,
                f"positions {att.get('positions')}" if att.get("positions") else None]
        mdesc += " (" + ", ".join(b for b in bits if b) + ")" if any(bits) else ""
    src = meta.get("dataset_source") if isinstance(meta.get("dataset_source"), dict) else {}
    rows = [
        ["neurons", n],
        ["share of MLP neurons (%)", _pct(ns.share_of_neurons())],
        ["share of parameters (%)", _pct(share_p)],
        ["layers holding neurons", f"{int((per_layer > 0).sum())} of {L}"],
        ["per-sample rule", _describe_rule(meta)],
        ["per-sample selected (mean)", meta.get("per_sample_selected_mean")],
        ["frequency threshold", f"min_freq {meta.get('min_freq')} -> S = {S} of {N} samples"],
        ["attribution", mdesc],
        ["dataset", f"{dataset} (n = {N}" + (f", seed {src['seed']}" if src.get("seed") is not None else "")
         + (f", fingerprint {meta['dataset_fingerprint']})" if meta.get("dataset_fingerprint") else ")")],
        ["model", f"{model} ({meta.get('model_type', '?')}, {L} layers x {d} neurons, "
                  f"site: {meta.get('neuron_site', '?')})"],
    ]
    if summary.get("completeness_rel_gap_mean") is not None:
        rows.append(["IG completeness, median |gap| / |f(a) - f(0)|", summary["completeness_rel_gap_mean"]])
    if summary.get("seconds") is not None:
        rows.append(["run time (s)", summary["seconds"]])
    if meta.get("caploc_version"):
        rows.append(["caploc version", meta["caploc_version"]])
    tables = [{"title": "Neuron set", "columns": ["property", "value"], "rows": rows}]
    if n:
        nz = np.nonzero(per_layer)[0]
        tables.append({"title": "Per-layer distribution", "columns": ["layer", "neurons", "% of layer", "% of set"],
                       "rows": [[int(l), int(per_layer[l]), round(100 * per_layer[l] / d, 4),
                                 round(100 * per_layer[l] / n, 2)] for l in nz],
                       "note": "Layers without neurons are omitted."})
    if n:
        tables.append(neuron_table(ns))
    cards = _cards(run_dir)
    if cards:
        tables.append(cards)
    claims = {"n_neurons": {"value": n}, "share_of_neurons": {"value": ns.share_of_neurons()}}
    if share_p is not None:
        claims["share_of_params"] = {"value": share_p}

    gen = {"kind": "locate", "title": f"Localized neurons: {dataset} on {model}", "text": text, "tables": tables,
           "figures": figs, "claims": claims}
    if report is None:
        return gen
    merged = dict(report)
    merged.setdefault("title", gen["title"])
    merged["text"] = list(report.get("text") or []) if not isinstance(report.get("text"), str) else [report["text"]]
    have_tables = {t.get("title") for t in report.get("tables") or [] if isinstance(t, dict)}
    have_figs = {f.get("title") for f in report.get("figures") or [] if isinstance(f, dict)}
    merged["tables"] = list(report.get("tables") or []) + [t for t in tables if t["title"] not in have_tables]
    merged["figures"] = list(report.get("figures") or []) + [f for f in figs if f["title"] not in have_figs]
    merged["claims"] = {**claims, **(report.get("claims") or {})}
    if not merged["text"]:
        merged["text"] = text
    return merged


register_renderer("locate", render_locate, marker=("neurons.json", "neuron_set"))
register_renderer("neuron_set", render_locate)
