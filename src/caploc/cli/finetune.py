"""``caploc finetune``: neuron-only fine-tuning vs random neurons / full / LoRA; ``--merge`` writes a merged model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..stages.finetune import FinetuneConfig as C
from .app import app, console, load_model_from_opts, print_table
from .options import opt, split_list


@app.command()
def finetune(
    model: Optional[str] = typer.Option(None, help="Built-in 'smollm2-135m' (default), a local HF model dir, a cached HF id, or tiny:<arch>. With --merge: the adapter's recorded base model unless given."),
    neurons: Optional[Path] = typer.Option(None, help="Neuron set directory (caploc locate --out) for the neurons/random arms."),
    data: str = typer.Option("gsm_symbolic", help="Training data: gsm_symbolic | rg:<task> | facts | humaneval | a file."),
    n_train: int = typer.Option(64, help="Training samples (with a learning-rate sweep, a validation part of them is held out of training)."),
    n_eval: int = typer.Option(32, help="Samples per evaluation set (held-out samples, held-out templates, each --eval-data)."),
    data_seed: int = typer.Option(1, help="Seed of the generated/subsampled data pool and evaluation sets (different from the localization seed by default)."),
    target: str = typer.Option("cot", help="gsm_symbolic target: cot or answer."),
    eval_data: str = typer.Option("facts,rg:basic_arithmetic", help="Comma list of off-target datasets ('' for none)."),
    arms: str = opt(C, "arms", "--arms"),
    steps: int = opt(C, "steps", "--steps"),
    lr: float = opt(C, "lr", "--lr"),
    full_lr: Optional[float] = opt(C, "full_lr", "--full-lr"),
    lora_lr: Optional[float] = opt(C, "lora_lr", "--lora-lr"),
    lrs: str = opt(C, "lrs", "--lrs"),
    full_lrs: str = opt(C, "full_lrs", "--full-lrs"),
    lora_lrs: str = opt(C, "lora_lrs", "--lora-lrs"),
    val_fraction: float = opt(C, "val_fraction", "--val-fraction"),
    batch_size: int = opt(C, "batch_size", "--batch-size"),
    max_grad_norm: float = opt(C, "max_grad_norm", "--max-grad-norm"),
    warmup_steps: int = opt(C, "warmup_steps", "--warmup-steps"),
    schedule: str = opt(C, "schedule", "--schedule"),
    n_random: int = opt(C, "n_random", "--n-random"),
    seed: int = opt(C, "seed", "--seed"),
    lora_r: int = opt(C, "lora_r", "--lora-r"),
    lora_alpha: float = opt(C, "lora_alpha", "--lora-alpha"),
    metrics: str = opt(C, "metrics", "--metrics"),
    eval_batch_size: int = opt(C, "eval_batch_size", "--eval-batch-size"),
    memory_mb: Optional[float] = opt(C, "memory_mb", "--memory-mb"),
    chat: bool = opt(C, "chat", "--chat/--no-chat"),
    max_length: Optional[int] = opt(C, "max_length", "--max-length"),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu", help="cpu | auto | an accelerator"),
    device_map: Optional[str] = typer.Option(None), layout: Optional[str] = typer.Option(None),
    merge: Optional[Path] = typer.Option(None, help="Adapter directory to merge into its base model (writes --out as a plain transformers model)."),
    out: Path = typer.Option(Path("runs/finetune"), help="Output directory (finished arms are checkpointed; the same command resumes)."),
    overwrite: bool = typer.Option(False, help="Recompute arms whose checkpoints in --out were made with another configuration."),
):
    """Fine-tune only the located neurons' parameters and compare with random neurons, full fine-tuning and LoRA."""
    from rich.table import Table

    from ..errors import CaplocError
    from ..results import NeuronSet, check_out_dir
    from ..stages.finetune import finetune as run_finetune
    from ..stages.finetune import finetune_data, merge_to_dir

    check_out_dir(out)  # before any work
    if merge is not None:
        with console.status(f"merging {merge} ...", spinner="dots"):
            path = merge_to_dir(merge, out, model=model, dtype=dtype, device=device, layout=layout)
        console.print(f"wrote merged model to {path} (load it with AutoModelForCausalLM.from_pretrained)")
        return

    cfg = C(arms=arms, steps=steps, lr=lr, full_lr=full_lr, lora_lr=lora_lr, lrs=split_list(lrs, float),
            full_lrs=split_list(full_lrs, float), lora_lrs=split_list(lora_lrs, float), val_fraction=val_fraction, batch_size=batch_size, max_grad_norm=max_grad_norm, warmup_steps=warmup_steps,
            schedule=schedule, n_random=n_random, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha, chat=chat,
            max_length=max_length, eval_batch_size=eval_batch_size, memory_mb=memory_mb,
            metrics=split_list(metrics))
    ns = NeuronSet.load(neurons) if neurons is not None else None
    if ns is None and any(a in cfg.arms for a in ("neurons", "random")):
        raise CaplocError("the neurons and random arms need --neurons DIR (or pass --arms full,lora)")
    train, sets, on = finetune_data(data, n_train, n_eval, eval_data=split_list(eval_data), seed=seed,
                                    data_seed=data_seed, target=target,
                                    neuron_meta=ns.meta if ns is not None else None)
    lm = load_model_from_opts(model or "smollm2-135m", dtype, device, device_map, layout)
    res = run_finetune(lm, ns, train, cfg, out, eval_sets=sets, on_target=on, overwrite=overwrite)

    names = list(res.untuned)
    t = Table("arm", "trainable", "lr", *[f"Δ {d}" for d in names], "loss first→last",
              title="ΔNLL/token (after − untuned)")
    t.add_row("untuned", "0", "", *[f"{res.untuned[d]['nll']:.4f} (abs)" for d in names], "")
    for a in res.arms:
        t.add_row(a.name, f"{a.n_trainable:,}", f"{a.lr:g}", *[f"{a.eval[d]['delta']:+.4f}" for d in names],
                  f"{a.losses[0]:.3f}→{a.losses[-1]:.3f}")
    print_table(t)
    if res.meta.get("validation"):
        console.print(f"learning rates chosen by validation NLL on {res.meta['validation']['n']} held-out training "
                      "samples (not the evaluation sets)")
    c = res.claims.get("finetune_beats_random")
    if c:
        console.print(f"neurons vs random on {c['dataset']}: {c['value']:+.4f} vs {c['null_mean']:+.4f} "
                      f"(z={c['z']:.2f}, p={c['p']:.3f}, n={c['n_null']}) → beats every random set: {c['beats']}"
                      if c.get("null_mean") is not None else f"neurons on {c['dataset']}: {c['value']:+.4f}")
    console.print(f"wrote {out}/report.json, results.json, curves.safetensors, fig_loss.png, fig_delta.png"
                  + (", adapter/" if "neurons" in cfg.arms else ""))
