"""Peer benchmark (run by hand): caploc KN-mode IG vs the knowledge-neurons package (Dai et al. 2022 implementation).

Install the peer into the benchmark environment only (it is never a caploc dependency):

    .venv/bin/pip install --no-deps knowledge-neurons==0.0.2 einops
    .venv/bin/python benchmarks/vs_knowledge_neurons.py [--lengths 16,36,64,256] [--steps 20] [--threads 2]

Both tools score the same neuron (GPT-2's post-activation, the input of ``mlp.c_proj``: knowledge-neurons is pointed
at it with ``kn.input_ff_attr = "mlp.act"``), the same objective (probability of one target token at the last prompt
position), the same IG points (knowledge-neurons uses ``torch.linspace(0, 1, steps)``; caploc ``alphas="linspace"``)
and all 12 layers, on a GPT-2-small-shaped model with random weights and a word-level tokenizer built here.
Printed per prompt length: time of each, the speed ratio, the max relative score difference, peak RSS of each (each
tool runs in its own fresh subprocess). Then caploc's all-positions IG throughput against a bare forward+backward.
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
WORDS = [f"w{i}" for i in range(2000)]


def build(seed=0):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<unk>")
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()
    return model, tok


def prompt_of(length: int, seed: int = 0) -> tuple[str, str]:
    import random

    r = random.Random(seed + length)
    return " ".join(r.choice(WORDS) for _ in range(length)), r.choice(WORDS)


def run_one(tool: str, length: int, steps: int, save: str, warm: bool = False) -> dict:
    import torch
    from safetensors.torch import save_file

    model, tok = build()
    prompt, target = prompt_of(length)
    # imports outside the timed region (both tools)
    if tool == "kn":
        from knowledge_neurons import KnowledgeNeurons
    else:
        from caploc.attribution.engine import AttributionConfig, Attributor
        from caploc.models.layouts import Site

    def score(prompt, target):
        if tool == "kn":
            kn = KnowledgeNeurons(model, tok, model_type="gpt2", device="cpu")
            kn.input_ff_attr = "mlp.act"
            return kn.get_scores(prompt, " " + target, batch_size=steps if steps <= 20 else 10, steps=steps, pbar=False)
        ids = tok(prompt)["input_ids"] + tok(" " + target)["input_ids"][:1]
        cfg = AttributionConfig(method="ig", steps=steps, alphas="linspace", objective="prob", positions="last", completeness=False)
        return Attributor(Site(model), cfg).score(ids, length).scores

    if warm and tool in ("kn", "caploc"):  # steady state: one untimed prompt of the same length first
        score(*prompt_of(length, seed=1))
    t0, c0 = time.perf_counter(), time.process_time()
    if tool in ("kn", "caploc"):
        scores = score(prompt, target)
    elif tool in ("all_positions", "bare"):
        ids = tok(prompt)["input_ids"] + tok(" " + target)["input_ids"][:1]
        for p in model.parameters():
            p.requires_grad_(False)
        if tool == "bare":  # one forward+backward to the input embeddings
            x = model.get_input_embeddings()(torch.tensor([ids[:-1]])).detach().requires_grad_(True)
            lg = model(inputs_embeds=x).logits[0, -1]
            torch.autograd.grad(torch.log_softmax(lg, -1)[ids[-1]], x)
        else:  # exact IG with every position scaled, 2 steps: a row per layer (alpha 1/2) + the clean run (alpha 1)
            Attributor(Site(model), AttributionConfig(method="ig", steps=2, completeness=False)).score(ids, length)
        scores = torch.zeros(1)
    t_wall, t_cpu = time.perf_counter() - t0, time.process_time() - c0
    save_file({"scores": torch.as_tensor(scores).float().contiguous()}, save)
    return {"wall_s": t_wall, "cpu_s": t_cpu, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="16,36,64,256")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tool", default=None)
    ap.add_argument("--length", type=int, default=0)
    ap.add_argument("--save", default=None)
    ap.add_argument("--warm", action="store_true", help="time each tool's second prompt (steady state), not its first")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.tool:
        print(json.dumps(run_one(args.tool, args.length, args.steps, args.save, args.warm)))
        return
    import tempfile

    from safetensors.torch import load_file

    tmp = tempfile.mkdtemp()

    def sub(tool, length):
        path = f"{tmp}/{tool}-{length}.safetensors"
        cmd = [sys.executable, __file__, "--tool", tool, "--length", str(length), "--steps", str(args.steps),
               "--threads", str(args.threads), "--save", path] + (["--warm"] if args.warm else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.stderr.write(r.stderr[-3000:])
            raise SystemExit(f"{tool} at {length} tokens failed")
        return json.loads(r.stdout.strip().splitlines()[-1]), load_file(path)["scores"]

    print(f"GPT-2-small shape (12 x 3072 neurons, random weights), 1 target token, {args.steps} IG steps (linspace), "
          f"{args.threads} threads, {'warm (second prompt timed)' if args.warm else 'cold (first prompt timed)'}")
    print("| prompt tokens | knowledge-neurons s | caploc s | speed ratio (wall) | ratio (CPU) | max rel. diff | peak RSS kn / caploc MB |")
    print("|---|---|---|---|---|---|---|")
    for length in [int(x) for x in args.lengths.split(",") if x]:
        rk, sk = sub("kn", length)
        rc, sc = sub("caploc", length)
        rel = float((sk - sc).abs().max() / sk.abs().max())
        print(f"| {length} | {rk['wall_s']:.2f} | {rc['wall_s']:.2f} | {rk['wall_s'] / rc['wall_s']:.1f}x | "
              f"{rk['cpu_s'] / rc['cpu_s']:.1f}x | {rel:.1e} | {rk['max_rss_mb']:.0f} / {rc['max_rss_mb']:.0f} |", flush=True)
    for length in (64,):
        rb, _ = sub("bare", length)
        ra, _ = sub("all_positions", length)
        print(f"\nall-positions exact IG at {length} tokens, 2 steps: {ra['cpu_s']:.2f} CPU s = "
              f"{ra['cpu_s'] / rb['cpu_s']:.1f} bare forward+backward passes ({rb['cpu_s']:.3f} CPU s each) for 12 layers "
              f"x 2 steps (naive: 24 full passes); peak RSS {ra['max_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
