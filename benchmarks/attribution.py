"""Attribution benchmark (run by hand): throughput ratios against baselines measured in the same run.

    .venv/bin/python benchmarks/attribution.py [--model smollm2-135m] [--n 2] [--steps 4] [--threads 2]

Phases, each on the same gsm_symbolic samples (prompt + gold chain of thought):
  (a) bare forward+backward of the objective (gradient w.r.t. the input embeddings, parameters frozen)
  (b) caploc exact per-layer IG (all layers, m steps, all positions)      -- and (b') KN mode (last prompt token)
  (c) a plainly written naive per-layer KN loop: for every layer and step a full forward (all logits) and a backward
  (d) caploc grad_x_act
Checks (b) == (c) (max relative error <= 1e-4) and prints throughput ratios, with the issue's targets:
(b) >= 2x (c), and (d) >= 0.8x (a). Time is process CPU time (robust to other load on the machine) and wall time.
Peak memory: each phase runs in a fresh subprocess and reports its max RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _setup(args):
    import torch

    torch.set_num_threads(args.threads)
    from caploc.data import encode_dataset, load_dataset
    from caploc.models.loading import load_model

    lm = load_model(args.model)
    ds = load_dataset("gsm_symbolic", n=args.n, seed=0)
    enc = encode_dataset(lm.tokenizer, ds)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    return lm, enc


def naive_ig(site, ids, P, steps):
    """Plain KN-style loop: for each layer and step, full forward with the layer scaled, backward to the neurons."""
    import torch

    from caploc.hooks import capture, neuron_hooks

    model = site.model
    ids = torch.tensor(ids)
    inp, labels = ids[:-1], ids[P:]
    with torch.no_grad(), capture(site) as cap:
        model(inp[None])
    out = torch.zeros(site.n_layers, site.d_mlp)
    for l in range(site.n_layers):
        a = cap[l][0]
        for k in range(1, steps + 1):
            x = (a * (k / steps)).clone().requires_grad_(True)
            with neuron_hooks(site, {l: lambda _l, _x, x=x: x[None]}):
                logits = model(inp[None]).logits[0]
            f = torch.log_softmax(logits[P - 1 :], -1).gather(-1, labels[:, None]).sum()
            (g,) = torch.autograd.grad(f, x)
            out[l] += (a * g).sum(0) / steps
    return out


def run_phase(args) -> dict:
    import torch

    from caploc.attribution.engine import AttributionConfig, Attributor

    lm, enc = _setup(args)
    site = lm.site
    res = {"phase": args.phase}
    t0, c0 = time.perf_counter(), time.process_time()
    scores = []
    if args.phase == "bare":
        emb = lm.model.get_input_embeddings()
        for e in enc:
            ids = torch.tensor(e.input_ids)
            x = emb(ids[None, :-1]).detach().requires_grad_(True)
            logits = lm.model(inputs_embeds=x).logits[0]
            f = torch.log_softmax(logits[e.prompt_len - 1 :], -1).gather(-1, ids[e.prompt_len :, None]).sum()
            torch.autograd.grad(f, x)
    elif args.phase in ("ig", "ig_kn", "gxa"):
        cfg = {
            "ig": AttributionConfig(method="ig", steps=args.steps, completeness=False),
            "ig_kn": AttributionConfig(method="ig", steps=args.steps, objective="prob", positions="last", completeness=False),
            "gxa": AttributionConfig(method="grad_x_act", batch_size=1),
        }[args.phase]
        att = Attributor(site, cfg)
        for e in enc:
            scores.append(att.score(e.input_ids, e.prompt_len).scores)
        res["engine_stats"] = att.stats
    elif args.phase == "naive":
        for e in enc:
            scores.append(naive_ig(site, e.input_ids, e.prompt_len, args.steps))
    res["cpu_s"] = time.process_time() - c0
    res["wall_s"] = time.perf_counter() - t0
    res["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["tokens"] = [len(e.input_ids) for e in enc]
    if scores and args.save:
        from safetensors.torch import save_file

        save_file({"scores": torch.stack(scores)}, args.save)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phase", default=None)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    import tempfile

    import torch
    from safetensors.torch import load_file

    tmp = tempfile.mkdtemp()
    out = {}
    for ph in ("bare", "gxa", "ig", "ig_kn", "naive"):
        cmd = [sys.executable, __file__, "--phase", ph, "--model", args.model, "--n", str(args.n), "--steps",
               str(args.steps), "--threads", str(args.threads), "--save", f"{tmp}/{ph}.safetensors"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.stderr.write(r.stderr)
            raise SystemExit(f"phase {ph} failed")
        out[ph] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{ph:6s} cpu {out[ph]['cpu_s']:8.2f} s  wall {out[ph]['wall_s']:8.2f} s  peak RSS {out[ph]['max_rss_mb']:7.0f} MB",
              flush=True)
    ig = load_file(f"{tmp}/ig.safetensors")["scores"]
    nv = load_file(f"{tmp}/naive.safetensors")["scores"]
    rel = float((ig - nv).abs().max() / nv.abs().max())
    print(f"\nsamples: {args.n} gsm_symbolic problems, tokens {out['ig']['tokens']}, IG steps {args.steps}, threads {args.threads}")
    print(f"exact IG vs naive loop: max relative difference {rel:.2e}  (<= 1e-4 required: {'OK' if rel <= 1e-4 else 'FAIL'})")
    for key in ("cpu_s", "wall_s"):
        r_ig = out["naive"][key] / out["ig"][key]
        r_gx = out["bare"][key] / out["gxa"][key]
        print(f"[{key}] (b) exact IG throughput / (c) naive loop = {r_ig:.2f}x (target >= 2x) | "
              f"(b') KN-mode IG / naive all-positions = {out['naive'][key] / out['ig_kn'][key]:.1f}x | "
              f"(d) grad_x_act / (a) bare fwd+bwd = {r_gx:.2f}x (target >= 0.8x)")
    print(f"peak RSS MB: bare {out['bare']['max_rss_mb']:.0f}, gxa {out['gxa']['max_rss_mb']:.0f}, "
          f"ig {out['ig']['max_rss_mb']:.0f}, naive {out['naive']['max_rss_mb']:.0f}")
    print("engine stats (ig):", out["ig"].get("engine_stats"))
    torch.manual_seed(0)


if __name__ == "__main__":
    main()
