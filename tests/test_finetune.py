"""Neuron-only fine-tuning: slices, functional application vs merged weights, exact unmerge, save/load, optimizer
state size, training, the multi-arm experiment and the CLI (tiny random models; one real-model test marked real)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from caploc.data import Dataset, Sample
from caploc.errors import CaplocError, IncompatibleResultError
from caploc.hooks import count_hooks
from caploc.models.loading import load_model
from caploc.results import NeuronSet
from caploc.stages.finetune import (
    FinetuneConfig,
    FinetuneResult,
    NeuronAdapter,
    batch_order,
    finetune,
    split_for_finetune,
    target_nll,
    train_adapter,
)
from caploc.stages.finetune import collate_batch as collate

SEL = {0: [1, 5, 7], 2: [0, 3, 40]}  # layer -> neuron indices (all < 48 = smallest tiny d_mlp)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _all_equal(model, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def _toy_ds(n=8, name="toy"):
    # deterministic, learnable: the target is the prompt's first letter repeated
    letters = "abcdefghijklmnop"
    return Dataset(name, [Sample(prompt=f"{letters[i % 16]}{letters[(3 * i) % 16]} ->", target=f" {letters[i % 16] * 4}",
                                 group=f"g{i % 4}") for i in range(n)])


def _expected_mask(model, site, sel) -> dict[str, torch.Tensor]:
    """Independent reference of the elements a neuron owns, written from the layout semantics (not neuron_slices):
    Linear down_proj column i, gate/up row i (fused gate_up: rows i and d_mlp+i), Conv1D c_proj row i / c_fc column i,
    c_fc bias entry i."""
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    mt = model.config.model_type
    d = site.d_mlp
    for l, idx in sel.items():
        for i in idx:
            if mt == "llama":
                masks[f"model.layers.{l}.mlp.down_proj.weight"][:, i] = True
                masks[f"model.layers.{l}.mlp.gate_proj.weight"][i, :] = True
                masks[f"model.layers.{l}.mlp.up_proj.weight"][i, :] = True
            elif mt == "phi3":
                masks[f"model.layers.{l}.mlp.down_proj.weight"][:, i] = True
                masks[f"model.layers.{l}.mlp.gate_up_proj.weight"][i, :] = True
                masks[f"model.layers.{l}.mlp.gate_up_proj.weight"][d + i, :] = True
            elif mt == "gpt2":
                masks[f"transformer.h.{l}.mlp.c_proj.weight"][i, :] = True  # Conv1D [in=d_mlp, out]
                masks[f"transformer.h.{l}.mlp.c_fc.weight"][:, i] = True  # Conv1D [in, out=d_mlp]
                masks[f"transformer.h.{l}.mlp.c_fc.bias"][i] = True
    return masks


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mt", ["llama", "phi3", "gpt2"])
def test_training_changes_only_selected_slices(mt):
    lm = load_model(f"tiny:{mt}")
    snap = _snapshot(lm.model)
    ad = NeuronAdapter(lm, SEL)
    cfg = FinetuneConfig(arms=("neurons",), steps=3, lr=0.05, batch_size=4, max_grad_norm=0)
    tl = train_adapter(lm, ad, _toy_ds(), cfg, progress=False)
    assert len(tl.losses) == 3 and count_hooks(lm.model) == 0
    assert _all_equal(lm.model, snap), "base weights must be bit-identical after training"
    # merged weights: every element outside the neurons' slices bit-identical, every slice element moved
    masks = _expected_mask(lm.model, lm.site, SEL)
    owned = sum(int(m.sum()) for m in masks.values())
    assert owned == ad.n_trainable() == 6 * lm.site.params_per_neuron()
    with ad.merged(lm.model):
        for n, p in lm.model.named_parameters():
            m = masks[n]
            assert torch.equal(p[~m], snap[n][~m]), f"{n}: an element outside the selected slices changed"
            if m.any():
                assert bool((p[m] != snap[n][m]).all()), f"{n}: a selected slice element did not train"
    assert _all_equal(lm.model, snap)


@pytest.mark.parametrize("mt", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2",
                                "gptj", "gpt_neox"])
def test_adapter_forward_equals_merged_forward(mt, tiny_models):
    model = tiny_models[mt]
    ad = NeuronAdapter(model, SEL, init_std=0.2, seed=1)
    ids = torch.randint(4, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    snap = _snapshot(model)
    with torch.no_grad():
        base = model(ids).logits
        with ad.applied(model):
            hooked = model(ids).logits
        assert _all_equal(model, snap)
        with ad.merged(model):
            merged = model(ids).logits
            # the merged weight update equals the dense scatter of the deltas
            for s in ad.specs[:3]:
                p = model.get_parameter(s.param)
                assert torch.allclose(p - snap[s.param], ad.dense_delta(s.param, p), atol=1e-6)
    assert (hooked - base).abs().max() > 1e-3, "the adapter must change the output"
    assert torch.allclose(hooked, merged, atol=1e-5, rtol=0), (hooked - merged).abs().max()
    assert _all_equal(model, snap), "merge then unmerge must restore the weights exactly"
    assert count_hooks(model) == 0


def test_out_projection_delta_matches_hand_computation(tiny_models):
    """Only the down_proj column of neuron i: the MLP output must change by Δ_col * a_i (a_i = neuron activation)."""
    from caploc.hooks import capture
    from caploc.models.layouts import Site

    model = tiny_models["llama"]
    site = Site(model)
    ad = NeuronAdapter(model, {1: [4]})
    for s in ad.specs:
        if s.module.endswith("down_proj"):
            with torch.no_grad():
                ad.deltas[s.key].normal_(generator=torch.Generator().manual_seed(3))
            col = ad.deltas[s.key][:, 0].detach()  # [d_model]
    ids = torch.randint(4, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    outs = {}
    h = site.out_projs[1].register_forward_hook(lambda m, a, o: outs.__setitem__("y", o.detach().clone()))
    try:
        with torch.no_grad(), capture(site, [1]) as acts:
            model(ids)
            y0, a = outs["y"], acts[1]
            # feed the same input to the hooked module directly (later layers would see different inputs)
            with ad.applied(model):
                y1 = site.out_projs[1](a)
    finally:
        h.remove()
    expect = y0 + a[..., 4:5] * col  # [1, T, d_model]
    assert torch.allclose(y1, expect, atol=1e-6)


def test_merge_unmerge_bit_exact_and_guards(tiny_models):
    model = tiny_models["gpt2"]
    ad = NeuronAdapter(model, SEL, init_std=1e-3, seed=2)  # tiny deltas: a float add/sub round trip would lose bits
    snap = _snapshot(model)
    ad.merge(model)
    assert not _all_equal(model, snap)
    with pytest.raises(CaplocError):
        ad.merge(model)
    with pytest.raises(CaplocError):
        with ad.applied(model):
            pass
    ad.unmerge(model)
    assert _all_equal(model, snap)
    with pytest.raises(CaplocError):
        ad.unmerge(model)
    # hooks are removed after an exception inside applied()
    with pytest.raises(RuntimeError):
        with ad.applied(model):
            raise RuntimeError("boom")
    assert count_hooks(model) == 0


def test_save_load_round_trip_and_refusals(tmp_path):
    lm = load_model("tiny:phi3")
    ad = NeuronAdapter(lm, SEL, init_std=0.1, seed=4)
    ad.save(tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["layers"] == {"0": [1, 5, 7], "2": [0, 3, 40]} and meta["d_mlp"] == 48
    assert meta["model_fingerprint"] == lm.info["fingerprint"] and meta["base_dtype"] == "float32"
    ad2 = NeuronAdapter.load(tmp_path / "ad", lm)
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with ad.applied(lm.model):
            a = lm.model(ids).logits
        with ad2.applied(lm.model):
            b = lm.model(ids).logits
    assert torch.equal(a, b)
    with pytest.raises(IncompatibleResultError, match="layers"):
        NeuronAdapter.load(tmp_path / "ad", load_model("tiny:gpt2"))  # other dims
    other = load_model("tiny:phi3")
    other.model = __import__("caploc.models.tiny", fromlist=["x"]).tiny_model("phi3", seed=1)
    other.info = {**other.info, "fingerprint": None}
    with pytest.raises(IncompatibleResultError, match="fingerprint"):
        NeuronAdapter.load(tmp_path / "ad", other)  # same dims, other weights
    with pytest.raises(CaplocError):
        NeuronAdapter.load(tmp_path / "nothing", lm)


def test_optimizer_state_only_for_slices_and_loss_decreases():
    lm = load_model("tiny:llama")
    ad = NeuronAdapter(lm, SEL)
    ds = _toy_ds(4)
    cfg = FinetuneConfig(arms=("neurons",), steps=20, lr=0.1, batch_size=4, max_grad_norm=1.0)  # one repeated batch
    tl, opt = train_adapter(lm, ad, ds, cfg, progress=False, return_optimizer=True)
    n = ad.n_trainable()
    assert n == tl.n_trainable == 6 * (32 + 2 * 32)
    assert tl.n_optimizer_state == 2 * n
    state_params = {id(p) for p in opt.state}
    assert state_params == {id(p) for p in ad.deltas.values()}
    assert all(p.grad is None for p in lm.model.parameters())
    assert tl.losses[-1] < tl.losses[0] - 0.3 and tl.losses[-1] < min(tl.losses[:3]), tl.losses


def test_target_loss_masks_prompt_and_padding():
    class E:  # minimal Encoded
        def __init__(self, ids, p):
            self.input_ids, self.prompt_len = ids, p
    batch = collate([E([5, 6, 7, 8], 2), E([5, 9], 1)], pad_id=1)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    logits = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(0))
    nll, ntok = target_nll(logits, batch)
    lp = torch.log_softmax(logits, -1)
    ref = -(lp[0, 1, 7] + lp[0, 2, 8] + lp[1, 0, 9])  # targets 7, 8 of sample 0; 9 of sample 1; pads (= id 1) never
    assert int(ntok) == 3 and torch.allclose(nll, ref)


def test_batch_order_and_splits():
    o = batch_order(10, 6, 4, seed=3)
    assert o == batch_order(10, 6, 4, seed=3) and len(o) == 6 and all(len(b) == 4 for b in o)
    flat = [i for b in o[:2] for i in b] + o[2][:2]  # first epoch = a permutation of 0..9
    assert sorted(flat) == list(range(10))
    ds = Dataset("d", [Sample(f"q{i}", f" a{i}", group=f"t{i % 10}") for i in range(100)])
    loc = Dataset("loc", [Sample(f"q{i}", f" a{i}", group=f"t{i % 10}") for i in (0, 1, 2)])
    parts = split_for_finetune(ds, 20, 8, seed=0, exclude=loc)
    tr, he, ht = parts["train"], parts["heldout"], parts["heldout_templates"]
    assert (len(tr), len(he), len(ht)) == (20, 8, 8)
    pr = lambda d: {s.prompt for s in d}  # noqa: E731
    assert not (pr(tr) & pr(he)) and not (pr(tr) & pr(ht)) and not (pr(he) & pr(ht))
    g = lambda d: {s.group for s in d}  # noqa: E731
    assert not (g(ht) & (g(tr) | g(he))), "held-out templates must be unseen in training"
    assert not (g(ht) & {"t0", "t1", "t2"}), "localization templates never go to held-out templates"
    assert not (pr(he) & pr(loc))


def test_finetune_arms_report_and_untouched_base(tmp_path):
    lm = load_model("tiny:llama")
    snap = _snapshot(lm.model)
    ns = NeuronSet(np.array([[0, 1], [0, 5], [1, 2], [2, 7]]), lm.site.n_layers, lm.site.d_mlp,
                   meta={"dataset": "toy"})
    train = _toy_ds(8, "toy")
    evals = {"toy:heldout": _toy_ds(6, "toy"), "other": Dataset("other", [Sample("xyz", " qq"), Sample("kk", " zz")])}
    cfg = FinetuneConfig(arms=("neurons", "random", "full", "lora"), steps=3, lr=0.01, batch_size=4, n_random=2)
    res = finetune(lm, ns, train, cfg, tmp_path / "ft", eval_sets=evals, progress=False)
    assert _all_equal(lm.model, snap) and count_hooks(lm.model) == 0
    names = [a.name for a in res.arms]
    assert names == ["neurons", "random-s1000", "random-s1001", "full", "lora"]
    by = {a.name: a for a in res.arms}
    assert by["neurons"].n_trainable == by["random-s1000"].n_trainable == 4 * lm.site.params_per_neuron()
    assert by["full"].n_trainable == sum(p.numel() for p in lm.model.parameters())
    assert by["neurons"].n_optimizer_state == 2 * by["neurons"].n_trainable
    for a in res.arms:
        for d, r in a.eval.items():
            assert r["delta"] == pytest.approx(r["nll"] - res.untuned[d]["nll"])
    # a random arm's set is layer-matched and disjoint from the located set
    rs = NeuronAdapter.read_meta(tmp_path / "ft" / "adapters" / "random-s1000")
    assert rs["per_layer"] == ns.per_layer_counts().tolist()
    assert not {(int(l), i) for l, ix in rs["layers"].items() for i in ix} & {tuple(p) for p in ns.pairs.tolist()}
    c = res.comparisons["toy:heldout"]
    assert c["role"] == "on" and res.comparisons["other"]["role"] == "off" and c["n_null"] == 2
    assert "finetune_beats_random" in res.claims and "finetune_specific" in res.claims
    rep = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert rep["kind"] == "finetune" and rep["tables"] and {f["file"] for f in rep["figures"]} == {"fig_loss.png",
                                                                                                   "fig_delta.png"}
    assert all((tmp_path / "ft" / f["file"]).stat().st_size > 0 for f in rep["figures"])
    back = FinetuneResult.load(tmp_path / "ft")
    assert back.arm("full").losses == by["full"].losses and back.claims == json.loads(json.dumps(res.claims))
    assert np.allclose(back.per_sample["neurons|toy:heldout"], res.per_sample["neurons|toy:heldout"])
    # rerunning the same experiment resumes every finished arm (no training); another configuration is refused
    import caploc.stages.finetune.experiment as ftmod

    def no_training(*a, **k):
        raise AssertionError("a finished arm was trained again")
    orig, ftmod.train = ftmod.train, no_training
    try:
        again = finetune(lm, ns, train, cfg, tmp_path / "ft", eval_sets=evals, progress=False)
    finally:
        ftmod.train = orig
    assert [a.losses for a in again.arms] == [a.losses for a in res.arms] and again.claims == res.claims
    # one more random arm: only it trains (each random arm depends on its own seed, not on n_random)
    trained = []
    ftmod.train = lambda *a, **k: trained.append(k.get("desc")) or orig(*a, **k)
    try:
        more = finetune(lm, ns, train, dataclasses.replace(cfg, n_random=3), tmp_path / "ft", eval_sets=evals,
                        progress=False)
    finally:
        ftmod.train = orig
    assert len(trained) == 1 and [a.name for a in more.arms if a.kind == "random"][-1] == "random-s1002"
    assert more.arm("random-s1000").losses == res.arm("random-s1000").losses
    with pytest.raises(CaplocError, match="another configuration"):
        finetune(lm, ns, train, FinetuneConfig(arms=("neurons",), steps=2, lr=0.02), tmp_path / "ft",
                 eval_sets=evals, progress=False)
    # the saved adapter reproduces the neuron arm's evaluation
    from caploc import measure as ev
    ad = NeuronAdapter.load(tmp_path / "ft" / "adapter", lm)
    with ad.applied(lm.model):
        r = ev.nll(lm, evals["toy:heldout"], batch_size=8)
    assert r.nll_per_token == pytest.approx(by["neurons"].eval["toy:heldout"]["nll"], abs=1e-6)


def test_config_validation():
    with pytest.raises(CaplocError):
        FinetuneConfig(arms="neurons,bogus")
    with pytest.raises(CaplocError):
        FinetuneConfig(lr=-1)
    with pytest.raises(CaplocError):
        finetune(load_model("tiny:llama"), None, _toy_ds(), FinetuneConfig(arms=("neurons",)))


def test_cli_finetune_and_merge(tmp_path):
    from transformers import AutoModelForCausalLM

    from caploc.cli import main

    lm = load_model("tiny:gpt2")
    ns = NeuronSet(np.array([[0, 3], [1, 9], [2, 2]]), lm.site.n_layers, lm.site.d_mlp)
    ns.save(tmp_path / "ns")
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"{chr(97 + i % 20)}{i % 7} =", "target": f" {chr(97 + i % 20) * 3}", "group": f"g{i % 6}"}
            for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", "tiny:gpt2", "--neurons", str(tmp_path / "ns"), "--data", str(data),
               "--n-train", "8", "--n-eval", "4", "--steps", "2", "--lr", "0.01", "--arms", "neurons,random",
               "--n-random", "2", "--eval-data", "", "--out", str(out)])
    assert rc == 0 and (out / "report.json").exists() and (out / "adapter" / "adapter.json").exists()
    # merge into the tiny base (fingerprint-checked) and load it back with plain transformers
    rc = main(["finetune", "--merge", str(out / "adapter"), "--out", str(tmp_path / "merged")])
    assert rc == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ad = NeuronAdapter.load(out / "adapter", lm)
    ids = torch.randint(4, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ad.applied(lm.model):
        ref = lm.model(ids).logits
    with torch.no_grad():
        got = merged(ids).logits
    assert torch.allclose(ref, got, atol=1e-5)
    assert main(["finetune", "--model", "tiny:gpt2", "--arms", "neurons", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.real
def test_real_model_neuron_step_keeps_base():
    from caploc.data import load_dataset

    lm = load_model("smollm2-135m")
    snap = {n: p.detach().clone() for n, p in list(lm.model.named_parameters())[:40]}
    ad = NeuronAdapter(lm, {10: [3, 77], 20: [5]})
    ds = load_dataset("gsm_symbolic", n=2, seed=0)
    tl = train_adapter(lm, ad, ds, FinetuneConfig(arms=("neurons",), steps=2, batch_size=2), progress=False)
    assert all(np.isfinite(tl.losses)) and tl.n_optimizer_state == 2 * ad.n_trainable() == 2 * 3 * 3 * 576
    assert all(torch.equal(p, snap[n]) for n, p in list(lm.model.named_parameters())[:40])


def test_finetune_claim_needs_enough_random_arms():
    """The fine-tuning claim follows the intervention rules: permutation p, and no verdict below MIN_CONTROLS arms."""
    from caploc.stages.finetune.compare import compare_arms
    from caploc.stages.finetune.result import ArmResult
    from caploc.verdicts import MIN_CONTROLS

    def arm(name, kind, delta):
        a = ArmResult.__new__(ArmResult)
        a.name, a.kind, a.eval, a.n_trainable = name, kind, {"gsm": {"delta": delta}}, 10
        return a

    for n_rand in (2, MIN_CONTROLS):
        arms = [arm("neurons", "neurons", -0.5)] + [arm(f"random_{i}", "random", -0.01 * i) for i in range(n_rand)]
        _, _, claims = compare_arms(arms, {"gsm": {}}, {"gsm": "on"}, {})
        c = claims["finetune_beats_random"]
        assert c["beats"] is True and c["p"] == pytest.approx(1 / (n_rand + 1))
        if n_rand < MIN_CONTROLS:
            assert c["holds"] is None and c["verdict"] == "insufficient controls"
        else:
            assert c["holds"] is True and c["verdict"] == "holds"
