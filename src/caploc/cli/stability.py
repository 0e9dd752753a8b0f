"""``caploc stability`` / ``caploc sweep`` / ``caploc crosscap``: agreement of commonality neurons across data splits,
thresholds and capabilities, all from stored per-sample scores."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import CaplocError
from .app import app, console, load_model_from_opts, parse_layers


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None or not text.strip():
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CaplocError(f"cannot parse --{what} {text!r}; use comma-separated numbers, e.g. 2,4,6") from None


def _kinds(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def _seeds(n_seeds: int) -> list[int]:
    if n_seeds < 1:
        raise CaplocError(f"--seeds must be >= 1, got {n_seeds}")
    return list(range(n_seeds))


def _locate_cfg(method, steps, positions, objective, layers, rule, sigma, topk, kn_t, min_freq, chat, max_length,
                memory_mb, batch_size, shard_size):
    from ..attribution.engine import AttributionConfig
    from ..localize import LocateConfig

    acfg = AttributionConfig(method=method, steps=steps, objective=objective, positions=positions,
                             layers=parse_layers(layers), memory_mb=memory_mb, batch_size=batch_size)
    return LocateConfig(attribution=acfg, rule=rule or "sigma", sigma=6.0 if sigma is None else sigma,
                        topk=50 if topk is None else topk, kn_t=0.2 if kn_t is None else kn_t,
                        min_freq=0.5 if min_freq is None else min_freq, chat=chat, max_length=max_length,
                        shard_size=shard_size)


def _rule_override(base, rule, sigma, topk, kn_t, min_freq):
    import dataclasses

    kw = {k: v for k, v in dict(rule=rule, sigma=sigma, topk=topk, kn_t=kn_t, min_freq=min_freq).items()
          if v is not None}
    return dataclasses.replace(base, **kw) if kw else base


# option factories (shared by the verbs)
def _o_model():
    return typer.Option("smollm2-135m", help="Model (used only when localizing): smollm2-135m, a dir, tiny:<arch>.")


@app.command()
def stability(
    run: Optional[Path] = typer.Option(None, help="A `caploc locate` output dir (its stored scores are reused)."),
    model: str = _o_model(),
    data: Optional[str] = typer.Option(None, help="Without --run: dataset spec to localize first (into OUT/locate)."),
    n: Optional[int] = typer.Option(None, "--n", "--n-samples", help="Samples (without --run)."),
    seed: int = typer.Option(0, help="Data seed (without --run)."),
    target: str = typer.Option("cot", help="gsm_symbolic target: cot | answer."),
    prompt_field: Optional[str] = typer.Option(None), target_field: Optional[str] = typer.Option(None),
    group_field: Optional[str] = typer.Option(None, help="Data files: the column holding the group / template."),
    method: str = typer.Option("ig", help="Attribution (without --run): ig | grad_x_act | activation."),
    steps: int = typer.Option(20), positions: str = typer.Option("all"), objective: str = typer.Option("logprob"),
    layers: Optional[str] = typer.Option(None),
    rule: Optional[str] = typer.Option(None, help="Selection rule (default: the run's, else sigma)."),
    sigma: Optional[float] = typer.Option(None), topk: Optional[int] = typer.Option(None),
    kn_t: Optional[float] = typer.Option(None),
    min_freq: Optional[float] = typer.Option(None, help="Frequency threshold S (fraction <= 1 or count)."),
    chat: bool = typer.Option(False), max_length: Optional[int] = typer.Option(None),
    memory_mb: float = typer.Option(2048), batch_size: int = typer.Option(8), shard_size: int = typer.Option(16),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"),
    k: int = typer.Option(2, help="Disjoint splits per seed."),
    seeds: int = typer.Option(5, help="Number of split seeds (0..N-1)."),
    kinds: str = typer.Option("random,group", help="Split kinds: random, group (group/template-disjoint)."),
    null_draws: int = typer.Option(500, help="Monte Carlo random-set pairs per split pair (0 = exact chance only)."),
    n_boot: int = typer.Option(2000),
    out: Path = typer.Option(Path("runs/stability"), help="Output directory."),
):
    """Agreement of the commonality neurons located on disjoint splits (random / template-disjoint) vs chance."""
    from ..stability import StabilityConfig, load_run, locate_run
    from ..stability import stability as run_stability

    scfg = StabilityConfig(k=k, seeds=_seeds(seeds), kinds=_kinds(kinds), null_draws=null_draws, n_boot=n_boot)
    if run is not None:
        if data is not None:
            raise CaplocError("give either --run DIR (stored scores) or --data SPEC (localize first), not both")
        srun = load_run(run)
        cfg = _rule_override(srun.config, rule, sigma, topk, kn_t, min_freq)
    else:
        if data is None:
            raise CaplocError("give --run DIR (a `caploc locate` output) or --data SPEC to localize first")
        from ..data import load_dataset

        cfg = _locate_cfg(method, steps, positions, objective, layers, rule, sigma, topk, kn_t, min_freq, chat,
                          max_length, memory_mb, batch_size, shard_size)
        ds = load_dataset(data, n=n, seed=seed, target=target, prompt_field=prompt_field, target_field=target_field,
                          group_field=group_field)
        lm = load_model_from_opts(model, dtype, device, None, None)
        srun = locate_run(lm, ds, cfg, out / "locate")
    res = run_stability(srun, scfg, cfg, out)
    _print_stability(res)
    console.print(f"wrote {out}/report.json, stability.json, fig_stability.png")


def _print_stability(res) -> None:
    from rich.table import Table

    from ..stability import _fmt, _fmt_ci

    fs = res.full_set
    sp = fs.share_of_params()
    console.print(f"[bold]{res.provenance.get('dataset')}[/] full-data set: {len(fs)} neurons"
                  + (f" ({100 * sp:.5f}% of parameters)" if sp is not None else "") + f", {fs.n_samples} samples")
    t = Table("split kind", "pairs", "set size", "overlap [CI]", "IoU [CI]", "chance IoU", "empty", box=None)
    for kind, s in res.summary.items():
        t.add_row(kind, str(s["n_pairs"]), f"{s['size_mean']:.1f}",
                  _fmt_ci(s["overlap"]["mean"], s["overlap"]["lo"], s["overlap"]["hi"]),
                  _fmt_ci(s["iou"]["mean"], s["iou"]["lo"], s["iou"]["hi"]), _fmt(s["iou"]["chance"], 5),
                  str(s["n_empty_pairs"]))
    console.print(t)
    for kind, why in res.kinds_skipped.items():
        console.print(f"[yellow]skipped {kind} splits:[/] {why}")


@app.command()
def sweep(
    run: Path = typer.Option(..., help="A `caploc locate` output dir (stored scores)."),
    sigmas: str = typer.Option("2,3,4,5,6,8,10", help="sigma values (per-sample rule)."),
    min_freqs: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95,1.0", help="S values (fractions or counts)."),
    topks: str = typer.Option("10,25,50,100,200,500", help="top-k values."),
    sizes: str = typer.Option("", help="n_samples axis: sample counts (the first N stored samples), e.g. 32,64,96."),
    axes: str = typer.Option("sigma,min_freq,topk", help="Which knobs to sweep (also: n_samples, with --sizes)."),
    k: int = typer.Option(2), seeds: int = typer.Option(5), kinds: str = typer.Option("random"),
    n_boot: int = typer.Option(2000),
    out: Path = typer.Option(Path("runs/sweep"), help="Output directory."),
):
    """Set size, share of parameters and split agreement vs sigma, S and top-k (no new attributions)."""
    from ..stability import StabilityConfig, SweepConfig, load_run
    from ..stability import sweep as run_sweep

    scfg = StabilityConfig(k=k, seeds=_seeds(seeds), kinds=_kinds(kinds), null_draws=0, n_boot=n_boot)
    sw = SweepConfig(sigmas=_floats(sigmas, "sigmas") or [], min_freqs=_floats(min_freqs, "min-freqs") or [],
                     topks=[int(x) for x in _floats(topks, "topks") or []],
                     sizes=[int(x) for x in _floats(sizes, "sizes") or []], split=scfg)
    ax = _kinds(axes)
    if sw.sizes and "n_samples" not in ax:
        ax.append("n_samples")
    srun = load_run(run, want_groups="group" in scfg.kinds)
    res = run_sweep(srun, sw, out, axes=tuple(ax))
    from rich.table import Table

    from ..stability import _fmt, _fmt_ci

    t = Table("axis", "value", "S", "neurons", "split sets", "IoU [CI]", "chance IoU", box=None)
    for p in res.points:
        a = p["agreement"].get(scfg.kinds[0]) or {}
        val = p["min_freq"] if p["axis"] == "min_freq" else p["n_samples"] if p["axis"] == "n_samples" \
            else p["rule_value"]
        t.add_row(p["axis"], f"{val:g}", str(p["min_count"]), str(p["n_neurons"]),
                  _fmt(a.get("size_mean"), 1),
                  _fmt_ci(a.get("iou"), a.get("iou_lo"), a.get("iou_hi")), _fmt(a.get("chance_iou"), 5))
    console.print(t)
    console.print(f"wrote {out}/report.json, sweep.json, fig_sweep_*.png")


@app.command()
def crosscap(
    caps: Optional[str] = typer.Option(None, help="NAME=SPEC,... capabilities to localize (default: gsm_symbolic, "
                                                  "rg:basic_arithmetic, humaneval, rg:sentence_reordering, facts)."),
    run: List[str] = typer.Option([], help="NAME=DIR: an existing locate run for a capability (repeatable)."),
    run_samples: Optional[int] = typer.Option(None, help="Use only the first N stored samples of each --run dir "
                                                         "(to match --n; the loaders' first N samples)."),
    model: str = _o_model(),
    n: int = typer.Option(32, "--n", "--n-samples", help="Samples per capability."),
    seed: int = typer.Option(0), target: str = typer.Option("cot"),
    method: str = typer.Option("ig"), steps: int = typer.Option(20), positions: str = typer.Option("all"),
    objective: str = typer.Option("logprob"), layers: Optional[str] = typer.Option(None),
    rule: Optional[str] = typer.Option(None), sigma: Optional[float] = typer.Option(None),
    topk: Optional[int] = typer.Option(None), kn_t: Optional[float] = typer.Option(None),
    min_freq: Optional[float] = typer.Option(None),
    chat: bool = typer.Option(False), max_length: Optional[int] = typer.Option(None),
    memory_mb: float = typer.Option(2048), batch_size: int = typer.Option(8), shard_size: int = typer.Option(16),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"),
    k: int = typer.Option(2, help="Splits for the within-capability diagonal."),
    seeds: int = typer.Option(5), n_boot: int = typer.Option(2000),
    out: Path = typer.Option(Path("runs/crosscap"), help="Output directory."),
):
    """Pairwise overlap / IoU of the commonality neurons of several capabilities, with chance levels."""
    from ..stability import StabilityConfig, default_capabilities
    from ..stability import crosscap as run_crosscap

    notes: list[str] = []
    if caps:
        capabilities = {}
        for item in caps.split(","):
            if "=" not in item:
                raise CaplocError(f"--caps item {item!r} is not NAME=SPEC (e.g. math=gsm_symbolic)")
            nm, spec = item.split("=", 1)
            capabilities[nm.strip()] = spec.strip()
    elif run:
        capabilities = {}
    else:
        capabilities, notes = default_capabilities()
    runs = {}
    for item in run:
        if "=" not in item:
            raise CaplocError(f"--run {item!r} is not NAME=DIR")
        nm, d = item.split("=", 1)
        runs[nm.strip()] = Path(d.strip())
    cfg = _locate_cfg(method, steps, positions, objective, layers, rule, sigma, topk, kn_t, min_freq, chat, max_length,
                      memory_mb, batch_size, shard_size)
    scfg = StabilityConfig(k=k, seeds=_seeds(seeds), kinds=["random"], null_draws=0, n_boot=n_boot)
    res = run_crosscap(capabilities, cfg, out, lm_factory=lambda: load_model_from_opts(model, dtype, device, None, None),
                       runs=runs, run_samples=run_samples, n=n, seed=seed, target=target, scfg=scfg, notes=notes)
    from rich.table import Table

    from ..stability import _fmt

    t = Table("", *res.names, box=None, title="IoU (diagonal: split IoU); chance in parentheses")
    for i, a in enumerate(res.names):
        t.add_row(f"{a} ({res.sizes[i]})", *[f"{_fmt(res.iou[i, j], 2)} ({_fmt(res.chance_iou[i, j], 4)})"
                                             for j in range(len(res.names))])
    console.print(t)
    for note in res.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"wrote {out}/report.json, crosscap.json, fig_crosscap.png")
