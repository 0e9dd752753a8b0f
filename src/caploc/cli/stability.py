"""``caploc stability`` / ``caploc sweep`` / ``caploc crosscap``: agreement of commonality neurons across data splits,
thresholds and capabilities, all from stored per-sample scores (:mod:`caploc.stages.stability`, ``.sweep``,
``.crosscap``). Defaults and help come from the stage configs (:func:`caploc.cli.options.opt`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..attribution.engine import AttributionConfig
from ..config import default_of
from ..data import load_dataset
from ..errors import CaplocError
from ..localize import LocateConfig
from ..report.fmt import fmt, fmt_ci
from ..runs import load_run, locate_run
from ..splits import StabilityConfig
from ..stages.crosscap import CrossCapConfig, default_capabilities
from ..stages.crosscap import crosscap as run_crosscap
from ..stages.stability import stability as run_stability
from ..stages.sweep import SweepConfig
from ..stages.sweep import sweep as run_sweep
from .app import app, console, load_model_from_opts, parse_layers, print_table
from .options import opt, split_list

_N_SEEDS = len(default_of(StabilityConfig, "seeds"))
_SEEDS_HELP = "Number of split seeds (seeds 0..N-1)."
_SWEEP_KINDS = default_of(SweepConfig, "split").kinds


def _floats(text: str | None, what: str) -> list[float]:
    try:
        return split_list(text, float)
    except ValueError:
        raise CaplocError(f"cannot parse --{what} {text!r}; use comma-separated numbers, e.g. 2,4,6") from None


def _ints(text: str | None, what: str) -> list[int]:
    vals = _floats(text, what)
    if any(not v.is_integer() for v in vals):
        raise CaplocError(f"--{what} takes whole numbers, got {text!r}")
    return [int(v) for v in vals]


def _seeds(n_seeds: int) -> list[int]:
    if n_seeds < 1:
        raise CaplocError(f"--seeds must be >= 1, got {n_seeds}")
    return list(range(n_seeds))


def _locate_cfg(method, steps, positions, objective, layers, rule, sigma, topk, kn_t, min_freq, chat, max_length,
                memory_mb, batch_size, shard_size) -> LocateConfig:
    """A fresh LocateConfig: options left unset (None) take the config's defaults."""
    acfg = AttributionConfig(method=method, steps=steps, objective=objective, positions=positions,
                             layers=parse_layers(layers), memory_mb=memory_mb, batch_size=batch_size)
    rule_kw = {k: v for k, v in dict(rule=rule, sigma=sigma, topk=topk, kn_t=kn_t, min_freq=min_freq).items()
               if v is not None}
    return LocateConfig(attribution=acfg, chat=chat, max_length=max_length, shard_size=shard_size, **rule_kw)


def _rule_override(base: LocateConfig, rule, sigma, topk, kn_t, min_freq) -> LocateConfig:
    kw = {k: v for k, v in dict(rule=rule, sigma=sigma, topk=topk, kn_t=kn_t, min_freq=min_freq).items()
          if v is not None}
    return dataclasses.replace(base, **kw) if kw else base


# option factories shared by the verbs (attribution options matter only when something is localized here)
def _o_model():
    return typer.Option("smollm2-135m", help="Model (used only when localizing): smollm2-135m, a dir, tiny:<arch>.")


def _o_rule(what: str = "default: the run's, else sigma"):
    return opt(LocateConfig, "rule", default=None, help=f"Selection rule: sigma | topk | kn ({what}).")


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
    method: str = opt(AttributionConfig, "method", help="Attribution (without --run): ig | grad_x_act | activation."),
    steps: int = opt(AttributionConfig, "steps", help="IG steps."),
    positions: str = opt(AttributionConfig, "positions", help="Scored positions: all | target | last."),
    objective: str = opt(AttributionConfig, "objective", help="logprob | prob."),
    layers: Optional[str] = typer.Option(None, help="Layers to score, e.g. '10-29' (default all)."),
    rule: Optional[str] = _o_rule(),
    sigma: Optional[float] = opt(LocateConfig, "sigma", default=None),
    topk: Optional[int] = opt(LocateConfig, "topk", default=None),
    kn_t: Optional[float] = opt(LocateConfig, "kn_t", default=None),
    min_freq: Optional[float] = opt(LocateConfig, "min_freq", default=None),
    chat: bool = opt(LocateConfig, "chat"), max_length: Optional[int] = opt(LocateConfig, "max_length"),
    memory_mb: float = opt(AttributionConfig, "memory_mb", help="Micro-batch memory budget (MB)."),
    batch_size: int = opt(AttributionConfig, "batch_size", help="Samples per batch (grad_x_act / activation)."),
    shard_size: int = opt(LocateConfig, "shard_size"),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"),
    k: int = opt(StabilityConfig, "k"),
    seeds: int = opt(StabilityConfig, "seeds", default=_N_SEEDS, help=_SEEDS_HELP),
    kinds: str = opt(StabilityConfig, "kinds"),
    null_draws: int = opt(StabilityConfig, "null_draws"),
    n_boot: int = opt(StabilityConfig, "n_boot"),
    out: Path = typer.Option(Path("runs/stability"), help="Output directory."),
):
    """Agreement of the commonality neurons located on disjoint splits (random / template-disjoint) vs chance."""
    scfg = StabilityConfig(k=k, seeds=_seeds(seeds), kinds=split_list(kinds), null_draws=null_draws, n_boot=n_boot)
    if run is not None:
        if data is not None:
            raise CaplocError("give either --run DIR (stored scores) or --data SPEC (localize first), not both")
        srun = load_run(run)
        cfg = _rule_override(srun.config, rule, sigma, topk, kn_t, min_freq)
    else:
        if data is None:
            raise CaplocError("give --run DIR (a `caploc locate` output) or --data SPEC to localize first")
        cfg = _locate_cfg(method, steps, positions, objective, layers, rule, sigma, topk, kn_t, min_freq, chat,
                          max_length, memory_mb, batch_size, shard_size)
        ds = load_dataset(data, n=n, seed=seed, target=target, prompt_field=prompt_field, target_field=target_field,
                          group_field=group_field)
        srun = locate_run(load_model_from_opts(model, dtype, device, None, None), ds, cfg, out / "locate")
    res = run_stability(srun, scfg, cfg, out)
    fs = res.full_set
    sp = fs.share_of_params()
    console.print(f"[bold]{res.provenance.get('dataset')}[/] full-data set: {len(fs)} neurons"
                  + (f" ({100 * sp:.5f}% of parameters)" if sp is not None else "") + f", {fs.n_samples} samples")
    t = Table("split kind", "pairs", "set size", "overlap [CI]", "IoU [CI]", "chance IoU", "empty", box=None)
    for kind, s in res.summary.items():
        t.add_row(kind, str(s["n_pairs"]), f"{s['size_mean']:.1f}",
                  fmt_ci(s["overlap"]["mean"], s["overlap"]["lo"], s["overlap"]["hi"]),
                  fmt_ci(s["iou"]["mean"], s["iou"]["lo"], s["iou"]["hi"]), fmt(s["iou"]["chance"], 5),
                  str(s["n_empty_pairs"]))
    print_table(t)
    for kind, why in res.kinds_skipped.items():
        console.print(f"[yellow]skipped {kind} splits:[/] {why}")
    console.print(f"wrote {out}/report.json, stability.json, fig_stability.png")


@app.command()
def sweep(
    run: Path = typer.Option(..., help="A `caploc locate` output dir (stored scores)."),
    sigmas: str = opt(SweepConfig, "sigmas"),
    min_freqs: str = opt(SweepConfig, "min_freqs"),
    topks: str = opt(SweepConfig, "topks"),
    sizes: str = opt(SweepConfig, "sizes"),
    axes: str = typer.Option("sigma,min_freq,topk", help="Which knobs to sweep (also: n_samples, with --sizes)."),
    k: int = opt(StabilityConfig, "k"),
    seeds: int = opt(StabilityConfig, "seeds", default=_N_SEEDS, help=_SEEDS_HELP),
    kinds: str = opt(StabilityConfig, "kinds", default=_SWEEP_KINDS),  # the sweep's own split default
    n_boot: int = opt(StabilityConfig, "n_boot"),
    out: Path = typer.Option(Path("runs/sweep"), help="Output directory."),
):
    """Set size, share of parameters and split agreement vs sigma, S and top-k (no new attributions)."""
    scfg = StabilityConfig(k=k, seeds=_seeds(seeds), kinds=split_list(kinds), null_draws=0, n_boot=n_boot)
    sw = SweepConfig(sigmas=_floats(sigmas, "sigmas"), min_freqs=_floats(min_freqs, "min-freqs"),
                     topks=_ints(topks, "topks"), sizes=_ints(sizes, "sizes"), split=scfg)
    ax = split_list(axes)
    if sw.sizes and "n_samples" not in ax:
        ax.append("n_samples")
    res = run_sweep(load_run(run, want_groups="group" in scfg.kinds), sw, out, axes=tuple(ax))
    t = Table("axis", "value", "S", "neurons", "split sets", "IoU [CI]", "chance IoU", box=None)
    for p in res.points:
        a = p["agreement"].get(scfg.kinds[0]) or {}
        val = p["min_freq"] if p["axis"] == "min_freq" else p["n_samples"] if p["axis"] == "n_samples" \
            else p["rule_value"]
        t.add_row(p["axis"], f"{val:g}", str(p["min_count"]), str(p["n_neurons"]), fmt(a.get("size_mean"), 1),
                  fmt_ci(a.get("iou"), a.get("iou_lo"), a.get("iou_hi")), fmt(a.get("chance_iou"), 5))
    print_table(t)
    console.print(f"wrote {out}/report.json, sweep.json, fig_sweep_*.png")


def _pairs(items: list[str], what: str, example: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise CaplocError(f"{what} {item!r} is not NAME=VALUE (e.g. {example})")
        nm, v = item.split("=", 1)
        out[nm.strip()] = v.strip()
    return out


@app.command()
def crosscap(
    caps: Optional[str] = typer.Option(None, help="NAME=SPEC,... capabilities to localize (default: gsm_symbolic, "
                                                  "rg:basic_arithmetic, humaneval, rg:sentence_reordering, facts)."),
    run: List[str] = typer.Option([], help="NAME=DIR: an existing locate run for a capability (repeatable)."),
    fields: List[str] = typer.Option([], help="NAME:prompt=COL,target=COL,group=COL: the columns of capability NAME's "
                                     "data file (repeatable; default: detected from the column names)."),
    run_samples: Optional[int] = opt(CrossCapConfig, "run_samples"),
    model: str = _o_model(),
    n: int = opt(CrossCapConfig, "n", "--n", "--n-samples"),
    seed: int = opt(CrossCapConfig, "seed"), target: str = opt(CrossCapConfig, "target"),
    method: str = opt(AttributionConfig, "method", help="Attribution: ig | grad_x_act | activation."),
    steps: int = opt(AttributionConfig, "steps", help="IG steps."),
    positions: str = opt(AttributionConfig, "positions", help="Scored positions: all | target | last."),
    objective: str = opt(AttributionConfig, "objective", help="logprob | prob."),
    layers: Optional[str] = typer.Option(None, help="Layers to score, e.g. '10-29' (default all)."),
    rule: Optional[str] = _o_rule("default: sigma; the same rule for every capability"),
    sigma: Optional[float] = opt(LocateConfig, "sigma", default=None),
    topk: Optional[int] = opt(LocateConfig, "topk", default=None),
    kn_t: Optional[float] = opt(LocateConfig, "kn_t", default=None),
    min_freq: Optional[float] = opt(LocateConfig, "min_freq", default=None),
    chat: bool = opt(LocateConfig, "chat"), max_length: Optional[int] = opt(LocateConfig, "max_length"),
    memory_mb: float = opt(AttributionConfig, "memory_mb", help="Micro-batch memory budget (MB)."),
    batch_size: int = opt(AttributionConfig, "batch_size", help="Samples per batch (grad_x_act / activation)."),
    shard_size: int = opt(LocateConfig, "shard_size"),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"),
    k: int = opt(StabilityConfig, "k", help="Splits for the within-capability diagonal."),
    seeds: int = opt(StabilityConfig, "seeds", default=_N_SEEDS, help=_SEEDS_HELP),
    n_boot: int = opt(StabilityConfig, "n_boot"),
    out: Path = typer.Option(Path("runs/crosscap"), help="Output directory."),
):
    """Pairwise overlap / IoU of the commonality neurons of several capabilities, with chance levels."""
    notes: list[str] = []
    if caps:
        capabilities = _pairs(split_list(caps), "--caps item", "math=gsm_symbolic")
    elif run:
        capabilities = {}
    else:
        capabilities, notes = default_capabilities()
    for item in fields:
        nm, _, spec = item.partition(":")
        if nm.strip() not in capabilities:
            raise CaplocError(f"--fields {item!r} names no capability of --caps ({', '.join(capabilities) or 'none'})")
        cols = _pairs(split_list(spec), "--fields item", "sent:prompt=text,target=label")
        bad = sorted(set(cols) - {"prompt", "target", "group"})
        if bad:
            raise CaplocError(f"--fields {item!r}: unknown column kind {bad[0]!r}; use prompt=, target= and group=")
        capabilities[nm.strip()] = {"data": capabilities[nm.strip()], **{f"{k}_field": v for k, v in cols.items()}}
    runs = {nm: Path(d) for nm, d in _pairs(run, "--run", "math=runs/locate").items()}
    cfg = _locate_cfg(method, steps, positions, objective, layers, rule, sigma, topk, kn_t, min_freq, chat, max_length,
                      memory_mb, batch_size, shard_size)
    config = CrossCapConfig(n=n, seed=seed, target=target, run_samples=run_samples,
                            split=StabilityConfig(k=k, seeds=_seeds(seeds), kinds=["random"], null_draws=0,
                                                  n_boot=n_boot))
    res = run_crosscap(capabilities, cfg, out, config, runs=runs, notes=notes,
                       lm_factory=lambda: load_model_from_opts(model, dtype, device, None, None))
    t = Table("", *res.names, box=None, title="IoU (diagonal: split IoU); chance in parentheses")
    for i, a in enumerate(res.names):
        t.add_row(f"{a} ({res.sizes[i]})", *[f"{fmt(res.iou[i, j], 2)} ({fmt(res.chance_iou[i, j], 4)})"
                                             for j in range(len(res.names))])
    print_table(t)
    for note in res.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"wrote {out}/report.json, crosscap.json, fig_crosscap.png")
