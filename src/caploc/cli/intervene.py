"""``caploc intervene`` (set vs random controls, dose-response, specificity) and ``caploc export-enhanced``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import CaplocError
from ..evalsets import default_off_target, eval_sets
from ..export import export_enhanced
from ..neurons import gain_for
from ..results import check_out_dir
from ..runs import spec_of
from ..stages.intervene import InterveneConfig, run_intervention
from .app import app, console, print_table
from .evaluate import load_neurons_and_model, parse_metrics
from .options import opt


def _parse_ks(text: Optional[str]) -> Optional[list[float]]:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CaplocError(f"cannot parse --ks {text!r}; use e.g. 0,0.5,1,1.5,2,3") from None


@app.command()
def intervene(
    neurons: Path = typer.Option(..., help="A locate run directory (neurons.json)."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="On-target dataset first, then off-target ones (default: the localization dataset + facts and rg:letter_counting)."),
    mode: str = typer.Option("erase", help="erase | enhance: the headline intervention (its gain is primary_k)."),
    k: float = typer.Option(2.0, help="Enhancement gain (mode enhance)."),
    ks: Optional[str] = typer.Option(None, help="Dose-response gains, e.g. 0,0.5,1,1.5,2,3 (0 = erase; default: the "
                                     "headline gain only)."),
    n_random: int = opt(InterveneConfig, "n_random"),
    min_controls: int = opt(InterveneConfig, "min_controls"),
    seed: int = opt(InterveneConfig, "seed"),
    act_matched: bool = opt(InterveneConfig, "act_matched"),
    act_samples: int = opt(InterveneConfig, "act_samples"),
    spec_margin: float = opt(InterveneConfig, "spec_margin"),
    spec_max_off_share: float = opt(InterveneConfig, "spec_max_off_share"),
    n: int = typer.Option(32, "--n", "--n-samples", help="Samples per dataset (per held-out part)."),
    n_off: Optional[int] = typer.Option(None, help="Samples per off-target / cross-dataset dataset (default: --n)."),
    data_seed: int = typer.Option(1, help="Seed of the evaluation samples."),
    heldout: bool = typer.Option(True, help="Split the on-target data into held-out samples and held-out templates."),
    target: str = typer.Option("cot", help="gsm_symbolic target: cot or answer."),
    metrics: str = opt(InterveneConfig, "metrics"),
    chat: bool = opt(InterveneConfig, "chat"),
    batch_size: int = opt(InterveneConfig, "batch_size"),
    memory_mb: Optional[float] = opt(InterveneConfig, "memory_mb"),
    max_length: Optional[int] = opt(InterveneConfig, "max_length"),
    max_new_tokens: Optional[int] = opt(InterveneConfig, "max_new_tokens"),
    n_boot: int = opt(InterveneConfig, "n_boot"),
    model: Optional[str] = typer.Option(None, help="Model (default: the one the neurons were localized on)."),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"),
    device_map: Optional[str] = typer.Option(None), layout: Optional[str] = typer.Option(None),
    out: Path = typer.Option(Path("runs/intervene"), help="Output directory."),
):
    """Erase/enhance a neuron set vs random same-layer-size sets, an activation-matched set and the untouched model."""
    primary = gain_for(mode, k)
    gains = _parse_ks(ks) or [primary]
    if primary not in gains:
        gains = [primary] + gains
    cfg = InterveneConfig(ks=tuple(gains), primary_k=primary, n_random=n_random, min_controls=min_controls, seed=seed,
                          act_matched=act_matched, act_samples=act_samples, spec_margin=spec_margin,
                          spec_max_off_share=spec_max_off_share, metrics=parse_metrics(metrics), chat=chat,
                          batch_size=batch_size, memory_mb=memory_mb, max_length=max_length, max_new_tokens=max_new_tokens,
                          n_boot=n_boot)
    check_out_dir(out)
    ns, lm = load_neurons_and_model(neurons, model, dtype, device, device_map, layout)
    specs = list(data or [])
    if not specs:
        on = spec_of(ns.meta.get("dataset_source")) or "gsm_symbolic"
        specs = [on]
    if len(specs) == 1:
        specs += default_off_target(specs[0])
        console.print(f"off-target datasets: {', '.join(specs[1:])}")
    entries = eval_sets(specs, n=n, seed=data_seed, neuron_meta=ns.meta, heldout=heldout, target=target, n_off=n_off)
    res = run_intervention(lm, ns, entries, cfg, out_dir=out)
    t = Table("dataset", "k", "condition", "NLL/tok", "ΔNLL/tok", "95% CI", "random mean ± sd", "z", "pct", box=None)
    for r in res.summary_rows():
        t.add_row(r["dataset"], f"{r['k']:g}", r["condition"], f"{r['nll']:.4f}", f"{r['d_nll']:+.4f}",
                  f"[{r['ci_lo']:+.4f}, {r['ci_hi']:+.4f}]", f"{r['random_mean']:+.4f} ± {r['random_sd']:.4f}",
                  f"{r['z']:.2f}", f"{r['percentile']:.2f}")
    print_table(t)
    for name, c in res.claims().items():
        value = "n/a" if c["value"] is None else f"{c['value']:.4g}"
        p = f", permutation p = {c['p']:.3g}" if isinstance(c.get("p"), (int, float)) else ""
        console.print(f"{name}: value={value}{p}" + (f", verdict: {c['verdict']}" if "verdict" in c else ""),
                      highlight=False)
    console.print(f"wrote {out}/intervene.json, intervene.safetensors, report.json, figures")


@app.command("export-enhanced")
def export_enhanced_cmd(
    neurons: Path = typer.Option(..., help="A locate run directory (neurons.json)."),
    k: float = typer.Option(2.0, help="Gain folded into the neurons' output-projection columns."),
    out: Path = typer.Option(..., help="Output model directory."),
    peft: Optional[bool] = typer.Option(None, "--peft/--no-peft", help="Also write a peft IA3 adapter (default: if peft is installed)."),
    verify: bool = typer.Option(True, help="Reload the export and compare its logits with the hooked model."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
    model: Optional[str] = typer.Option(None, help="Model (default: the one the neurons were localized on)."),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"),
    device_map: Optional[str] = typer.Option(None), layout: Optional[str] = typer.Option(None),
):
    """Save a copy of the model with the gain folded in (plain transformers loads it), plus gain vectors and IA3."""
    ns, lm = load_neurons_and_model(neurons, model, dtype, device, device_map, layout)
    s = export_enhanced(lm, ns, k, out, peft=peft, verify=verify, overwrite=overwrite)
    console.print(f"exported {s['n_neurons']} neurons x{k:g} in layers {s['layers']} to {out}")
    for key in ("max_abs_logit_diff_folded", "max_abs_logit_diff_ia3", "max_abs_logit_change_vs_untouched"):
        if key in s:
            console.print(f"  {key}: {s[key]:.3g}")
