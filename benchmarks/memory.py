"""Peak memory per verb and vocabulary (run by hand; prints a table and ratios).

    .venv/bin/python benchmarks/memory.py [--models default,32k,262k] [--cases weights,fwd_bwd,gxa,ig,eval,finetune]
                                          [--n 16] [--ig-samples 1] [--steps 2] [--src PATH] [--json OUT]

Each (model, case) runs in a fresh subprocess (``python benchmarks/memory.py _case ...``) that reports its own
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its RSS after loading the model. Models:

* ``default``: SmolLM2-135M (``caploc.models.loading.load_model``; vocabulary 49,152, tied embeddings);
* ``32k`` / ``262k``: random-weight ``LlamaConfig`` models of SmolLM2's shape (30 x 576, 1536 neurons, 9 heads,
  3 kv heads, tied embeddings) with 32,768 / 262,144 tokens (nothing downloaded); token ids come from SmolLM2's
  tokenizer, which are valid in both.

Cases (samples: ``--n`` gsm_symbolic problems with their gold chain of thought, encoded once by the parent):

* ``weights``: load only;
* ``fwd_bwd``: a bare forward + backward of the longest sample, the way a plain script does it: the model's full
  logits, log-softmax, the target tokens' log-probabilities summed, gradient w.r.t. the input embeddings (weights
  frozen, as in attribution);
* ``gxa``: ``Attributor`` grad x activation on the ``--n`` samples (batch size 8, default budget);
* ``ig``: ``Attributor`` exact IG on the ``--ig-samples`` longest samples (the first is ``fwd_bwd``'s), ``--steps`` steps, default budget;
* ``eval``: ``caploc.evaluate.nll_sums`` on the ``--n`` samples (batch 8) -- also what ``intervene`` runs, inside
  neuron hooks that add no memory;
* ``finetune``: ``caploc.finetune.train``, 2 AdamW steps of batch 4 on one MLP matrix.

``--src`` runs the children against another checkout's ``src`` (e.g. the code before a change: ``git archive``
it into a directory); the parent only encodes the data. The machine may be shared: peaks are meaningful, times are
not. Where the child's ``caploc.memory`` has ``predict_peak_bytes``, its prediction is printed next to the measured
peak.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
MODELS = ("default", "32k", "262k")
CASES = ("weights", "fwd_bwd", "gxa", "ig", "eval", "finetune")
VOCAB = {"32k": 32768, "262k": 262144}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _load(name: str):
    """(model, site) in eval mode, fp32."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from caploc.models.layouts import Site
    from caploc.models.loading import load_model

    if name == "default":
        lm = load_model("smollm2-135m")
        return lm.model, lm.site
    cfg = LlamaConfig(vocab_size=VOCAB[name], hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return model, Site(model)


def _case(args) -> None:
    import torch

    torch.set_num_threads(1)
    data = json.loads(Path(args.data).read_text())
    samples = [(d["ids"], d["prompt_len"]) for d in data]
    model, site = _load(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    rss_loaded = _rss_mb()
    t0 = time.perf_counter()
    info: dict = {}
    if args.case == "fwd_bwd":
        ids, P = max(samples, key=lambda s: len(s[0]))
        t = torch.tensor(ids)
        emb = model.get_input_embeddings()(t[None, :-1]).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb).logits
        lp = torch.log_softmax(logits[0, P - 1 :].float(), -1).gather(-1, t[P:, None]).sum()
        lp.backward()
        info["tokens"] = len(ids)
    elif args.case in ("gxa", "ig"):
        from caploc.attribution.engine import AttributionConfig, Attributor

        if args.case == "gxa":
            cfg = AttributionConfig(method="grad_x_act")
            items = samples
        else:
            cfg = AttributionConfig(method="ig", steps=args.steps)
            items = sorted(samples, key=lambda s: -len(s[0]))[: args.ig_samples]
        att = Attributor(site, cfg)
        res = att.score_batch(items)
        info["f"] = [round(r.f, 6) for r in res]
        info["stats"] = att.stats
        info["tokens"] = max(len(s[0]) for s in items)
        info["memory_mb"] = cfg.memory_mb
    elif args.case == "eval":
        from types import SimpleNamespace

        from caploc.data.encode import Encoded
        from caploc.evaluate import nll_sums

        lm = SimpleNamespace(model=model, site=site, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=0))
        sums, counts = nll_sums(lm, [Encoded(i, p) for i, p in samples], batch_size=8, progress=False)
        info["nll_per_token"] = float(sums.sum() / counts.sum())
    elif args.case == "finetune":
        from caploc.data.encode import Encoded
        from caploc.finetune import FinetuneConfig, train

        w = site.out_projs[site.n_layers // 2].weight
        w.requires_grad_(True)
        tl = train(model, [w], [Encoded(i, p) for i, p in samples], FinetuneConfig(steps=2, batch_size=4),
                   progress=False)
        info["losses"] = tl.losses
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    try:
        from caploc import memory as cm

        if hasattr(cm, "predict_peak_bytes") and args.case in ("fwd_bwd", "gxa", "ig", "eval", "finetune"):
            info["predicted_mb"] = cm.predict_peak_bytes(model, args.case, samples, steps=args.steps,
                                                         ig_samples=args.ig_samples) / 2**20
    except Exception as e:
        info["predict_error"] = repr(e)
    w_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(json.dumps({"model": args.model, "case": args.case, "peak_mb": peak, "loaded_mb": rss_loaded,
                      "weights_mb": w_mb, "seconds": time.perf_counter() - t0, **info}), flush=True)


def _encode(n: int) -> list[dict]:
    from transformers import AutoTokenizer

    from caploc.data import load_dataset
    from caploc.data.encode import encode_dataset
    from caploc.models.loading import default_cache_dir

    tok = AutoTokenizer.from_pretrained(str(default_cache_dir() / "models" / "smollm2-135m"))
    enc = encode_dataset(tok, load_dataset("gsm_symbolic", n=n, seed=0))
    return [{"ids": e.input_ids, "prompt_len": e.prompt_len} for e in enc]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", nargs="?", default="run", choices=("run", "_case"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--ig-samples", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--src", default=str(ROOT / "src"), help="the caploc source tree the children import")
    ap.add_argument("--json", default=None, help="also write the rows here (JSON lines)")
    # child only
    ap.add_argument("--model"), ap.add_argument("--case"), ap.add_argument("--data")
    args = ap.parse_args(argv)
    if args.mode == "_case":
        return _case(args)

    import tempfile

    data = _encode(args.n)
    lens = sorted(len(d["ids"]) for d in data)
    print(f"{len(data)} gsm_symbolic samples, {lens[0]}..{lens[-1]} tokens; children import caploc from {args.src}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.json"
        path.write_text(json.dumps(data))
        env = dict(os.environ, PYTHONPATH=args.src, OMP_NUM_THREADS="1")
        for m in args.models.split(","):
            for c in args.cases.split(","):
                cmd = [sys.executable, str(HERE), "_case", "--model", m, "--case", c, "--data", str(path),
                       "--steps", str(args.steps), "--ig-samples", str(args.ig_samples)]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = next((l for l in reversed(r.stdout.splitlines()) if l.startswith("{")), None)
                if r.returncode or line is None:
                    print(f"{m} {c}: failed (rc {r.returncode}): {r.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                row = json.loads(line)
                rows.append(row)
                print(f"  {m:8s} {c:9s} peak {row['peak_mb']:7.0f} MB  ({row['seconds']:.0f} s)", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    _table(rows)


def _table(rows: list[dict]) -> None:
    by = {(r["model"], r["case"]): r for r in rows}
    models = [m for m in MODELS if any(k[0] == m for k in by)]
    cases = [c for c in CASES if any(k[1] == c for k in by)]
    print("\npeak RSS (MB) per case; in brackets: the prediction of caploc.memory where the code has one")
    print("| case | " + " | ".join(models) + " |")
    print("|---|" + "---:|" * len(models))
    for c in cases:
        cells = []
        for m in models:
            r = by.get((m, c))
            if r is None:
                cells.append("-")
                continue
            pred = f" ({r['predicted_mb']:.0f})" if "predicted_mb" in r else ""
            cells.append(f"{r['peak_mb']:.0f}{pred}")
        print(f"| {c} | " + " | ".join(cells) + " |")
    print("\nratios")
    for c in cases:
        r32, r262 = by.get(("32k", c)), by.get(("262k", c))
        if r32 and r262 and c != "weights":
            w32, w262 = by.get(("32k", "weights")), by.get(("262k", "weights"))
            extra = ""
            if w32 and w262:
                extra = (f"; above the weights row: {(r262['peak_mb'] - w262['peak_mb']) / max(1.0, r32['peak_mb'] - w32['peak_mb']):.2f}x")
            print(f"  {c}: 262k / 32k = {r262['peak_mb'] / r32['peak_mb']:.2f}x{extra}")
    for m in models:
        fb, ig, gx = by.get((m, "fwd_bwd")), by.get((m, "ig")), by.get((m, "gxa"))
        if fb and ig:
            print(f"  {m}: IG / bare fwd+bwd = {ig['peak_mb'] / fb['peak_mb']:.2f}x"
                  + (f", grad x act / bare = {gx['peak_mb'] / fb['peak_mb']:.2f}x" if gx else ""))


if __name__ == "__main__":
    main()
