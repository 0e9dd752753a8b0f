"""``caploc finetune``: neuron-only fine-tuning vs random neurons / full / LoRA; ``--merge`` writes a merged model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, console, load_model_from_opts


@app.command()
def finetune(
    model: Optional[str] = typer.Option(None, help="Built-in 'smollm2-135m' (default), a local HF model dir, a cached HF id, or tiny:<arch>. With --merge: the adapter's recorded base model unless given."),
    neurons: Optional[Path] = typer.Option(None, help="Neuron set directory (caploc locate --out) for the neurons/random arms."),
    data: str = typer.Option("gsm_symbolic", help="Training data: gsm_symbolic | rg:<task> | facts | humaneval | a file."),
    n_train: int = typer.Option(64, help="Training samples."),
    n_eval: int = typer.Option(32, help="Samples per evaluation set (held-out samples, held-out templates, each --eval-data)."),
    seed: int = typer.Option(0, help="Seed of the data splits, batch order and random control sets."),
    data_seed: int = typer.Option(1, help="Seed of the generated/subsampled data pool (different from the localization seed by default)."),
    target: str = typer.Option("cot", help="gsm_symbolic target: cot or answer."),
    steps: int = typer.Option(20, help="Optimizer steps per arm."),
    lr: float = typer.Option(1e-3, help="Learning rate (all arms unless --full-lr/--lora-lr)."),
    full_lr: Optional[float] = typer.Option(None, help="Learning rate of the full arm (default: --lr)."),
    lora_lr: Optional[float] = typer.Option(None, help="Learning rate of the lora arm (default: --lr)."),
    batch_size: int = typer.Option(4, help="Training batch size."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping (0 = off)."),
    warmup_steps: int = typer.Option(0), schedule: str = typer.Option("constant", help="constant | linear"),
    arms: str = typer.Option("neurons,random,full", help="Comma list of neurons, random, full, lora."),
    n_random: int = typer.Option(3, help="Random layer-matched neuron sets (one arm each)."),
    lora_r: int = typer.Option(8), lora_alpha: float = typer.Option(16.0),
    eval_data: str = typer.Option("facts,rg:basic_arithmetic", help="Comma list of off-target datasets ('' for none)."),
    metrics: str = typer.Option("nll", help="nll and/or accuracy (comma list; accuracy generates and is slow)."),
    eval_batch_size: int = typer.Option(8),
    chat: bool = typer.Option(False, help="Wrap prompts in the tokenizer's chat template."),
    max_length: Optional[int] = typer.Option(None, help="Refuse samples longer than this many tokens."),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu", help="cpu | auto | an accelerator"),
    device_map: Optional[str] = typer.Option(None), layout: Optional[str] = typer.Option(None),
    merge: Optional[Path] = typer.Option(None, help="Adapter directory to merge into its base model (writes --out as a plain transformers model)."),
    out: Path = typer.Option(Path("runs/finetune"), help="Output directory (finished arms are checkpointed; the same command resumes)."),
    overwrite: bool = typer.Option(False, help="Recompute arms whose checkpoints in --out were made with another configuration."),
):
    """Fine-tune only the located neurons' parameters and compare with random neurons, full fine-tuning and LoRA."""
    from ..errors import CaplocError

    if merge is not None:
        from ..finetune import merge_to_dir

        with console.status(f"merging {merge} ...", spinner="dots"):
            path = merge_to_dir(merge, out, model=model, dtype=dtype, device=device, layout=layout)
        console.print(f"wrote merged model to {path} (load it with AutoModelForCausalLM.from_pretrained)")
        return

    from ..data import load_dataset
    from ..evaluate import rebuild_dataset
    from ..finetune import FinetuneConfig, split_for_finetune
    from ..finetune import finetune as run_finetune
    from ..results import NeuronSet

    cfg = FinetuneConfig(arms=arms, steps=steps, lr=lr, full_lr=full_lr, lora_lr=lora_lr, batch_size=batch_size,
                         max_grad_norm=max_grad_norm, warmup_steps=warmup_steps, schedule=schedule, n_random=n_random,
                         seed=seed, lora_r=lora_r, lora_alpha=lora_alpha, chat=chat, max_length=max_length,
                         eval_batch_size=eval_batch_size,
                         metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()))
    ns = NeuronSet.load(neurons) if neurons is not None else None
    if ns is None and any(a in cfg.arms for a in ("neurons", "random")):
        raise CaplocError("the neurons and random arms need --neurons DIR (or pass --arms full,lora)")
    exclude = None
    if ns is not None and ns.meta.get("dataset_source"):
        exclude = rebuild_dataset(ns.meta["dataset_source"], ns.meta.get("dataset_fingerprint"))
    # enough data for train + held-out samples + held-out templates
    pool_n = 3 * (n_train + 2 * n_eval) if data == "gsm_symbolic" or data.startswith("rg:") else None
    pool = load_dataset(data, n=pool_n, seed=data_seed, target=target)
    parts = split_for_finetune(pool, n_train, n_eval, seed=seed, exclude=exclude)
    eval_sets = {f"{data}:{k}": v for k, v in parts.items() if k != "train"}
    for spec in [s.strip() for s in eval_data.split(",") if s.strip()]:
        if spec in eval_sets:
            continue
        eval_sets[spec] = load_dataset(spec, n=n_eval, seed=data_seed + 100)
    lm = load_model_from_opts(model or "smollm2-135m", dtype, device, device_map, layout)
    res = run_finetune(lm, ns, parts["train"], cfg, out, eval_sets=eval_sets,
                       on_target=[k for k in eval_sets if k.startswith(f"{data}:")], overwrite=overwrite)

    from rich.table import Table

    names = list(res.untuned)
    t = Table("arm", "trainable", *[f"Δ {d}" for d in names], "loss first→last", title="ΔNLL/token (after − untuned)")
    t.add_row("untuned", "0", *[f"{res.untuned[d]['nll']:.4f} (abs)" for d in names], "")
    for a in res.arms:
        t.add_row(a.name, f"{a.n_trainable:,}", *[f"{a.eval[d]['delta']:+.4f}" for d in names],
                  f"{a.losses[0]:.3f}→{a.losses[-1]:.3f}")
    console.print(t)
    c = res.claims.get("finetune_beats_random")
    if c:
        console.print(f"neurons vs random on {c['dataset']}: {c['value']:+.4f} vs {c['null_mean']:+.4f} "
                      f"(z={c['z']:.2f}, p={c['p']:.3f}, n={c['n_null']}) → beats every random set: {c['beats']}"
                      if c.get("null_mean") is not None else f"neurons on {c['dataset']}: {c['value']:+.4f}")
    console.print(f"wrote {out}/report.json, results.json, curves.safetensors, fig_loss.png, fig_delta.png"
                  + (", adapter/" if "neurons" in cfg.arms else ""))
