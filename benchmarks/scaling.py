"""Scale-out benchmark (run by hand; see docs/scaling.md for the measured figures).

    .venv/bin/python benchmarks/scaling.py throughput [--model gpt2-small] [--samples 8] [--steps 2] [--seq 48]
    .venv/bin/python benchmarks/scaling.py memory     [--model smollm2-135m] [--rows 1,2,4,8] [--seq 64] [--dtype float32]
    .venv/bin/python benchmarks/scaling.py bf16       [--model smollm2-135m] [--n 3] [--steps 4] [--data rg:basic_arithmetic]
    .venv/bin/python benchmarks/scaling.py plan       (Llama-2-7B / 13B / 70B configs, built on the meta device)

throughput: the same samples scored by ``localize.locate`` (score store, merge) as
  (a) 1 process x 1 thread, (b) 1 process x 2 threads, (c) ``torchrun --nproc-per-node 2`` (gloo), 1 thread each;
  prints samples/s of the scoring phase (wall, from the first barrier after loading to the merged result), the
  ratios (c)/(a) and (b)/(a) from this one run, and checks that (c) gives scores bit-identical to (a).
  ``gpt2-small`` is a randomly initialised GPT-2-small-shaped model (12 x 768, 3072 neurons, vocab 50257) with the
  tiny character tokenizer (samples are random printable strings, so every sample has the same length).
memory: each row count in a fresh subprocess: load, warm up, reset the kernel's peak-RSS mark (/proc/self/clear_refs),
  run the deepest IG micro-batch (all rows at layer 0, so every layer runs), read VmHWM. Compares the increase with
  ``caploc.memory.ig_peak_bytes`` (weights excluded: they are in the baseline) and the bytes autograd saved; once
  with glibc's default allocator settings and once with MALLOC_MMAP_THRESHOLD_=65536 (no heap fragmentation).
bf16: scores in bfloat16 vs float32 on the same samples: Spearman correlation of each sample's scores and the
  overlap of its top-100 neurons (and of the top-100 of the mean over samples).

Run it on an otherwise idle machine; the load average is printed with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------------------
def _load(model: str, dtype: str = "float32"):
    import torch

    from caploc.models.layouts import Site
    from caploc.models.loading import LoadedModel, load_model, model_fingerprint, tiny_tokenizer

    if model != "gpt2-small":
        return load_model(model, dtype=dtype)
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_inner=3072, vocab_size=50257, n_positions=1024,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).eval()
    site = Site(m)
    info = {"model_id": "gpt2-small-random", "model_type": "gpt2", "n_layers": site.n_layers, "d_mlp": site.d_mlp,
            "fingerprint": model_fingerprint(m), "dtype": dtype}
    return LoadedModel(m, tiny_tokenizer(), site, "gpt2-small-random", info)


def _dataset(n: int, seq: int, seed: int = 0):
    """Random printable strings: with the tiny character tokenizer every sample has exactly ``seq`` tokens."""
    from caploc.data import Dataset, Sample

    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + " +-*/=()"
    p = seq // 2
    return Dataset("random_text", [Sample("".join(rng.choices(chars, k=p)), "".join(rng.choices(chars, k=seq - p)))
                                   for _ in range(n)], source={"loader": "benchmarks/scaling.py", "seed": seed})


def _data_for(lm, n: int, seq: int, spec: str | None = None):
    """``spec`` (a caploc data spec) if given; random text for random models; else gsm_symbolic."""
    if spec is None and (lm.model_id == "gpt2-small-random" or lm.model_id.startswith("tiny:")):
        return _dataset(n, seq)
    from caploc.data import load_dataset

    return load_dataset(spec or "gsm_symbolic", n=n, seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_avg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _last_json(text: str) -> dict:
    return _json_lines(text)[-1]


def _json_lines(text: str) -> list[dict]:
    out = [json.loads(line[line.index("{"):]) for line in text.strip().splitlines() if line.lstrip().startswith(("{", "["))
           and "{" in line and line.rstrip().endswith("}")]
    if not out:
        raise RuntimeError(f"no result line in the worker output:\n{text[-3000:]}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# throughput: 1 vs 2 processes
# ---------------------------------------------------------------------------------------------------------------------
def _throughput_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from caploc import distributed
    from caploc.attribution.engine import AttributionConfig
    from caploc.localize import LocateConfig, locate

    distributed.init_from_env("cpu")
    try:
        rank, world, _ = distributed.dist_info("cpu")
        lm = _load(args.model)
        ds = _data_for(lm, args.n, args.seq)
        cfg = LocateConfig(attribution=AttributionConfig(method="ig", steps=args.steps), shard_size=1)
        distributed.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        res = locate(lm, ds, cfg, args.out, overwrite=True, progress=False, rank=rank, world=world)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"rank": rank, "world": world, "threads": args.threads, "n": len(ds), "wall_s": wall,
                          "cpu_s": cpu, "merged": res is not None}), flush=True)
    finally:
        distributed.finalize()


def throughput(args) -> None:
    import torch

    from caploc.scorestore import ScoreStore

    tmp = Path(tempfile.mkdtemp(prefix="caploc-scaling-"))
    # (not ``--n``: torchrun's parser would read it as an ambiguous abbreviation of its own options)
    common = ["_tp", "--model", args.model, "--samples", str(args.n), "--steps", str(args.steps), "--seq", str(args.seq)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    py = sys.executable
    torchrun = str(Path(py).with_name("torchrun"))
    runs = {
        "1 proc x 1 thread": [py, str(HERE), *common, "--threads", "1", "--out", str(tmp / "a")],
        "1 proc x 2 threads": [py, str(HERE), *common, "--threads", "2", "--out", str(tmp / "b")],
        "2 procs x 1 thread (torchrun, gloo)": [torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()),
                                                 str(HERE), *common, "--threads", "1", "--out", str(tmp / "c")],
    }
    print(f"model {args.model}, {args.n} samples x {args.seq} tokens, IG steps {args.steps}; "
          f"load average before: {_load_avg()}")
    out = {}
    for name, cmd in runs.items():
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        if p.returncode:
            raise SystemExit(f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        ranks = [j for j in _json_lines(p.stdout) if "rank" in j]
        wall = max(j["wall_s"] for j in ranks)
        cpu = sum(j["cpu_s"] for j in ranks)
        out[name] = {"samples_per_s": args.n / wall, "wall_s": wall, "cpu_s_per_sample": cpu / args.n}
        print(f"  {name:38s} {args.n / wall:.4f} samples/s  (wall {wall:.1f} s; CPU {cpu / args.n:.1f} s per sample, "
              f"all processes)", flush=True)
    a, b, c = (out[k]["samples_per_s"] for k in runs)
    print(f"ratio 2 procs / 1 proc (1 thread each): {c / a:.2f}x;  1 proc 2 threads / 1 thread: {b / a:.2f}x")
    sa, sc = ScoreStore(tmp / "a" / "scores").load(), ScoreStore(tmp / "c" / "scores").load()
    same = torch.equal(sa["scores"], sc["scores"]) and torch.equal(sa["f"], sc["f"])
    print(f"2-process scores bit-identical to the 1-process x 1-thread run: {same}; load average after: {_load_avg()}")
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# memory: peak RSS of the deepest micro-batch vs the formula
# ---------------------------------------------------------------------------------------------------------------------
def _memory_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from caploc.attribution.engine import AttributionConfig, Attributor
    from caploc.memory import ModelShape, ig_peak_bytes

    R = int(args.rows)
    lm = _load(args.model, args.dtype)
    shape = ModelShape.from_model(lm.model)
    attn = getattr(lm.model.config, "_attn_implementation", "sdpa") or "sdpa"
    g = torch.Generator().manual_seed(0)
    hi = min(lm.model.config.vocab_size, 120)
    ids = torch.randint(5, hi, (args.seq + 1,), generator=g).tolist()
    cfg = AttributionConfig(method="ig", steps=R, layers=[0], completeness=False, max_rows=R, memory_mb=1e9)
    warm = AttributionConfig(method="ig", steps=1, layers=[0], completeness=False)
    Attributor(lm.site, warm).score(ids[:9], 4)  # load kernels, allocator arenas
    params = {p.untyped_storage().data_ptr() for p in lm.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    att = Attributor(lm.site, cfg)
    real = att._ig_chunk

    def chunk(*a, **k):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return real(*a, **k)

    att._ig_chunk = chunk
    import threading

    sampled = [0]
    done = threading.Event()

    def sample():  # the kernel updates VmHWM lazily (at unmaps); also sample VmRSS (torch ops release the GIL)
        while not done.is_set():
            sampled[0] = max(sampled[0], _status_kb("VmRSS"))
            done.wait(0.002)

    rss0 = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    att.score(ids, args.seq // 2)  # positions=all: no prefix, every layer runs for rows at layer 0
    sec = time.perf_counter() - t0
    done.set()
    th.join()
    peak = max(_status_kb("VmHWM"), sampled[0])
    pred = ig_peak_bytes(shape, R, args.seq, 0, args.dtype, n_scored=args.seq - args.seq // 2 + 1,
                         scaled_layers=1, scored_layers=1, attn=attn, include_weights=False)
    w = shape.n_params * torch.empty((), dtype=lm.model.dtype).element_size()
    print(json.dumps({"rows": R, "baseline_mb": rss0 / 1024, "delta_mb": (peak - rss0) / 1024,
                      "peak_mb": peak / 1024, "weights_mb": w / 2**20, "saved_mb": sum(saved.values()) / 2**20,
                      "pred_mb": pred["total"] / 2**20, "pred_terms_mb": {k: v / 2**20 for k, v in pred.items()},
                      "seconds": sec, "attn": attn}), flush=True)


def memory(args) -> None:
    rows = [int(r) for r in args.rows.split(",")]
    print(f"model {args.model} {args.dtype}, suffix {args.seq} tokens, deepest micro-batch, {args.threads} thread(s); "
          f"load average {_load_avg()}")
    print("| rows | predicted (MB) | measured, glibc default (MB) | ratio | measured, mmap threshold 64 KiB (MB) | ratio "
          "| saved by autograd (MB) | predicted saved (MB) | process peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cmd = [sys.executable, str(HERE), "_mem", "--model", args.model, "--dtype", args.dtype, "--seq", str(args.seq),
               "--rows", str(r), "--threads", str(args.threads)]
        res = []
        # glibc keeps freed medium-sized tensors in its heap (its mmap threshold grows up to 32 MB after frees), so
        # the peak RSS includes fragmentation; a fixed 64 KiB threshold maps every tensor and returns it when freed
        for extra in ({}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                               env=dict(os.environ, **extra))
            if p.returncode:
                raise SystemExit(f"rows={r} failed:\n{p.stderr[-4000:]}")
            res.append(_last_json(p.stdout))
        m, mm = res
        t = m["pred_terms_mb"]
        n = args.seq - args.seq // 2 + 1
        vocab_mb = t["logits"] / (r * n * (12 + (4 if args.dtype == "float32" else 2)))  # MB per (row, position, V)
        saved_pred = t["saved_activations"] + t["kv_cache"] + r * n * vocab_mb * 4
        print(f"| {r} | {m['pred_mb']:.0f} | {m['delta_mb']:.0f} | {m['delta_mb'] / m['pred_mb']:.2f} "
              f"| {mm['delta_mb']:.0f} | {mm['delta_mb'] / m['pred_mb']:.2f} | {m['saved_mb']:.0f} | {saved_pred:.0f} "
              f"| {m['peak_mb']:.0f} |", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# bf16 vs fp32
# ---------------------------------------------------------------------------------------------------------------------
def _spearman(a, b) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _topk_overlap(a, b, k: int = 100) -> float:
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k


def bf16(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from caploc.attribution.engine import AttributionConfig, Attributor
    from caploc.data import encode_dataset

    layers = None if not args.layers else [int(x) for x in args.layers.split(",")]
    res = {}
    for dt in ("float32", "bfloat16"):
        lm = _load(args.model, dt)
        ds = _data_for(lm, args.n, args.seq, args.data)
        enc = encode_dataset(lm.tokenizer, ds)
        att = Attributor(lm.site, AttributionConfig(method="ig", steps=args.steps, layers=layers))
        t0 = time.perf_counter()
        res[dt] = torch.stack([att.score(e.input_ids, e.prompt_len).scores for e in enc])  # [N, L, d]
        print(f"  {dt}: {len(enc)} samples in {time.perf_counter() - t0:.1f} s "
              f"(mean {sum(len(e.input_ids) for e in enc) / len(enc):.0f} tokens; engine stats {att.stats})", flush=True)
    a, b = res["float32"], res["bfloat16"]
    keep = a.abs().sum((0, 2)) > 0  # scored layers
    a, b = a[:, keep].flatten(1), b[:, keep].flatten(1)
    sp = [_spearman(a[i], b[i]) for i in range(len(a))]
    ov = [_topk_overlap(a[i], b[i]) for i in range(len(a))]
    ov10 = [_topk_overlap(a[i], b[i], 10) for i in range(len(a))]
    print(f"{args.model}: bf16 vs fp32 over {a.shape[1]} neurons x {len(a)} samples (IG steps {args.steps}): "
          f"Spearman per sample mean {sum(sp) / len(sp):.4f} (min {min(sp):.4f}); top-100 overlap per sample "
          f"mean {sum(ov) / len(ov):.2f} (min {min(ov):.2f}); top-10 mean {sum(ov10) / len(ov10):.2f} "
          f"(min {min(ov10):.2f}); top-100 of the mean score {_topk_overlap(a.mean(0), b.mean(0)):.2f}")


# ---------------------------------------------------------------------------------------------------------------------
# plans for big models
# ---------------------------------------------------------------------------------------------------------------------
def plans(args) -> None:
    from transformers import LlamaConfig

    from caploc.memory import ModelShape, plan

    cfgs = {
        "Llama-2-7B": LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
        "Llama-2-13B": LlamaConfig(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824,
                                   num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
        "Llama-2-70B": LlamaConfig(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                                   num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    }
    print("| model | params | GPU memory (GiB) | tokens | rows / micro-batch | predicted peak (GiB) | weights | per row "
          "| memory_mb | micro-batches / sample (20 steps) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, cfg in cfgs.items():
        shape = ModelShape.from_config(cfg)
        big = name == "Llama-2-70B"  # weights alone need two 80 GB devices: memory of 2 / 4 devices as one pool
        for mem, seq in (((160, 512), (320, 512), (320, 1024)) if big else
                         ((80, 256), (80, 512), (80, 1024), (40, 512), (24, 512))):
            p = plan(shape, seq, "bfloat16", mem)
            print(f"| {name} | {shape.n_params / 1e9:.2f} B | {mem} | {seq} | {p['rows'] if p['fits'] else 'does not fit'} "
                  f"| {p['peak_gb']:.1f} | {p['weights_gb']:.1f} | {p['per_row_gb']:.2f} | {p['memory_mb']} "
                  f"| {p['micro_batches_per_sample']} |")


# ---------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("throughput", "_tp"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="gpt2-small")
        p.add_argument("--samples", "--n", dest="n", type=int, default=8)
        p.add_argument("--steps", type=int, default=2)
        p.add_argument("--seq", type=int, default=48)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", default=None)
        p.add_argument("--timeout", type=float, default=3600)
    for name in ("memory", "_mem"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--seq", type=int, default=64)
        p.add_argument("--rows", default="1,2,4,8")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--timeout", type=float, default=3600)
    p = sub.add_parser("bf16")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq", type=int, default=48)
    p.add_argument("--layers", default=None, help="comma-separated layers (default all)")
    p.add_argument("--data", default=None, help="caploc data spec (default: random text for random models, else "
                   "gsm_symbolic)")
    p.add_argument("--threads", type=int, default=2)
    sub.add_parser("plan")
    args = ap.parse_args(argv)
    {"throughput": throughput, "_tp": _throughput_worker, "memory": memory, "_mem": _memory_worker, "bf16": bf16,
     "plan": plans}[args.cmd](args)


if __name__ == "__main__":
    main()
