"""Report of a fine-tuning comparison: ``report.json`` tables/text/claims and two figures (``fig_loss.png``,
``fig_delta.png``), drawn with matplotlib's object API through :mod:`caploc.report.figures`.

With a learning-rate sweep a third table lists every arm's rates with their validation NLL and marks the rate that
was selected (by validation NLL, never by the evaluation sets).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from . import figures as F

#: a ``caploc.stages.finetune.FinetuneResult`` (not imported: report modules sit below the stages)
FinetuneResult = Any


def _fmt(x, nd=4):
    if x is None:
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return round(float(x), nd)


def _random_stats(rnd, dsets) -> tuple[list[float], list[float]]:
    m = [float(np.mean([a.eval[d]["delta"] for a in rnd])) for d in dsets]
    s = [float(np.std([a.eval[d]["delta"] for a in rnd], ddof=1)) if len(rnd) > 1 else 0.0 for d in dsets]
    return m, s


def _tables(res: FinetuneResult, dsets: list[str], role: dict) -> list[dict]:
    rnd = [a for a in res.arms if a.kind == "random"]
    cfg = res.config
    rows = [["untuned", 0, "-", *[_fmt(res.untuned[d]["nll"]) for d in dsets], None]]
    delta_rows = []
    for a in res.arms:
        rows.append([a.name, a.n_trainable, a.lr, *[_fmt(a.eval[d]["nll"]) for d in dsets], _fmt(a.losses[-1])])
        delta_rows.append([a.name, a.n_trainable, a.lr, *[_fmt(a.eval[d]["delta"]) for d in dsets],
                           _fmt(a.losses[0]), _fmt(a.losses[-1]), _fmt(a.step_seconds_median, 3)])
    if rnd:
        m, s = _random_stats(rnd, dsets)
        delta_rows.append([f"random mean ± sd (n={len(rnd)})", rnd[0].n_trainable, rnd[0].lr,
                           *[f"{mm:+.4f} ± {ss:.4f}" for mm, ss in zip(m, s)], None, None, None])
    cols = [f"{d} ({role[d]})" for d in dsets]
    sweep = res.meta.get("validation")
    tables = [
        {"title": "ΔNLL per target token after fine-tuning (after − untuned; negative = better)",
         "columns": ["arm", "trainable params", "lr", *cols, "train loss first", "train loss last", "s/step"],
         "rows": delta_rows,
         "note": f"{cfg['steps']} steps, batch {cfg['batch_size']}, same data order (seed "
                 f"{cfg['seed']}), grad clip {cfg['max_grad_norm']}, schedule {cfg['schedule']}; "
                 "random arms = layer-matched random neuron sets (seeds in meta)."
                 + (" Each arm at its learning rate selected by validation NLL (sweep table below)." if sweep else "")},
        {"title": "NLL per target token (absolute)", "columns": ["arm", "trainable params", "lr", *cols,
                                                                 "train loss last"], "rows": rows},
    ]
    if sweep:
        srows = [[a.name, r["lr"], _fmt(r["val_nll"]), _fmt(r["val_nll"] - sweep["untuned_nll"])
                  if r["val_nll"] is not None and math.isfinite(r["val_nll"]) else None,
                  _fmt(r["train_loss_last"]), "yes" if r["selected"] else ""]
                 for a in res.arms for r in (a.sweep or [])]
        tables.append({"title": "Learning-rate sweep (validation split of the training data)",
                       "columns": ["arm", "lr", "validation NLL", "Δ vs untuned", "train loss last", "selected"],
                       "rows": srows,
                       "note": f"validation = {sweep['n']} of the training samples (fraction {sweep['fraction']}, "
                               f"seed {cfg['seed']}), never trained on; the evaluation sets do not choose the rate. "
                               "Every random set is swept on its own (the control gets the same tuning); "
                               "a diverged run (non-finite loss) has validation NLL inf."})
    if res.comparisons:
        crow = []
        for d, c in res.comparisons.items():
            ci = c.get("paired_delta_per_sample_mean")
            crow.append([d, c.get("role"), _fmt(c["delta_neurons"]), _fmt(c.get("null_mean")), _fmt(c.get("null_sd")),
                         _fmt(c.get("z"), 2), _fmt(c.get("percentile"), 3), _fmt(c.get("p_two_sided"), 3),
                         c.get("n_null"), None if ci is None else f"[{ci['ci'][0]:+.4f}, {ci['ci'][1]:+.4f}]"])
        tables.append({"title": "Neuron arm vs random-neuron arms (per dataset)",
                       "columns": ["dataset", "role", "ΔNLL neurons", "random mean", "random sd", "z", "percentile",
                                   "p (two-sided, empirical)", "n random", "95% CI of per-sample ΔNLL (neurons)"],
                       "rows": crow,
                       "note": "p has a floor of 1/(n_random+1); the per-sample CI is a paired bootstrap vs untuned "
                               "(per-sample NLL as defined by caploc.evaluate)."})
    if res.specificity:
        sp = res.specificity
        srow = [[k, _fmt(v)] for k, v in sp["per_arm"].items()]
        tables.append({"title": "Specificity: mean ΔNLL on-target − mean ΔNLL off-target",
                       "columns": ["arm", "specificity index"], "rows": srow,
                       "note": f"on-target: {', '.join(sp['on_target'])}; off-target: {', '.join(sp['off_target'])}. "
                               + (f"neurons vs random: z = {_fmt(sp['vs_random']['z'], 2)}, "
                                  f"p = {_fmt(sp['vs_random']['p_two_sided'], 3)}" if 'vs_random' in sp else "")})
    return tables


def loss_figure(res: FinetuneResult, path: Path) -> Path:
    """Training loss per step of every arm (random arms thin and grey, one legend entry)."""
    rnd = [a for a in res.arms if a.kind == "random"]
    fig, ax = F.new_figure((6.5, 4.0), left=0.8, bottom=0.6)
    for a in res.arms:
        style = dict(color="0.6", lw=0.8, alpha=0.8) if a.kind == "random" else dict(lw=1.8)
        lab = a.name if a.kind != "random" else (f"random (n={len(rnd)})" if a is rnd[0] else None)
        ax.plot(range(1, len(a.losses) + 1), a.losses, label=lab, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (NLL/target token, before the step)")
    ax.legend(fontsize=8)
    ax.set_title("Training loss per arm")
    return F.save_figure(fig, path)


def delta_figure(res: FinetuneResult, dsets: list[str], role: dict, path: Path) -> Path:
    """ΔNLL per arm and dataset (random arms: mean ± sd)."""
    rnd = [a for a in res.arms if a.kind == "random"]
    fig, ax = F.new_figure((max(6.0, 1.6 * len(dsets)), 4.0), left=0.8, bottom=0.9)
    names = [a.name for a in res.arms if a.kind != "random"] + (["random"] if rnd else [])
    width = 0.8 / max(1, len(names))
    for j, nm in enumerate(names):
        if nm == "random":
            vals, err = _random_stats(rnd, dsets)
        else:
            vals, err = [res.arm(nm).eval[d]["delta"] for d in dsets], None
        ax.bar(np.arange(len(dsets)) + j * width, vals, width, yerr=err, label=nm, capsize=3)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(dsets)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([f"{d.replace(':', ':' + chr(10))}\n({role[d]})" for d in dsets], fontsize=7)
    ax.set_ylabel("ΔNLL / token (after − untuned)")
    ax.legend(fontsize=8)
    return F.save_figure(fig, path)


def build_report(res: FinetuneResult, out_dir: Path | str) -> dict:
    """Write ``fig_loss.png`` and ``fig_delta.png`` into ``out_dir`` and return the ``report.json`` dict."""
    out_dir = Path(out_dir)
    dsets = list(res.untuned)
    role = {d: res.datasets.get(d, {}).get("role", "?") for d in dsets}
    loss_figure(res, out_dir / "fig_loss.png")
    delta_figure(res, dsets, role, out_dir / "fig_delta.png")
    figures = [{"title": "Training loss", "file": "fig_loss.png",
                "caption": "Mean NLL per target token of each step's batch (same batches for every arm)."},
               {"title": "ΔNLL per arm and dataset", "file": "fig_delta.png",
                "caption": "Negative = fine-tuning lowered the NLL of gold targets; random bars = mean ± sd."}]
    cfg = res.config
    lr_text = ("lr per arm selected by validation NLL from a sweep" if res.meta.get("validation")
               else f"lr {cfg['lr']}")
    text = [
        f"Fine-tuned {res.meta.get('model_id')} on {res.meta['train']['name']} ({res.meta['train']['n']} samples) for "
        f"{cfg['steps']} AdamW steps (batch {cfg['batch_size']}, {lr_text}) per arm: "
        + ", ".join(f"{a.name} ({a.n_trainable:,} trainable, lr {a.lr:g})" for a in res.arms) + ".",
        "Neuron arms train deltas for the selected neurons' parameter slices only (weights untouched; weight decay 0). "
        "The untouched model is the baseline (ΔNLL = 0); random arms give the chance level for the same number of "
        "neurons per layer.",
    ]
    if "finetune_beats_random" in res.claims:
        c = res.claims["finetune_beats_random"]
        text.append(f"On {c['dataset']}: ΔNLL neurons = {c['value']:+.4f} vs random mean "
                    f"{c['null_mean'] if c['null_mean'] is None else format(c['null_mean'], '+.4f')} "
                    f"(z = {c['z'] if c['z'] is None else format(c['z'], '.2f')}, p = {c['p']}, n = {c['n_null']}); "
                    f"better than every random set: {c['beats']}.")
    return {"kind": "finetune", "title": f"Neuron-only fine-tuning on {res.meta['train']['name']}",
            "text": text, "tables": _tables(res, dsets, role), "figures": figures, "claims": res.claims}


__all__ = ["build_report", "loss_figure", "delta_figure"]
