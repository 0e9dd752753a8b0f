"""Benchmark: neuron-only vs full fine-tuning step time and peak memory on the same batch (run by hand, not a test).

    nice -n 10 .venv/bin/python benchmarks/finetune.py [--model smollm2-135m] [--neurons runs/locate-gsm]
        [--batch-size 4] [--steps 5] [--warmup 1] [--arms neurons,full,lora] [--device cpu] [--json out.json]

Every arm runs in a fresh subprocess (so peak memory is not inherited from another arm): load the model, record the
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``; tracemalloc does not see torch's allocations) and, on an
accelerator, ``torch.cuda.max_memory_allocated``; then train ``warmup + steps`` AdamW steps with caploc's training
loop on one fixed batch of gsm_symbolic problems and record the peak again. Reported: median step time (wall clock
and this process's CPU time; on a shared machine the CPU time is the robust one), peak RSS,
training overhead (peak after training − peak after loading), trainable parameters and AdamW state elements, and the
ratios neuron-only ÷ full from the same run. Without ``--neurons`` (or when the set is missing) a layer-matched random
set of ``--n-neurons`` neurons spread over all layers is used and said so.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def child(args) -> dict:
    import numpy as np
    import torch

    from caploc.data import encode_dataset, load_dataset, pad_id
    from caploc.hooks import frozen
    from caploc.models.loading import load_model
    from caploc.results import NeuronSet
    from caploc.stages.finetune import FinetuneConfig, NeuronAdapter, train
    from caploc.stages.finetune.experiment import lora_targets
    from caploc.stats import random_layer_matched_set

    torch.manual_seed(0)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    dev = next(lm.model.parameters()).device
    acc = dev.type != "cpu"
    if acc and dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():  # touch every weight page (safetensors loads lazily), so the baseline holds the weights
        float(sum(p.detach().sum() for p in lm.model.parameters()))
    rss_loaded = _rss_mb()
    gpu_loaded = torch.cuda.max_memory_allocated() / 2**20 if acc and dev.type == "cuda" else None

    ds = load_dataset("gsm_symbolic", n=args.batch_size, seed=123)
    enc = encode_dataset(lm.tokenizer, ds)
    n_tokens = sum(len(e.input_ids) for e in enc)
    cfg = FinetuneConfig(arms=(args.arm if args.arm != "random" else "neurons",), steps=args.steps + args.warmup,
                         lr=1e-5 if args.arm == "full" else 1e-3, batch_size=args.batch_size, seed=0)
    pad = pad_id(lm.tokenizer, lm.model.config)
    neuron_note = None
    if args.arm == "neurons":
        ns = None
        if args.neurons and os.path.exists(os.path.join(args.neurons, "neurons.json")):
            ns = NeuronSet.load(args.neurons)
            neuron_note = f"{len(ns)} neurons from {args.neurons}"
        else:
            per = np.full(lm.site.n_layers, args.n_neurons // lm.site.n_layers)
            per[: args.n_neurons % lm.site.n_layers] += 1
            ns = NeuronSet.from_flat(random_layer_matched_set(per, lm.site.d_mlp, 0), lm.site.n_layers, lm.site.d_mlp)
            neuron_note = f"{len(ns)} random neurons (no neuron set given/found)"
        ad = NeuronAdapter(lm, ns)
        with frozen(lm.model):
            tl = train(lm.model, list(ad.deltas.values()), enc, cfg, lr=1e-3, pad_id=pad, desc="neurons",
                       context=lambda: ad.applied(lm.model), progress=False)
    elif args.arm == "full":
        tl = train(lm.model, list(lm.model.parameters()), enc, cfg, lr=1e-5, pad_id=pad, desc="full", progress=False)
    elif args.arm == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(lm.site)
        pm = get_peft_model(lm.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                                 fan_in_fan_out=bool(lm.site.layout.conv1d)))
        tl = train(pm, [p for p in pm.parameters() if p.requires_grad], enc, cfg, lr=1e-3, pad_id=pad, desc="lora",
                   progress=False)
    else:
        raise SystemExit(f"unknown arm {args.arm}")
    if acc and dev.type == "cuda":
        torch.cuda.synchronize()
    times = tl.step_seconds[args.warmup:]
    return {
        "arm": args.arm, "model": args.model, "device": str(dev), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "batch_tokens": n_tokens, "steps_timed": len(times),
        "step_s_median": float(np.median(times)), "step_s_all": [round(t, 4) for t in times],
        "step_cpu_s_median": float(np.median(tl.step_cpu_seconds[args.warmup:])),
        "step_cpu_s_all": [round(t, 4) for t in tl.step_cpu_seconds[args.warmup:]],
        "rss_after_load_mb": rss_loaded, "rss_peak_mb": _rss_mb(), "train_overhead_mb": _rss_mb() - rss_loaded,
        "gpu_peak_after_load_mb": gpu_loaded,
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if acc and dev.type == "cuda" else None,
        "n_trainable": tl.n_trainable, "n_optimizer_state": tl.n_optimizer_state, "losses": tl.losses,
        "neurons": neuron_note,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--neurons", default="runs/locate-gsm")
    ap.add_argument("--n-neurons", type=int, default=60, help="size of the fallback random set")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--arms", default="neurons,full")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.arm = args.child
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    results = {}
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        cmd = [sys.executable, __file__, "--child", arm] + [x for k, v in vars(args).items()
                                                            if k not in ("child", "arms", "json") and v is not None
                                                            for x in (f"--{k.replace('_', '-')}", str(v))]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(f"{arm}: failed (rc {p.returncode})\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        results[arm] = json.loads(line[0][7:])
        r = results[arm]
        print(f"{arm:8s} step {r['step_s_median']:.3f} s wall / {r['step_cpu_s_median']:.3f} s CPU (median of "
              f"{r['steps_timed']}, {r['threads']} threads, {r['batch_tokens']} tokens), peak RSS {r['rss_peak_mb']:.0f} MB "
              f"(after load {r['rss_after_load_mb']:.0f} MB, training +{r['train_overhead_mb']:.0f} MB)"
              + (f", GPU peak {r['gpu_peak_mb']:.0f} MB" if r.get("gpu_peak_mb") else "")
              + f", trainable {r['n_trainable']:,}, AdamW state {r['n_optimizer_state']:,}  [{time.time() - t0:.0f} s]"
              + (f"  ({r['neurons']})" if r.get("neurons") else ""), flush=True)
    ratios = {}
    for arm in ("neurons", "lora"):
        if arm in results and "full" in results:
            a, f = results[arm], results["full"]
            ratios[f"{arm}/full"] = {
                "step_time_wall": a["step_s_median"] / f["step_s_median"],
                "step_time_cpu": a["step_cpu_s_median"] / f["step_cpu_s_median"],
                "peak_rss": a["rss_peak_mb"] / f["rss_peak_mb"],
                "train_overhead_rss": a["train_overhead_mb"] / max(f["train_overhead_mb"], 1e-9),
                "trainable": a["n_trainable"] / f["n_trainable"],
                "optimizer_state": a["n_optimizer_state"] / f["n_optimizer_state"],
                **({"gpu_peak": a["gpu_peak_mb"] / f["gpu_peak_mb"]} if a.get("gpu_peak_mb") and f.get("gpu_peak_mb")
                   else {}),
            }
            print(f"{arm}/full: " + ", ".join(f"{k} {v:.4g}" for k, v in ratios[f"{arm}/full"].items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "ratios": ratios}, fh, indent=1)


if __name__ == "__main__":
    main()
