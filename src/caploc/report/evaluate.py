"""``report.json`` of ``caploc eval`` (an :class:`~caploc.stages.evaluate.EvalRun`): one table, no figures."""
from __future__ import annotations

import math
from typing import Any  # the stage's result (not imported here: report modules sit below the stages)


def _f(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def eval_report(run: Any) -> dict:
    """Text (model, metrics, intervention), the NLL/accuracy table and the untouched NLL per dataset as claims."""
    m = run.meta
    text = [f"Model {m.get('model_id')} ({m.get('model_fingerprint')}); metrics {', '.join(m.get('metrics', []))}; "
            f"chat={m.get('chat')}; data seed {m.get('data_seed')}."]
    if m.get("neurons"):
        text.append(f"Intervention: {m.get('mode')} (gain {m.get('gain')}) on {m.get('n_neurons')} neurons from "
                    f"{m.get('neurons')}. Effects here are NOT compared with random neurons: use `caploc intervene`.")
    claims = {}
    for lab, conds in run.results.items():
        if "untouched" in conds:
            claims[f"nll_per_token[{lab}]"] = {"value": _f(conds["untouched"].nll_per_token)}
    return {
        "kind": "eval", "title": f"Evaluation of {m.get('model_id')}", "text": text,
        "tables": [{"title": "NLL per target token and accuracy", "rows": run.rows(),
                    "columns": ["dataset", "condition", "n", "target tokens", "NLL/token", "ΔNLL/token",
                                "accuracy", "Δaccuracy"],
                    "note": "NLL/token is token-weighted over all gold target tokens (teacher forced); Δ is "
                            "intervened minus untouched on the same samples."}],
        "figures": [], "claims": claims,
    }


__all__ = ["eval_report"]
