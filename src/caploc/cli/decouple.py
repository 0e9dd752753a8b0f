"""``caploc decouple``: do localized neuron sets follow shared commonality (problem type) or shared content?"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, console, load_model_from_opts


@app.command()
def decouple(
    model: str = typer.Option("smollm2-135m", help="Built-in 'smollm2-135m', a local HF model dir, a cached HF id, or tiny:<arch>."),
    domains: str = typer.Option("gsm_symbolic,facts", help="Comma-separated: gsm_symbolic, facts."),
    n_groups: int = typer.Option(8, help="Groups per kind (commonality / content / random) and domain."),
    group_size: int = typer.Option(5, help="Samples per group."),
    full: bool = typer.Option(False, "--full", help="Paper scale: 50 groups x 20 = 1000 samples per kind (pool 20000)."),
    pool_size: Optional[int] = typer.Option(None, help="gsm_symbolic problems generated to search groups in (default 2000)."),
    seed: int = typer.Option(0, help="Seed of the pool and of the group choice."),
    gsm_target: str = typer.Option("cot", help="gsm_symbolic target: cot (gold chain of thought) or answer."),
    method: str = typer.Option("grad_x_act", help="Per-sample attribution: grad_x_act | ig (exact per-layer IG)."),
    steps: int = typer.Option(8, help="IG steps (method=ig)."),
    rule: str = typer.Option("sigma", help="Per-sample selection: sigma | topk."),
    sigma: float = typer.Option(6.0, help="sigma rule: Attr > mean + sigma*sd of the sample."),
    topk: int = typer.Option(200, help="topk rule: neurons per sample."),
    batch_size: int = typer.Option(4, help="Samples per forward/backward (grad_x_act)."),
    n_boot: int = typer.Option(2000, help="Bootstrap resamples for the CIs."),
    chat: bool = typer.Option(False, help="Wrap prompts in the tokenizer's chat template."),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu", help="cpu | auto | an accelerator"),
    layout: Optional[str] = typer.Option(None, help="Custom MLP layout for unknown architectures."),
    out: Path = typer.Option(Path("runs/decouple"), help="Output directory (report.json, figures, sets)."),
):
    """Comparative groups (same template / shared content across templates / random) -> per-sample neuron sets ->
    within-group IoU with bootstrap CIs."""
    from ..decouple import DecoupleConfig
    from ..decouple import decouple as run_decouple

    kw = dict(domains=[d.strip() for d in domains.split(",") if d.strip()], seed=seed, gsm_target=gsm_target,
              method=method, steps=steps, rule=rule, sigma=sigma, topk=topk, batch_size=batch_size, n_boot=n_boot,
              chat=chat)
    if full:
        cfg = DecoupleConfig.full(**kw, **({"pool_size": pool_size} if pool_size else {}))
    else:
        cfg = DecoupleConfig(n_groups=n_groups, group_size=group_size, pool_size=pool_size or 2000, **kw)
    lm = load_model_from_opts(model, dtype, device, None, layout)
    res = run_decouple(lm, cfg, out)
    from rich.table import Table

    s = res.summary()
    t = Table("domain", "groups", "n", "IoU", "95% CI", "chance", title=f"decoupling on {lm.model_id}")
    for dom, d in s.items():
        for kind in ("commonality", "content", "random"):
            v = d["iou"][kind]
            t.add_row(dom, kind, str(d["n_groups"].get(kind, 0)), f"{v['mean']:.3f}",
                      f"[{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]", f"{d['chance_iou']:.4f}")
    console.print(t)
    for dom, d in s.items():
        diff = d["iou"]["commonality_minus_content"]
        console.print(f"{dom}: commonality - content = {diff['mean']:.3f} [{diff['ci'][0]:.3f}, {diff['ci'][1]:.3f}] "
                      f"-> follows commonality: {d['follows_commonality']}")
    console.print(f"wrote {out}/report.json, decouple.json, decouple.safetensors")
