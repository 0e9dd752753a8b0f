"""Peak memory per verb and vocabulary, before and after the chunked LM head (run by hand; prints a table and ratios).

    .venv/bin/python benchmarks/memory.py [--models default,32k,262k] [--cases fwd_bwd,gxa,ig,ig2048]
                                          [--n 4] [--steps 2] [--before REF | --before none] [--json OUT]

Each (model, case, code) runs in a fresh subprocess (``nice``, ``OMP_NUM_THREADS=1``) that loads the model, touches
every weight, records its RSS (``loaded``), resets its peak RSS (``/proc/self/clear_refs``: building a random model's
transients do not count), runs the case and reports its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), so
``peak - loaded`` is what the case adds to the resident weights. Models:

* ``default``: SmolLM2-135M (``caploc.models.loading.load_model``; vocabulary 49,152, tied embeddings);
* ``32k`` / ``262k``: random-weight ``LlamaConfig`` models of SmolLM2's shape (30 x 576, 1536 neurons, 9 heads,
  3 kv heads, tied embeddings) with 32,768 / 262,144 tokens (nothing downloaded); token ids come from SmolLM2's
  tokenizer, folded modulo the vocabulary (random weights: any ids do).

Cases (samples: the first ``--n`` of 8 gsm_symbolic problems with their gold chain of thought, encoded once by the parent):

* ``weights``: load only (every case's ``loaded`` RSS gives the same: the table's weights row);
* ``fwd_bwd``: a bare forward + backward of the IG sample (the shortest of the 8, to keep the run short), the
  way a plain script does it: the model's full logits, log-softmax, the target tokens' log-probabilities summed,
  gradient w.r.t. the input embeddings (weights frozen, as in attribution);
* ``gxa``: ``Attributor`` grad x activation on the ``--n`` samples (batch size 8, the default ``memory_mb``);
* ``ig`` / ``ig2048``: ``Attributor`` exact IG on the IG sample, ``--steps`` steps, the default ``memory_mb`` (automatic:
  512 MB on a CPU; the ``before`` code's default was 2048) / ``memory_mb=2048`` (the CLI's ``--memory-mb`` default);
  the objective and a checksum of the scores are printed, so equal scores under both budgets can be checked;
* ``eval``: ``caploc.measure.nll_sums`` (``caploc.evaluate`` in the --before commit) on the ``--n`` samples (batch 8,
  the default ``memory_mb``), the stage code as it is in the tree run;
  ``eval_lmhead``: the same NLLs through ``caploc.lmhead.row_nll`` (what ``nll_sums`` gives once wired to it);
* ``intervene``: ``eval`` with 12 neurons (seeded, 4 layers) erased by hooks, as ``caploc intervene`` measures each
  condition;
* ``finetune`` / ``finetune_plain``: 2 AdamW steps of the neurons arm (``caploc.stages.finetune.train`` with a
  ``NeuronAdapter`` on those 12 neurons, batch 4 of the ``--n`` samples): ``finetune`` as the tree runs it (chunked
  LM head, micro-batches within the default ``memory_mb``); ``finetune_plain`` the same steps with the model's full
  logits in one batch (``model(...).logits`` + ``target_nll``: what a plain training script holds, and caploc did
  before the chunked head). The losses are printed: equal to 4 decimals.

``--before REF`` (default: ``4da1152``, main before the chunked head) also runs ``gxa``, ``ig`` and ``eval`` with
that commit's ``src`` (``git archive``), the full-logits code. In the ``after`` children ``caploc.memory`` predicts
each peak (``bare_forward_backward_bytes``, ``gxa_run_peak_bytes``, ``ig_sample_peak_bytes``); the table prints the
prediction of what the case adds beyond the weights next to the measured ``peak - loaded``. The machine may be shared:
peaks are meaningful, times are not.
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
CASES = ("weights", "fwd_bwd", "gxa", "ig", "ig2048", "eval", "eval_lmhead", "intervene", "finetune", "finetune_plain")
DEFAULT_CASES = ("fwd_bwd", "gxa", "ig", "ig2048")
BEFORE_CASES = ("gxa", "ig", "eval")
BEFORE = "4da1152"
POOL = 8  # samples encoded; the IG sample is the shortest of them
VOCAB = {"32k": 32768, "262k": 262144}


class _LivePeak:
    """The most bytes glibc's malloc had handed out and not taken back (``mallinfo2``: ``uordblks + hblkhd``) beyond
    the start, sampled at every module's entry and exit and whenever the backward unpacks a saved tensor: live
    tensors, without the freed memory the allocator keeps (which RSS counts). A sample between those points (inside
    one op, between two gradient buffers) is not seen, so this is a lower bound of the live peak."""

    def __init__(self, model):
        import ctypes

        import torch

        class _MI(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = _MI
        self.base = self.peak = self._inuse()
        self._handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(self._sample),
                                                              m.register_forward_hook(self._sample))]
        self._ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: t, self._unpack)
        self._ctx.__enter__()

    def _inuse(self) -> int:
        m = self._libc.mallinfo2()
        return m.uordblks + m.hblkhd

    def _sample(self, *_a) -> None:
        self.peak = max(self.peak, self._inuse())

    def _unpack(self, t):
        self._sample()
        return t

    def stop(self) -> float:
        self._ctx.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        return (self.peak - self.base) / 2**20


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


def _ig_item(samples):
    """The IG (and bare forward + backward) sample: the shortest of the pool, so the benchmark stays within minutes."""
    return min(samples, key=lambda s: len(s[0]))


def _case(args) -> None:
    import hashlib

    import torch

    torch.set_num_threads(1)
    data = json.loads(Path(args.data).read_text())
    model, site = _load(args.model)
    V = model.get_output_embeddings().weight.shape[0]
    pool = [([t % V for t in d["ids"]], d["prompt_len"]) for d in data]  # SmolLM2's ids, folded into a 32k vocabulary
    samples = pool[: args.n]
    ig_ids, ig_p = _ig_item(pool)
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            float(p.sum())  # page every weight in: loaded_mb = runtime + weights
    g = torch.Generator().manual_seed(0)
    d_mlp = site.d_mlp
    neurons = [(int(l), int(i)) for l in (0, 7, 15, 29) for i in torch.randperm(d_mlp, generator=g)[:3]]
    adapter = None
    if args.case.startswith("finetune"):
        from caploc.stages.finetune.adapter import NeuronAdapter

        adapter = NeuronAdapter(model, neurons)  # built before the peak is reset: its fingerprint pass does not count
    rss_loaded = _rss_mb()
    live = _LivePeak(model)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS: building the model's transients do not count
    t0 = time.perf_counter()
    info: dict = {}
    if args.case == "fwd_bwd":
        t = torch.tensor(ig_ids)
        emb = model.get_input_embeddings()(t[None, :-1]).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb).logits
        lp = torch.log_softmax(logits[0, ig_p - 1 :].float(), -1).gather(-1, t[ig_p:, None]).sum()
        lp.backward()
        info["f"] = [round(float(lp), 4)]
    elif args.case in ("gxa", "ig", "ig2048"):
        from caploc.attribution.engine import AttributionConfig, Attributor

        if args.case == "gxa":
            cfg = AttributionConfig(method="grad_x_act")
            items = samples
        else:
            cfg = AttributionConfig(method="ig", steps=args.steps, memory_mb=2048.0 if args.case == "ig2048" or args.code == "before" else None)
            items = [(ig_ids, ig_p)]
        att = Attributor(site, cfg)
        res = att.score_batch(items)
        info["f"] = [round(r.f, 4) for r in res]
        scores = torch.stack([r.scores for r in res])
        info["scores_sum"] = float(scores.double().abs().sum())
        info["scores_sha"] = hashlib.sha256(scores.round(decimals=4).numpy().tobytes()).hexdigest()[:12]
        info["stats"] = {k: v for k, v in att.stats.items() if v}
        budget = getattr(att, "budgets", None)  # the budget used (None in the config: automatic)
        info["memory_mb"] = budget.memory_mb if budget is not None else cfg.memory_mb
    elif args.case in ("eval", "eval_lmhead"):
        from types import SimpleNamespace

        from caploc.data.encode import Encoded

        try:
            from caploc.measure import nll_sums  # this tree
        except ImportError:  # the --before commit (module renamed by the stage split)
            from caploc.evaluate import nll_sums

        enc = [Encoded(i, p) for i, p in samples]
        if args.case == "eval":
            lm = SimpleNamespace(model=model, site=site, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=0))
            sums, _counts = nll_sums(lm, enc, batch_size=8, progress=False)
            info["f"] = [round(float(-x), 4) for x in sums]
        else:
            from caploc.lmhead import row_nll

            T = max(len(e.input_ids) for e in enc)
            ids = torch.zeros(len(enc), T, dtype=torch.long)
            att = torch.zeros_like(ids)
            tgt = torch.zeros_like(ids, dtype=torch.bool)
            for r, e in enumerate(enc):
                ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
                att[r, : len(e.input_ids)] = 1
                tgt[r, e.prompt_len : len(e.input_ids)] = True
            with torch.no_grad():
                info["f"] = [round(float(-x), 4) for x in row_nll(model, ids, tgt, att, use_cache=False)]
        info["memory_mb"] = _budget_mb(model)
    elif args.case == "intervene":
        from types import SimpleNamespace

        from caploc.data.encode import Encoded
        from caploc.measure import nll_sums
        from caploc.neurons import intervention

        lm = SimpleNamespace(model=model, site=site, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=0))
        with intervention(site, neurons, 0.0):
            sums, _counts = nll_sums(lm, [Encoded(i, p) for i, p in samples], batch_size=8, progress=False)
        info["f"] = [round(float(-x), 4) for x in sums]
        info["memory_mb"] = _budget_mb(model)
    elif args.case in ("finetune", "finetune_plain"):
        import sys as _sys

        from caploc.data.encode import Encoded
        from caploc.stages.finetune import FinetuneConfig
        from caploc.stages.finetune.train import target_nll, train

        tm = _sys.modules["caploc.stages.finetune.train"]
        if args.case == "finetune_plain":  # the model's full logits, one batch
            tm.batch_nll = lambda m, b, **k: target_nll(m(input_ids=b["input_ids"],
                                                          attention_mask=b["attention_mask"]).logits, b)
        cfg = FinetuneConfig(steps=2, batch_size=4, lr=1e-3, memory_mb=1e6 if args.case == "finetune_plain" else None)
        with adapter.applied(model):
            log = train(model, list(adapter.deltas.values()), [Encoded(i, p) for i, p in samples], cfg, progress=False)
        info["f"] = [round(x, 4) for x in log.losses]
        info["trainable"] = sum(p.numel() for p in adapter.deltas.values())
        info["memory_mb"] = _budget_mb(model) if args.case == "finetune" else 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    info["live_mb"] = live.stop()
    info.update(_predict(model, args.case, samples, (ig_ids, ig_p), args.steps, info.get("memory_mb"),
                         info.get("trainable")))
    w_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(json.dumps({"model": args.model, "case": args.case, "code": args.code, "peak_mb": peak,
                      "loaded_mb": rss_loaded, "weights_mb": w_mb, "seconds": time.perf_counter() - t0, **info}),
          flush=True)


def _budget_mb(model) -> float:
    from caploc.memory import model_budgets

    return model_budgets(model, None).memory_mb


def _predict(model, case, samples, ig_item, steps, memory_mb, trainable=None) -> dict:
    """What ``caploc.memory`` predicts the case adds beyond the weights (MB), where the code run has the predictors."""
    try:
        from caploc import memory as cm
    except ImportError:
        return {}
    if not hasattr(cm, "ig_sample_peak_bytes"):
        return {}
    shape = cm.ModelShape.from_model(model)
    kw = {"include_weights": False}
    ids, P = ig_item
    if case == "fwd_bwd":
        b = cm.bare_forward_backward_bytes(shape, len(ids) - 1, len(ids) - P, **kw)["total"]
    elif case == "gxa":
        b = cm.gxa_run_peak_bytes(shape, [len(i) for i, _ in samples], [p for _, p in samples],
                                  memory_mb=memory_mb, **kw)["total"]
    elif case in ("ig", "ig2048"):
        m = 1.0 / steps
        b = cm.ig_sample_peak_bytes(shape, len(ids), P, [k * m for k in range(1, steps + 1)], [m] * steps,
                                    memory_mb=memory_mb, **kw)["total"]
    elif case in ("eval", "intervene") and hasattr(cm, "eval_run_peak_bytes"):
        b = cm.eval_run_peak_bytes(shape, [len(i) for i, _ in samples], [p for _, p in samples], memory_mb=memory_mb,
                                   **kw)["total"]
    elif case in ("finetune", "finetune_plain") and hasattr(cm, "train_step_peak_bytes"):
        lens, prompts = [len(i) for i, _ in samples], [p for _, p in samples]
        if case == "finetune":
            b = cm.train_step_peak_bytes(shape, lens, prompts, trainable, memory_mb=memory_mb, **kw)["total"]
        else:  # one batch: every sample's saved tensors, the [B, T, V] logits and their gradient, and the target
            # rows' gathered logits and log-softmax (cross_entropy)
            T, n = max(lens), sum(a - p for a, p in zip(lens, prompts))
            b = trainable * 12 + len(lens) * cm.train_sample_bytes(shape, T) + (len(lens) * T + n) * shape.vocab * 8
    else:
        return {}
    return {"predicted_mb": b / 2**20}


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
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"of {','.join(CASES)}")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--before", default=BEFORE, help="git ref of the full-logits code ('none': skip)")
    ap.add_argument("--json", default=None, help="also write the rows here (JSON lines)")
    # child only
    ap.add_argument("--model"), ap.add_argument("--case"), ap.add_argument("--data"), ap.add_argument("--code")
    args = ap.parse_args(argv)
    if args.mode == "_case":
        return _case(args)

    import tempfile

    t_all = time.perf_counter()
    data = _encode(max(args.n, POOL))
    lens = sorted(len(d["ids"]) for d in data[: args.n])
    print(f"{args.n} gsm_symbolic samples, {lens[0]}..{lens[-1]} tokens; IG and the bare fwd+bwd on the shortest of "
          f"{len(data)}: {min(len(d['ids']) for d in data)} tokens")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.json"
        path.write_text(json.dumps(data))
        srcs = {"after": str(ROOT / "src")}
        if args.before != "none":
            subprocess.run(f"git -C {ROOT} archive {args.before} src | tar -x -C {tmp}", shell=True, check=True)
            srcs["before"] = str(Path(tmp) / "src")
        runs = [(m, c, "after") for m in args.models.split(",") for c in args.cases.split(",")]
        runs += [(m, c, "before") for m in args.models.split(",") for c in args.cases.split(",")
                 if "before" in srcs and c in BEFORE_CASES]
        for m, c, code in runs:
            env = dict(os.environ, PYTHONPATH=srcs[code], OMP_NUM_THREADS="1")
            cmd = ["nice", "-n", "10", sys.executable, str(HERE), "_case", "--model", m, "--case", c, "--data",
                   str(path), "--steps", str(args.steps), "--code", code, "--n", str(args.n)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((l for l in reversed(r.stdout.splitlines()) if l.startswith("{")), None)
            if r.returncode or line is None:
                print(f"  {m} {c} {code}: failed (rc {r.returncode}): {r.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            row = json.loads(line)
            rows.append(row)
            print(f"  {m:8s} {c:11s} {code:6s} peak {row['peak_mb']:7.0f} MB  ({row['seconds']:.0f} s)", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    _table(rows)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


def _close(a, b, rel: float = 1e-5) -> bool:
    return a is None and b is None or (a is not None and b is not None and abs(a - b) <= rel * max(abs(b), 1e-30))


def _table(rows: list[dict]) -> None:
    by = {(r["model"], r["case"], r["code"]): r for r in rows}
    models = [m for m in MODELS if any(k[0] == m for k in by)]
    keys = [(c, code) for c in CASES for code in ("before", "after") if any(k[1:] == (c, code) for k in by)]
    print("\npeak RSS (MB): `before` = full logits (the --before commit), `after` = this tree; "
          "[measured peak RSS - loaded / live malloc peak / predicted by caploc.memory], all beyond the resident weights")
    print("| case | code | " + " | ".join(models) + " |")
    print("|---|---|" + "---:|" * len(models))
    loaded = {m: min(r["loaded_mb"] for r in rows if r["model"] == m) for m in models}
    print("| weights (RSS after loading) | | " + " | ".join(f"{loaded[m]:.0f}" for m in models) + " |")
    for c, code in keys:
        cells = []
        for m in models:
            r = by.get((m, c, code))
            if r is None:
                cells.append("-")
                continue
            extra = f" [{r['peak_mb'] - r['loaded_mb']:.0f}" + (f" / {r['live_mb']:.0f}" if "live_mb" in r else "") \
                + (f" / {r['predicted_mb']:.0f}]" if "predicted_mb" in r else "]")
            cells.append(f"{r['peak_mb']:.0f}" + (extra if c != "weights" else ""))
        print(f"| {c} | {code} | " + " | ".join(cells) + " |")
    print("\nratios")
    for c, code in keys:
        r32, r262 = by.get(("32k", c, code)), by.get(("262k", c, code))
        if r32 and r262 and c != "weights":
            print(f"  {c} ({code}): 262k / 32k peak = {r262['peak_mb'] / r32['peak_mb']:.2f}x; beyond the weights "
                  f"{(r262['peak_mb'] - r262['loaded_mb']) / max(1.0, r32['peak_mb'] - r32['loaded_mb']):.2f}x")
    for m in models:
        fb = by.get((m, "fwd_bwd", "after"))
        for c, code in keys:
            r = by.get((m, c, code))
            if fb and r and c in ("gxa", "ig", "ig2048"):
                print(f"  {m}: {c} ({code}) / bare fwd+bwd peak = {r['peak_mb'] / fb['peak_mb']:.2f}x")
    for m in models:
        a, b = by.get((m, "finetune", "after")), by.get((m, "finetune_plain", "after"))
        if a and b:
            print(f"  {m}: finetune / finetune_plain peak = {a['peak_mb'] / b['peak_mb']:.2f}x; beyond the weights "
                  f"{(a['peak_mb'] - a['loaded_mb']) / max(1.0, b['peak_mb'] - b['loaded_mb']):.2f}x; losses "
                  f"{'equal' if a.get('f') == b.get('f') else 'DIFFER: ' + str(a.get('f')) + ' vs ' + str(b.get('f'))}")
    for m in models:
        for c in ("gxa", "ig", "eval"):
            a, b = by.get((m, c, "after")), by.get((m, c, "before"))
            if a and b:
                same = a.get("f") == b.get("f") and _close(a.get("scores_sum"), b.get("scores_sum"))
                print(f"  {m}: {c} after / before peak = {a['peak_mb'] / b['peak_mb']:.2f}x; objective"
                      f"{' and scores' if 'scores_sha' in a else 's'} {'equal' if same else 'DIFFER'} "
                      f"(objectives to 4 decimals, sum |scores| to 1e-5){'' if same else ': ' + str(a.get('f')) + ' vs ' + str(b.get('f'))}")
        a, b = by.get((m, "ig", "after")), by.get((m, "ig2048", "after"))  # ig: the automatic budget
        if a and b:
            print(f"  {m}: IG under {a['memory_mb']:.0f} MB vs 2048 MB: sum |scores| "
                  f"{'equal' if _close(a['scores_sum'], b['scores_sum']) else 'DIFFER'} (1e-5)"
                  f", {a['seconds']:.0f} s vs {b['seconds']:.0f} s")


if __name__ == "__main__":
    main()
