"""``report.json`` of ``caploc generic`` (a :class:`~caploc.stages.generic.GenericReport`): one table, no figures."""
from __future__ import annotations

import math
from typing import Any  # the stage's result (not imported here: report modules sit below the stages)


def _r(v, nd=3):
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return round(f, nd) if math.isfinite(f) else None


def generic_report(rep: Any) -> dict:
    """Text (criteria, counts), the flagged-neuron table and the number of generic neurons as a claim."""
    cols = ["layer", "index", "generic", "flags", "peak |a| (min over datasets)", "peak / layer typical peak",
            "peak at token 0 (share)"] + [f"freq {k}" for k in rep.runs]
    erase_cols = sorted({k for r in rep.rows for k in (r.get("erase_delta") or {})})
    cols += [f"erase ΔNLL {k}" for k in erase_cols]
    rows = []
    for r in rep.rows:
        rows.append([r["layer"], r["index"], r.get("generic", False), ",".join(r.get("flags", [])),
                     _r(r.get("peak")), _r(r.get("peak_ratio"), 1), _r(r.get("first_token_share"), 2)]
                    + [_r((r.get("freq") or {}).get(k)) for k in rep.runs]
                    + [_r((r.get("erase_delta") or {}).get(k), 4) for k in erase_cols])
    n_gen = int(sum(bool(r.get("generic")) for r in rep.rows))
    text = [f"{n_gen} generic neuron(s) flagged by {' or '.join(rep.config.get('criteria', []))} "
            f"(activation datasets: {', '.join(rep.datasets) or 'none'}; frequency runs: {', '.join(rep.runs) or 'none'}).",
            "massive: peak |a| >= {massive_ratio}x the layer's typical peak on every dataset and among the model's "
            "{massive_top} largest peaks; common_all: selection frequency >= {common_freq} on every run; erase_all: "
            "single-neuron erase raises NLL by >= {erase_min_delta} nats/token on every dataset.".format(**{
                k: rep.config.get(k) for k in ("massive_ratio", "massive_top", "common_freq", "erase_min_delta")})]
    if rep.meta.get("random_single_erase"):
        text.append("Single random neurons (for scale), erase ΔNLL: " + "; ".join(
            f"{k}: mean {v['mean']:.4f} (max {v['max']:.4f}, {v['n']} neurons)" for k, v in rep.meta["random_single_erase"].items()))
    return {"kind": "generic", "title": "Generic-neuron diagnostics", "text": text,
            "tables": [{"title": "Flagged neurons", "columns": cols, "rows": rows,
                        "note": "freq: selection frequency in each run (its own per-sample rule)."}],
            "figures": [], "claims": {"n_generic": {"value": n_gen}}}


__all__ = ["generic_report"]
