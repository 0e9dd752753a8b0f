"""``caploc eval``: NLL per target token and accuracy, untouched and (optionally) under an intervention."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import CaplocError
from ..evalsets import eval_sets
from ..measure import METRICS
from ..neurons import gain_for
from ..results import NeuronSet, check_out_dir
from ..stages.evaluate import EvalConfig, run_eval
from .app import app, console, load_model_from_opts, print_table
from .options import opt, split_list


def load_neurons_and_model(neurons: Optional[Path], model: Optional[str], dtype: str, device: str,
                           device_map: Optional[str], layout: Optional[str]):
    """(NeuronSet or None, LoadedModel); the model defaults to the one the neurons were localized on."""
    ns = NeuronSet.load(neurons) if neurons is not None else None
    name = model or (ns.meta.get("model_id") if ns is not None else None) or "smollm2-135m"
    lm = load_model_from_opts(name, dtype, device, device_map, layout)
    if ns is not None:
        ns.check_compatible(lm.site)
        want = ns.meta.get("model_fingerprint")
        if want and want != lm.info.get("fingerprint"):
            console.print(f"[yellow]warning:[/] the neurons were localized on a model with fingerprint {want}, "
                          f"this one is {lm.info.get('fingerprint')}")
    return ns, lm


def parse_metrics(text: str) -> tuple[str, ...]:
    ms = tuple(split_list(text))
    if not ms or any(m not in METRICS for m in ms):
        raise CaplocError(f"cannot parse --metrics {text!r}; use nll, accuracy or nll,accuracy")
    return ms


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, help="Model (default: the one in --neurons, else smollm2-135m)."),
    data: List[str] = typer.Option(["gsm_symbolic"], "--data", help="Dataset spec; repeat for cross-dataset evaluation. The first is in-domain."),
    n: int = typer.Option(32, "--n", "--n-samples", help="Samples per dataset (per held-out part)."),
    n_off: Optional[int] = typer.Option(None, help="Samples per off-target / cross-dataset dataset (default: --n)."),
    seed: int = typer.Option(1, help="Data seed (use one other than the localization seed)."),
    target: str = typer.Option("cot", help="gsm_symbolic target: cot or answer."),
    neurons: Optional[Path] = typer.Option(None, help="A locate run directory (neurons.json) to intervene on."),
    mode: str = opt(EvalConfig, "mode"),
    k: float = opt(EvalConfig, "k"),
    metrics: str = opt(EvalConfig, "metrics"),
    heldout: bool = typer.Option(True, help="With --neurons: split the first dataset into held-out samples and held-out templates relative to the localization data."),
    chat: bool = opt(EvalConfig, "chat"),
    batch_size: int = opt(EvalConfig, "batch_size"),
    memory_mb: Optional[float] = opt(EvalConfig, "memory_mb"),
    max_length: Optional[int] = opt(EvalConfig, "max_length"),
    max_new_tokens: Optional[int] = opt(EvalConfig, "max_new_tokens"),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"),
    device_map: Optional[str] = typer.Option(None), layout: Optional[str] = typer.Option(None),
    out: Path = typer.Option(Path("runs/eval"), help="Output directory."),
):
    """Evaluate NLL/token and accuracy in-domain (held-out samples and templates) and cross-dataset."""
    from rich.table import Table

    cfg = EvalConfig(metrics=parse_metrics(metrics), mode=mode, k=k, chat=chat, batch_size=batch_size,
                     memory_mb=memory_mb, max_length=max_length, max_new_tokens=max_new_tokens)
    gain_for(cfg.mode, cfg.k)  # validate before loading anything
    check_out_dir(out)
    ns, lm = load_neurons_and_model(neurons, model, dtype, device, device_map, layout)
    entries = eval_sets(data, n=n, seed=seed, neuron_meta=ns.meta if ns is not None else None, heldout=heldout,
                        target=target, n_off=n_off)
    run = run_eval(lm, {lab: ds for lab, ds, _ in entries}, neurons=ns, out_dir=out, cfg=cfg,
                   meta={"neurons": str(neurons) if neurons else None, "data_seed": seed,
                         "roles": {lab: role for lab, _, role in entries}})
    t = Table("dataset", "condition", "n", "NLL/tok", "ΔNLL/tok", "acc", "Δacc", box=None)
    fmt = lambda v, p=4: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    for row in run.rows():
        t.add_row(str(row[0]), str(row[1]), str(row[2]), fmt(row[4]), fmt(row[5]), fmt(row[6], 3), fmt(row[7], 3))
    print_table(t)
    console.print(f"wrote {out}/eval.json, report.json")
