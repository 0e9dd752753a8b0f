"""``caploc contrast`` (contrastive localization from stored scores) and ``caploc generic`` (generic-neuron diagnostics)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..data import load_dataset
from ..results import check_out_dir, read_json
from ..runs import is_run_dir
from ..stages.contrast import add_erase_specificity, resolve_references
from ..stages.contrast import contrast as run_contrast
from ..stages.contrast_rules import ContrastConfig
from ..stages.generic import GenericConfig, find_generic
from .app import app, console, load_model_from_opts, print_neuron_summary, print_table
from .options import opt
from .options import split_list as _split


@app.command()
def contrast(
    run: Path = typer.Argument(..., help="A caploc locate run directory (the target capability)."),
    reference: Optional[str] = typer.Option(None, help="Comma-separated locate run dirs and/or dataset specs (scored "
                                            "with the target's settings first). Default: the built-in capabilities of "
                                            "other kinds (gsm target: facts, rg:letter_counting, rg:sentence_reordering, humaneval)."),
    rule: str = opt(ContrastConfig, "rule"),
    threshold: Optional[float] = opt(ContrastConfig, "threshold"),
    top_n: Optional[int] = opt(ContrastConfig, "top_n"),
    min_target_freq: Optional[float] = opt(ContrastConfig, "min_target_freq"),
    ref_agg: str = opt(ContrastConfig, "ref_agg"),
    ref_min_freq: Optional[float] = opt(ContrastConfig, "ref_min_freq"),
    ref_mode: str = opt(ContrastConfig, "ref_mode"),
    smoothing: float = opt(ContrastConfig, "smoothing"),
    norm: str = opt(ContrastConfig, "norm"),
    max_entropy: float = opt(ContrastConfig, "max_entropy"),
    entropy_quantile: Optional[float] = opt(ContrastConfig, "entropy_quantile"),
    split_seeds: int = typer.Option(5, help="Random 2-splits for split agreement (0 = skip)."),
    ref_n: Optional[int] = typer.Option(None, help="Samples per reference dataset spec (default: as the target)."),
    ref_seed: Optional[int] = typer.Option(None, help="Data seed of reference dataset specs (default: the target's)."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Also erase both sets on these datasets (comma-separated "
                                            "specs; the first is on target) vs layer-matched random sets."),
    eval_n: int = typer.Option(16, help="Samples per --eval dataset."),
    eval_seed: int = typer.Option(1, help="Data seed of --eval datasets (use one not used for localization)."),
    n_random: int = typer.Option(5, help="Random sets per erase comparison."),
    model: Optional[str] = typer.Option(None, help="Model for scoring reference specs / --eval (default: the run's)."),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu", help="cpu | auto | an accelerator"),
    out: Optional[Path] = typer.Option(None, help="Output directory (default RUN/contrast-<rule>)."),
):
    """Contrastive localization: neurons common on the target capability but not on reference capabilities."""
    cfg = ContrastConfig(rule=rule, threshold=threshold, top_n=top_n, min_target_freq=min_target_freq, ref_agg=ref_agg,
                         ref_min_freq=ref_min_freq, ref_mode=ref_mode, smoothing=smoothing, norm=norm,
                         max_entropy=max_entropy, entropy_quantile=entropy_quantile)
    if out is not None:
        check_out_dir(out)
    refs = _split(reference) or None
    lm = None
    needs_model = eval_data is not None or refs is None or any(not is_run_dir(r) for r in refs)
    meta = read_json(run / "neurons.json")
    if needs_model:
        lm = load_model_from_opts(model or meta.get("model_id") or "smollm2-135m", dtype, device, None, None)
    if refs is not None and lm is not None and any(not is_run_dir(r) for r in refs):
        refs = list(resolve_references(run, refs, lm=lm, n=ref_n, seed=ref_seed).values())
    res = run_contrast(run, refs, cfg, out, lm=lm, split_seeds=split_seeds)
    print_neuron_summary(res.neurons, f"{meta.get('dataset')} — {cfg.rule} vs {', '.join(res.references)}")
    t = Table("set", "neurons", "split IoU", "chance IoU", "common on ≥1 ref", "common on all refs", box=None)
    for r in res.table:
        iou = "—" if r["split_iou"] is None else f"{r['split_iou']:.3f} ± {r['split_iou_sd']:.3f}"
        ch = "—" if r["chance_iou"] is None else f"{r['chance_iou']:.2g}"
        t.add_row(r["set"], str(r["n_neurons"]), iou, ch, f"{r['common_elsewhere']:.2f}", f"{r['common_everywhere']:.2f}")
    print_table(t)
    if eval_data:
        specs = _split(eval_data)
        dss = {}
        for s in specs:
            ds = load_dataset(s, n=eval_n, seed=eval_seed)
            dss[ds.name] = ds
        er = add_erase_specificity(res.out_dir, lm, dss, target=next(iter(dss)), n_random=n_random,
                                   chat=bool((meta.get("config") or {}).get("chat")))
        t = Table("set", "neurons", *[f"ΔNLL {k}" for k in dss], *[f"z {k}" for k in dss], "specificity", "SI", box=None)
        for name, r in er["sets"].items():
            t.add_row(name, str(r["n_neurons"]), *[f"{r['delta'][k]:+.3f}" for k in dss],
                      *[f"{r['z'][k]:+.1f}" for k in dss], f"{r.get('specificity', float('nan')):+.3f}",
                      f"{r.get('si', float('nan')):+.2f}")
        print_table(t)
    console.print(f"wrote {res.out_dir}/neurons.json, plain.json, contrast.safetensors, report.json")


@app.command()
def generic(
    runs: Optional[str] = typer.Option(None, help="Comma-separated locate run dirs (selection frequencies)."),
    data: Optional[str] = typer.Option(None, help="Comma-separated dataset specs for activation magnitudes."),
    n: int = typer.Option(16, "--n", "--n-samples", help="Samples per --data dataset."),
    seed: int = typer.Option(0, help="Data seed of --data datasets."),
    model: Optional[str] = typer.Option(None, help="Model (default: the first run's, else smollm2-135m)."),
    massive_ratio: float = opt(GenericConfig, "massive_ratio"),
    massive_top: int = opt(GenericConfig, "massive_top"),
    common_freq: float = opt(GenericConfig, "common_freq"),
    erase: bool = opt(GenericConfig, "erase"),
    erase_min_delta: float = opt(GenericConfig, "erase_min_delta"),
    criteria: str = opt(GenericConfig, "criteria"),
    chat: bool = opt(GenericConfig, "chat", help="Wrap --data prompts in the chat template."),
    batch_size: int = opt(GenericConfig, "batch_size"),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu", help="cpu | auto | an accelerator"),
    out: Path = typer.Option(Path("runs/generic"), help="Output directory."),
):
    """Flag generic neurons: massive activations on every dataset, common on every run, (optionally) erase effects."""
    check_out_dir(out)
    run_list = _split(runs)
    specs = _split(data)
    cfg = GenericConfig(massive_ratio=massive_ratio, massive_top=massive_top, common_freq=common_freq, erase=erase,
                        erase_min_delta=erase_min_delta, criteria=tuple(_split(criteria)), batch_size=batch_size, chat=chat)
    run_dirs = {}
    for r in run_list:
        m = read_json(Path(r) / "neurons.json")
        name = m.get("dataset") or Path(r).name
        run_dirs[name if name not in run_dirs else f"{name}@{Path(r).name}"] = Path(r)
    lm = None
    datasets = {}
    if specs:
        mid = model or (read_json(Path(run_list[0]) / "neurons.json").get("model_id") if run_list else None) or "smollm2-135m"
        lm = load_model_from_opts(mid, dtype, device, None, None)
        for s in specs:
            ds = load_dataset(s, n=n, seed=seed)
            datasets[ds.name] = ds
    rep = find_generic(lm, datasets, run_dirs, cfg)
    rep.save(out)

    t = Table("layer", "index", "generic", "flags", "peak", "peak/typical", *[f"freq {k}" for k in rep.runs], box=None)
    for r in rep.rows[:40]:
        t.add_row(str(r["layer"]), str(r["index"]), "yes" if r["generic"] else "no", ",".join(r["flags"]),
                  f"{r['peak']:.1f}" if "peak" in r else "—", f"{r['peak_ratio']:.0f}" if "peak_ratio" in r else "—",
                  *[f"{r['freq'][k]:.2f}" for k in rep.runs] if "freq" in r else ["—"] * len(rep.runs))
    print_table(t)
    console.print(f"{len(rep.generic_pairs)} generic neurons; wrote {out}/generic.json, neurons.json, report.json")
