"""``caploc faithfulness`` / ``caploc learn-mask`` / ``caploc fidelity`` / ``caploc stability-gap``: threshold-free
comparison of localization methods, the learned-mask localizer, scorer fidelity and the stability gap."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import CaplocError
from ..stages.faithfulness import FaithConfig
from ..stages.masklearn import MaskConfig
from .app import app, console, load_model_from_opts, print_table
from .options import opt, split_list


def _named(items: list[str] | None, what: str) -> dict[str, Path]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise CaplocError(f"--{what} {it!r}: use NAME=DIR, e.g. --{what} gxa=runs/locate-gsm")
        k, v = it.split("=", 1)
        if k in out:
            raise CaplocError(f"--{what} name {k!r} is given twice")
        out[k.strip()] = Path(v.strip())
    return out


@app.command("learn-mask")
def learn_mask_cmd(
    model: str = typer.Option("smollm2-135m"), data: str = typer.Option("gsm_symbolic", help="On-target data."),
    off: str = typer.Option("facts", help="Comma-separated reference (off-target) data to spare."),
    n: int = typer.Option(16, "--n", help="Training samples per dataset."), seed: int = typer.Option(2),
    target: str = typer.Option("cot"), steps: int = opt(MaskConfig, "steps"), lr: float = opt(MaskConfig, "lr"),
    lam: float = opt(MaskConfig, "lam"), beta: float = opt(MaskConfig, "beta"), fill: str = opt(MaskConfig, "fill"),
    batch_size: int = opt(MaskConfig, "batch_size"), dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"),
    out: Path = typer.Option(Path("runs/mask"), help="Output directory."),
):
    """Learn a continuous removal mask over MLP neurons (weights frozen); save its set as a neuron set."""
    import logging

    from ..data import encode_dataset, load_dataset
    from ..stages.masklearn import learn_mask

    cfg = MaskConfig(steps=steps, lr=lr, lam=lam, beta=beta, fill=fill, batch_size=batch_size, seed=seed)
    lm = load_model_from_opts(model, dtype, device, None, None)
    on = load_dataset(data, n=n, seed=seed, target=target)
    offs = [load_dataset(s, n=n, seed=seed, target=target) for s in split_list(off)]
    enc_on = encode_dataset(lm.tokenizer, on)
    enc_off = [e for ds in offs for e in encode_dataset(lm.tokenizer, ds)]
    logging.getLogger("caploc").setLevel(logging.INFO)
    res = learn_mask(lm, enc_on, enc_off, cfg, meta={
        "model_id": lm.info.get("model_id"), "model_fingerprint": lm.info.get("fingerprint"),
        "dataset": on.name, "dataset_fingerprint": on.fingerprint(), "dataset_source": on.source,
        "reference": [d.name for d in offs], "train_prompts": [s.prompt for s in on] + [s.prompt for d in offs for s in d],
        "params_per_neuron": lm.site.params_per_neuron(), "total_params": lm.site.total_params()})
    res.save(out)
    ns = res.neuron_set()
    console.print(f"learned mask: {len(ns)} neurons with removal > 0.5 ({100 * ns.share_of_neurons():.4f}% of MLP "
                  f"neurons); last step {res.history[-1] if res.history else {}}")
    console.print(f"wrote {out}/mask.safetensors, mask.json, neurons.json")


@app.command()
def faithfulness(
    model: str = typer.Option("smollm2-135m"),
    run: Optional[List[str]] = typer.Option(None, help="NAME=DIR of a locate run (scores; an unfinished run's "
                                                      "finished shards are used). Repeatable."),
    neuron_set: Optional[List[str]] = typer.Option(None, "--set", help="NAME=DIR of a fixed neuron set (e.g. a "
                                                                       "contrast run), shown as a point. Repeatable."),
    mask: Optional[Path] = typer.Option(None, help="A `caploc learn-mask` directory: its ranking and its set."),
    reference: Optional[List[str]] = typer.Option(None, help="NAME=DIR of a locate run on another capability (same "
                                                  "model and scorer): adds each --run's contrastive rankings "
                                                  "(contrast_z, contrast_freq). Repeatable."),
    norms: str = typer.Option("pooled,layer_z", help="Score normalizations for rankings: raw,pooled,layer_z,layer_max."),
    freq: bool = typer.Option(True, help="Also rank by sigma-rule selection frequency (CNL with S swept)."),
    sigma: float = typer.Option(6.0),
    data: str = typer.Option("gsm_symbolic", help="Held-out on-target data."),
    off: str = typer.Option("facts", help="Comma-separated held-out off-target data."),
    n: int = typer.Option(16, "--n", help="Held-out samples per dataset."), seed: int = typer.Option(1),
    target: str = typer.Option("cot"),
    lo: float = opt(FaithConfig, "lo"), hi: float = opt(FaithConfig, "hi"), points: int = opt(FaithConfig, "points"),
    n_random: int = opt(FaithConfig, "n_random"), directions: str = opt(FaithConfig, "directions"),
    erase_fill: str = opt(FaithConfig, "erase_fill"), keep_fill: str = opt(FaithConfig, "keep_fill"),
    batch_size: int = opt(FaithConfig, "batch_size"), memory_mb: Optional[float] = opt(FaithConfig, "memory_mb"),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"),
    out: Path = typer.Option(Path("runs/faithfulness")),
):
    """Erase / keep-only the top-k of each method's ranking over log-spaced budgets; curves, AUCs, random band."""
    import numpy as np

    from ..report.faithfulness import write_report
    from ..results import NeuronSet
    from ..stages.faithfulness import contrast_rankings, encoded_sets, rankings_from_scores
    from ..stages.faithfulness import faithfulness as run_faithfulness
    from ..stages.fidelity import load_partial
    from ..stages.masklearn import MaskResult, mean_activations

    cfg = FaithConfig(lo=lo, hi=hi, points=points, n_random=n_random, seed=0, directions=tuple(split_list(directions)),
                      erase_fill=erase_fill, keep_fill=keep_fill, batch_size=batch_size,
                      memory_mb=memory_mb)
    runs, sets = _named(run, "run"), {k: NeuronSet.load(v) for k, v in _named(neuron_set, "set").items()}
    if not runs and mask is None:
        raise CaplocError("nothing to rank: pass --run NAME=DIR and/or --mask DIR")
    lm = load_model_from_opts(model, dtype, device, None, None)
    ref_dirs = _named(reference, "reference")
    refs = {k: load_partial(v) for k, v in ref_dirs.items()}
    rankings, used = {}, {}
    for name, d in runs.items():
        part = load_partial(d)
        used[name] = {"dir": str(d), "n_samples": int(part["scores"].shape[0]), "of": part["n_total"],
                      "attribution": part["spec"].get("attribution")}
        rankings.update(rankings_from_scores(name, part["scores"], split_list(norms), freq, sigma))
        if refs:
            rankings.update(contrast_rankings(name, part["scores"], {k: r["scores"] for k, r in refs.items()}, sigma))
    for k, r in refs.items():
        used[f"reference:{k}"] = {"dir": str(ref_dirs[k]), "n_samples": int(r["scores"].shape[0]),
                                  "attribution": r["spec"].get("attribution")}
    exclude = set()
    if mask is not None:
        mr = MaskResult.load(mask)
        rankings["mask"] = mr.ranking()
        sets["mask"] = mr.neuron_set()
        exclude = set(mr.meta.get("train_prompts", []))
    specs = [(data, "on")] + [(s, "off") for s in split_list(off)]
    datasets = encoded_sets(lm, specs, n, seed, target=target, exclude_prompts=frozenset(exclude))
    means = None
    if "mean" in (erase_fill, keep_fill):
        means = mean_activations(lm, [e for _, enc, _ in datasets for e in enc])
    res = run_faithfulness(lm, rankings, datasets, cfg, means=means, sets=sets, meta={"runs": used, "mask": str(mask) if mask else None,
              "data_seed": seed, "target": target, "mean_fill_from": "the held-out evaluation tokens (all datasets)"})
    res.save(out)
    write_report(res, out)
    rows = res.summary_rows()
    from rich.table import Table

    t = Table("direction", "dataset", "method", "AUC", "random AUC (mean ± sd)", "z", box=None)
    for r in rows:
        t.add_row(r["direction"], r["dataset"], r["method"], f"{r['auc']:.3f}",
                  f"{r['random_auc_mean']:.3f} ± {r['random_auc_sd']:.3f}" if r["random_auc_sd"] is not None else "-",
                  f"{r['z_vs_random']:.1f}" if r["z_vs_random"] is not None else "-")
    print_table(t)
    console.print(f"budgets k = {np.asarray(res.ks).tolist()}; wrote {out}/faithfulness.json, report.json, "
                  "faithfulness.png")


@app.command()
def fidelity(
    run: List[str] = typer.Option(..., help="NAME=DIR of locate runs over the same samples (e.g. ig=..., gxa=...)."),
    reference: str = typer.Option("ig", help="The reference scorer's NAME."),
    sigma: float = typer.Option(6.0), min_freq: float = typer.Option(0.5), topk: int = typer.Option(100),
    out: Path = typer.Option(Path("runs/fidelity")),
):
    """Per-sample agreement of scorers with a reference (Spearman, sigma-set and top-k Jaccard, commonality IoU)."""
    from ..report.fidelity import write_fidelity_report
    from ..stages.fidelity import fidelity as fid
    from ..stages.fidelity import save_json

    res = fid(_named(run, "run"), reference, sigma=sigma, min_freq=min_freq, topk=topk)
    save_json(res, out / "fidelity.json")
    write_fidelity_report(res, out)
    console.print(f"{res['n_samples']} common samples; vs {reference}:")
    for name, c in res["comparisons"].items():
        console.print(f"  {name}: Spearman {c['spearman']:.3f}; sigma-set Jaccard {c['sigma']['sample_jaccard']}; "
                      f"top-{topk} Jaccard {c['topk']['sample_jaccard']:.3f}; commonality IoU {c['sigma']['common_iou']}")
    console.print(f"wrote {out}/fidelity.json, report.json")


@app.command("stability-gap")
def stability_gap(
    run: List[str] = typer.Option(..., help="NAME=DIR of locate runs (first n samples of each are used)."),
    ns: Optional[str] = typer.Option(None, help="Sample counts, e.g. 8,16,32,64 (default: doubling to all)."),
    sigmas: str = typer.Option("3,6"), min_freqs: str = typer.Option("0.3,0.5,0.95"),
    rules: str = typer.Option("sigma,sigma_layer"), seeds: int = typer.Option(5),
    out: Path = typer.Option(Path("runs/stability-gap")),
):
    """Split IoU vs sample count, scorer, rule and thresholds (from stored scores)."""
    import torch

    from ..report.fidelity import write_stability_report
    from ..stages.fidelity import load_partial, sample_counts, save_json, stability_curve

    rows = []
    for name, d in _named(run, "run").items():
        part = load_partial(d)
        N = int(part["scores"].shape[0])
        if not bool((part["index"] == torch.arange(N)).all()):
            raise CaplocError(f"{d}: the finished samples are not a prefix 0..{N - 1}; wait for earlier shards")
        counts = split_list(ns, int) if ns else sample_counts(N)
        for r in stability_curve(part["scores"], counts, rules=split_list(rules), sigmas=split_list(sigmas, float),
                                 min_freqs=split_list(min_freqs, float), seeds=seeds):
            rows.append({"run": name, "method": (part["spec"].get("attribution") or {}).get("method"), **r})
    res = {"kind": "stability_gap", "rows": rows, "runs": {k: str(v) for k, v in _named(run, "run").items()}}
    save_json(res, out / "stability_gap.json")
    write_stability_report(res, out)
    for r in rows:
        console.print(f"{r['run']} n={r['n_samples']} {r['rule']} sigma={r['sigma']:g} S={r['min_freq']:g}: "
                      f"IoU {r['iou']} (size {r['size_mean']:.1f}, chance {r['iou_chance']})")
    console.print(f"wrote {out}/stability_gap.json, report.json")
