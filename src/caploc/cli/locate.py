"""``caploc locate``: score neurons on a dataset and keep the commonality neurons."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..attribution.engine import AttributionConfig
from ..localize import LocateConfig
from .app import app, console, load_model_from_opts, parse_layers, print_cards, print_neuron_summary
from .options import opt


@app.command()
def locate(
    model: str = typer.Option("smollm2-135m", help="Built-in 'smollm2-135m', a local HF model dir, a cached HF id, or tiny:<arch>."),
    data: str = typer.Option("gsm_symbolic", help="gsm_symbolic | rg:<task> | facts | humaneval | a .json/.jsonl/.csv/.parquet file | a datasets dir."),
    n: Optional[int] = typer.Option(None, "--n", "--n-samples", help="Number of samples (default: the loader's default)."),
    seed: int = typer.Option(0, help="Data seed."),
    target: str = typer.Option("cot", help="gsm_symbolic target: cot (gold chain of thought) or answer."),
    prompt_field: Optional[str] = typer.Option(None), target_field: Optional[str] = typer.Option(None),
    group_field: Optional[str] = typer.Option(None),
    method: str = opt(AttributionConfig, "method"),
    steps: int = opt(AttributionConfig, "steps"),
    alphas: str = opt(AttributionConfig, "alphas"),
    objective: str = opt(AttributionConfig, "objective"),
    positions: str = opt(AttributionConfig, "positions"),
    layers: Optional[str] = typer.Option(None, help="Layers to score, e.g. '10-29' or '0,3,5' (default all)."),
    rule: str = opt(LocateConfig, "rule"),
    sigma: float = opt(LocateConfig, "sigma"),
    topk: int = opt(LocateConfig, "topk"),
    kn_t: float = opt(LocateConfig, "kn_t"),
    min_freq: float = opt(LocateConfig, "min_freq"),
    chat: bool = opt(LocateConfig, "chat"),
    max_length: Optional[int] = opt(LocateConfig, "max_length"),
    memory_mb: Optional[float] = opt(AttributionConfig, "memory_mb"),
    batch_size: int = opt(AttributionConfig, "batch_size"),
    shard_size: int = opt(LocateConfig, "shard_size"),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | auto"),
    device_map: Optional[str] = typer.Option(None, help="accelerate device_map, e.g. auto."),
    layout: Optional[str] = typer.Option(None, help="Custom MLP layout for unknown architectures."),
    out: Path = typer.Option(Path("runs/locate"), help="Output directory."),
    overwrite: bool = typer.Option(False, help="Discard existing shards in --out instead of resuming."),
    kn_json: Optional[Path] = typer.Option(None, help="Also export the set as KN-style [[layer, index], ...] JSON."),
    contrast: str = typer.Option("none", help="Contrastive rule vs --reference: none | subtract | freq-diff | freq-ratio | "
                                 "score-diff | lape (see caploc contrast). The plain set is kept as plain.json."),
    reference: Optional[str] = typer.Option(None, help="Comma-separated reference locate run dirs and/or dataset specs "
                                            "(scored with these settings). Default with --contrast: other built-in capabilities."),
    exclude_generic: bool = typer.Option(False, help="Remove generic neurons (massive activations on every dataset, "
                                         "common on every run; see caploc generic) from the final set."),
    cards: int = typer.Option(10, min=0, help="Neuron cards for the top N neurons (where each fires most in the data), "
                              "printed and written to cards.json; 0 skips them."),
):
    """Localize a capability: per-sample attribution, per-sample selection, dataset-level frequency rule."""
    from ..data import load_dataset
    from ..distributed import dist_info, finalize, init_from_env
    from ..localize import locate as run_locate
    from ..results import check_out_dir

    acfg = AttributionConfig(method=method, steps=steps, alphas=alphas, objective=objective, positions=positions,
                             layers=parse_layers(layers), memory_mb=memory_mb, batch_size=batch_size)
    cfg = LocateConfig(attribution=acfg, rule=rule, sigma=sigma, topk=topk, kn_t=kn_t, min_freq=min_freq, chat=chat,
                       max_length=max_length, shard_size=shard_size)
    check_out_dir(out)  # before the model is loaded
    init_from_env()
    rank, world, local_device = dist_info(device)
    try:
        ds = load_dataset(data, n=n, seed=seed, target=target, prompt_field=prompt_field, target_field=target_field,
                          group_field=group_field)
        lm = load_model_from_opts(model, dtype, local_device, device_map, layout)
        res = run_locate(lm, ds, cfg, out, overwrite=overwrite, rank=rank, world=world)
    finally:
        finalize()
    if res is None:
        return
    if contrast != "none" or exclude_generic:
        from ..stages.contrast import apply_specificity

        n_plain = len(res.neurons)
        refs = [r.strip() for r in reference.split(",") if r.strip()] if reference else None
        res.neurons = apply_specificity(lm, out, ds, contrast_rule=contrast, references=refs,
                                        exclude_generic=exclude_generic)
        console.print(f"specificity: plain set {n_plain} neurons (plain.json) -> final {len(res.neurons)} "
                      f"(contrast={contrast}, exclude_generic={exclude_generic}; see {out}/specificity.json)")
    if kn_json:
        res.neurons.to_kn_json(kn_json)
    top_cards = []
    if cards and len(res.neurons):
        from ..cards import neuron_cards
        from ..results import atomic_write_json

        top_cards = neuron_cards(lm, res.neurons, ds, top=cards, chat=chat, max_length=max_length)
        atomic_write_json(out / "cards.json", {"kind": "neuron_cards", "cards": [c.to_dict() for c in top_cards]})
    print_neuron_summary(res.neurons, f"{ds.name} on {lm.model_id} ({method}, {rule}={cfg.rule_value}, S>={res.summary['min_count']}/{res.summary['n_samples']})")
    if res.summary.get("completeness_rel_gap_mean") is not None:
        console.print(f"IG completeness: median |gap| / |f(a)-f(0)| = {res.summary['completeness_rel_gap_mean']:.3g}")
    if top_cards:
        print_cards(top_cards)
    console.print(f"wrote {out}/neurons.json, neurons.safetensors, summary.json, scores/"
                  + (", cards.json" if top_cards else ""))
