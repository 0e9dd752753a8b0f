"""``caploc decouple``: do localized neuron sets follow shared commonality (problem type) or shared content?"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..stages.decouple import DecoupleConfig
from .app import app, console, load_model_from_opts, print_table
from .options import opt, split_list

D = DecoupleConfig


@app.command()
def decouple(
    model: str = typer.Option("smollm2-135m", help="Built-in 'smollm2-135m', a local HF model dir, a cached HF id, or tiny:<arch>."),
    domains: str = opt(D, "domains"),
    n_groups: int = opt(D, "n_groups"),
    group_size: int = opt(D, "group_size"),
    full: bool = typer.Option(False, "--full", help="Paper scale: 50 groups x 20 = 1000 samples per kind (pool 20000)."),
    # default None: the config's pool size (2000), or 20000 with --full
    pool_size: Optional[int] = opt(D, "pool_size", default=None),
    seed: int = opt(D, "seed"),
    gsm_target: str = opt(D, "gsm_target"),
    method: str = opt(D, "method"),
    steps: int = opt(D, "steps"),
    rule: str = opt(D, "rule"),
    sigma: float = opt(D, "sigma"),
    topk: int = opt(D, "topk"),
    batch_size: int = opt(D, "batch_size"),
    n_boot: int = opt(D, "n_boot"),
    chat: bool = opt(D, "chat"),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu", help="cpu | auto | an accelerator"),
    layout: Optional[str] = typer.Option(None, help="Custom MLP layout for unknown architectures."),
    out: Path = typer.Option(Path("runs/decouple"), help="Output directory (report.json, figures, sets)."),
):
    """Comparative groups (same template / shared content across templates / random) -> per-sample neuron sets ->
    within-group IoU with bootstrap CIs."""
    from rich.table import Table

    from ..stages.decouple import decouple as run_decouple

    kw = dict(domains=split_list(domains), seed=seed, gsm_target=gsm_target, method=method, steps=steps, rule=rule,
              sigma=sigma, topk=topk, batch_size=batch_size, n_boot=n_boot, chat=chat)
    if pool_size:
        kw["pool_size"] = pool_size
    cfg = DecoupleConfig.full(**kw) if full else DecoupleConfig(n_groups=n_groups, group_size=group_size, **kw)
    lm = load_model_from_opts(model, dtype, device, None, layout)
    res = run_decouple(lm, cfg, out)
    s = res.summary()
    t = Table("domain", "groups", "n", "IoU", "95% CI", "chance", title=f"decoupling on {lm.model_id}")
    for dom, d in s.items():
        for kind in ("commonality", "content", "random"):
            v = d["iou"][kind]
            t.add_row(dom, kind, str(d["n_groups"].get(kind, 0)), f"{v['mean']:.3f}",
                      f"[{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]", f"{d['chance_iou']:.4f}")
    print_table(t)
    for dom, d in s.items():
        diff = d["iou"]["commonality_minus_content"]
        console.print(f"{dom}: commonality - content = {diff['mean']:.3f} [{diff['ci'][0]:.3f}, {diff['ci'][1]:.3f}] "
                      f"-> follows commonality: {d['follows_commonality']}")
    console.print(f"wrote {out}/report.json, decouple.json, decouple.safetensors")
