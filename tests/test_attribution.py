"""Attribution is checked against math: a slow plain reference IG written here, a closed form on a toy model,
completeness convergence, and hook hygiene."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caploc import blocks
from caploc.attribution import engine as eng
from caploc.attribution.engine import AttributionConfig, Attributor
from caploc.errors import CaplocError
from caploc.hooks import capture, count_hooks, neuron_hooks
from caploc.models.layouts import Site

from .toy import TOY_LAYOUT, ToyLM


def reference_ig(site, ids, P, layer, cfg):
    """Plain IG: the full sequence, one alpha at a time, no reuse, no batching."""
    model = site.model
    ids = torch.tensor(ids)
    if cfg.objective == "prob":
        inp, pred, labels = ids[:P], [P - 1], ids[P : P + 1]
    else:
        inp, pred, labels = ids[:-1], list(range(P - 1, len(ids) - 1)), ids[P:]
    scaled = torch.zeros(len(inp), dtype=torch.bool)
    if cfg.positions == "all":
        scaled[:] = True
    elif cfg.positions == "target":
        scaled[P - 1 :] = True
    else:
        scaled[P - 1] = True
    alphas, weights = cfg.alpha_points()
    with torch.no_grad(), capture(site, [layer]) as cap:
        model(inp[None])
    a = cap[layer][0]
    total = torch.zeros(site.d_mlp)
    for al, w in zip(alphas, weights):
        x = (a * torch.where(scaled, al, 1.0)[:, None]).clone().requires_grad_(True)
        with neuron_hooks(site, {layer: lambda _l, _x: x[None]}):
            logits = model(inp[None]).logits[0, pred]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
        f = lp[0].exp() if cfg.objective == "prob" else lp.sum()
        (g,) = torch.autograd.grad(f, x)
        total += w * (a * g * scaled[:, None]).sum(0)
    return total


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("objective,positions", [("logprob", "all"), ("prob", "last"), ("logprob", "target")])
def test_ig_matches_plain_reference(tiny_models, arch, objective, positions):
    model = tiny_models[arch]
    site = Site(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (14,), generator=g).tolist()  # 14 tokens > sliding window 8 of mistral/gemma2/3
    cfg = AttributionConfig(method="ig", steps=3, objective=objective, positions=positions)
    res = Attributor(site, cfg).score(ids, 9)
    # tiny micro-batches: every chunk replays the recorded blocks below its lowest layer
    small = Attributor(site, AttributionConfig(method="ig", steps=3, objective=objective, positions=positions, max_rows=2)).score(ids, 9)
    assert not res.fallback and not small.fallback
    assert _rel(small.scores, res.scores) <= 1e-5
    for layer in range(site.n_layers):
        ref = reference_ig(site, ids, 9, layer, cfg)
        assert _rel(res.scores[layer], ref) <= 1e-5, (arch, layer)
    assert count_hooks(model) == 0
    assert all("forward" not in b.__dict__ for b in site.blocks)


def _toy_closed_form(model, ids, P, m):
    """IG of the last layer of ToyLM under right Riemann points, in closed form (see tests/toy.py)."""
    with torch.no_grad():
        h = model.emb(torch.tensor(ids[:-1]))
        for blk in model.layers[:-1]:
            h = blk(h)
        last = model.layers[-1].mlp
        x = torch.tanh(last.up(h))  # [T, k]
        D = last.down.weight  # [d, k]
        d = model.d
        pred = list(range(P - 1, len(ids) - 1))
        h0, x = h[pred].double(), x.double()
        xs, D = x[pred], D.double()
        # f(alpha) = -sum_t ||h0_t + alpha D x_t||^2 / d ;  df/dx_t = -2 D^T (h0_t + alpha D x_t) / d
        mean_alpha = (m + 1) / (2 * m)
        attr = (-2 / d) * (xs * (h0 @ D) + xs * ((xs @ D.T) @ D) * mean_alpha).sum(0)
        true_diff = (-(2 / d) * (h0 * (xs @ D.T)).sum() - ((xs @ D.T) ** 2).sum() / d)
    return attr, float(true_diff)


@pytest.mark.parametrize("m", [1, 3, 10])
def test_ig_closed_form_on_toy(m):
    model = ToyLM(n_layers=2)
    site = Site(model, TOY_LAYOUT)
    ids, P = [1, 3, 2, 5, 0, 0, 0], 4  # targets are token 0, whose log-prob is q_t
    # all positions scaled; unscored positions have zero gradient in this attention-free toy
    res = Attributor(site, AttributionConfig(method="ig", steps=m, positions="all")).score(ids, P)
    attr, true_diff = _toy_closed_form(model, ids, P, m)
    assert np.allclose(res.scores[1].double().numpy(), attr.numpy(), rtol=1e-5, atol=1e-6)
    # completeness gap of right-Riemann IG on a quadratic is exactly ||D x||^2 / (d m)  (positive here)
    gap_expected = float(res.scores[1].double().sum()) - true_diff
    assert abs(float(res.gap[1]) - gap_expected) < 1e-4
    assert float(res.f_zero[1]) <= 0


def test_completeness_gap_shrinks_with_steps(tiny_models):
    site = Site(tiny_models["llama"])
    ids = list(range(3, 20))
    gaps = []
    for m in (2, 8, 32):
        r = Attributor(site, AttributionConfig(method="ig", steps=m)).score(ids, 10)
        gaps.append(float(r.gap.abs().mean()))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < gaps[0] / 4  # roughly 1/m


def test_grad_x_act_and_activation_match_autograd(tiny_models):
    model = tiny_models["qwen2"]
    site = Site(model)
    items = [(list(range(5, 17)), 6), (list(range(20, 29)), 4)]
    gxa = Attributor(site, AttributionConfig(method="grad_x_act", batch_size=2)).score_batch(items)
    act = Attributor(site, AttributionConfig(method="activation")).score_batch(items)
    for (ids, P), rg, ra in zip(items, gxa, act):
        t = torch.tensor(ids)
        for l in range(site.n_layers):  # one layer at a time: a leaf at layer l only
            leaf = {}

            def fn(_l, x):
                leaf["x"] = x.detach().requires_grad_(True)
                return leaf["x"]

            with neuron_hooks(site, {l: fn}):
                lg = model(t[None, :-1]).logits[0, P - 1 :]
                f = torch.log_softmax(lg, -1).gather(-1, t[P:, None]).sum()
                (g,) = torch.autograd.grad(f, leaf["x"])
            x = leaf["x"][0].detach()
            assert _rel(rg.scores[l], (x * g[0]).sum(0)) < 1e-4
            assert torch.allclose(ra.scores[l], x.abs().mean(0), atol=1e-6)
        assert abs(rg.f - float(f)) < 1e-4


def test_no_hook_left_after_exception(tiny_models, monkeypatch):
    model = tiny_models["gpt2"]
    site = Site(model)
    flags = [p.requires_grad for p in model.parameters()]
    calls = {"n": 0}
    real = eng._objective

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # inside the first IG micro-batch (replay + hooks active)
            raise RuntimeError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(eng, "_objective", boom)
    with pytest.raises(RuntimeError, match="injected"):
        Attributor(site, AttributionConfig(method="ig", steps=2, layers=[1, 2])).score(list(range(4, 14)), 5)
    assert count_hooks(model) == 0
    assert all("forward" not in b.__dict__ for b in site.blocks)
    assert [p.requires_grad for p in model.parameters()] == flags  # frozen() restored the flags
    with pytest.raises(ValueError):
        with neuron_hooks(site, {0: lambda l, x: (_ for _ in ()).throw(ValueError("x"))}):
            model(torch.tensor([[1, 2, 3]]))
    assert count_hooks(model) == 0


def test_reuse_mismatch_falls_back(tiny_models, monkeypatch):
    """If replaying recorded blocks gave a different objective, the sample is recomputed without reuse."""
    site = Site(tiny_models["llama"])
    ids = list(range(3, 15))
    cfg = AttributionConfig(method="ig", steps=2, max_rows=3)  # one layer per micro-batch, so layers 1, 2 replay blocks below
    good = Attributor(site, cfg).score(ids, 6)
    real = blocks.rows_of
    monkeypatch.setattr(blocks, "rows_of", lambda t, lo, hi: real(t, lo, hi) * 1.5)  # rows entering a micro-batch
    bad = Attributor(site, cfg).score(ids, 6)
    assert bad.fallback
    assert torch.allclose(bad.scores, good.scores, rtol=1e-4, atol=1e-6)


def test_oom_backoff(tiny_models, monkeypatch):
    site = Site(tiny_models["mistral"])
    ids = list(range(3, 15))
    cfg = AttributionConfig(method="ig", steps=4)
    ref = Attributor(site, cfg).score(ids, 6)
    att = Attributor(site, cfg)
    real = att._ig_chunk

    def flaky(chunk, *a, **k):
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("simulated allocator failure: out of memory")
        return real(chunk, *a, **k)

    monkeypatch.setattr(att, "_ig_chunk", flaky)
    res = att.score(ids, 6)
    assert att.stats["oom_backoffs"] >= 1
    assert torch.allclose(res.scores, ref.scores, rtol=1e-5, atol=1e-7)


def test_micro_batching_does_not_change_scores(tiny_models):
    site = Site(tiny_models["gemma2"])
    ids = list(range(3, 18))
    a = Attributor(site, AttributionConfig(method="ig", steps=3, max_rows=1)).score(ids, 7)
    b = Attributor(site, AttributionConfig(method="ig", steps=3, max_rows=256)).score(ids, 7)
    assert torch.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw,msg", [
    (dict(method="shap"), "method must be one of"),
    (dict(steps=0), "steps must be"),
    (dict(alphas="left"), "alphas must be one of"),
    (dict(positions="first"), "positions must be one of"),
])
def test_config_validation(kw, msg):
    with pytest.raises(CaplocError, match=msg):
        AttributionConfig(**kw)


def test_layer_out_of_range(tiny_models):
    with pytest.raises(CaplocError, match="out of range"):
        Attributor(Site(tiny_models["llama"]), AttributionConfig(method="ig", layers=[7]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_enter_at_their_own_layer(tiny_models, arch):
    """Inside one micro-batch block j computes exactly the rows whose scaled layer is <= j (no row recomputes a layer
    below its own); the alpha = 1 point costs no row (clean run) and weight-0 rows run without a backward."""
    site = Site(tiny_models[arch])
    L = site.n_layers
    ids = list(range(3, 17))
    batch_sizes: dict[int, list[int]] = {j: [] for j in range(L)}
    handles = [o.register_forward_pre_hook(lambda m, a, _j=j: batch_sizes[_j].append(a[0].shape[0]))
               for j, o in enumerate(site.out_projs)]  # the MLP inside block j: the rows the block computes
    try:
        att = Attributor(site, AttributionConfig(method="ig", steps=3, positions="target"))  # alphas 1/3, 2/3, 1 + completeness
        res = att.score(ids, 6)
    finally:
        for h in handles:
            h.remove()
    assert att.stats["grad_rows"] == 2 * L  # alphas 1/3 and 2/3 per layer
    assert att.stats["forward_only_rows"] == L + 1  # alpha = 0 per layer + the guard row
    assert att.stats["forwards"] == 2  # one micro-batch each
    # calls per block: prefix cache (1 row), clean run (1 row), then the grad and the forward-only micro-batch
    guard = L // 2
    for j in range(L):
        grad_rows = 2 * (j + 1)
        fwd_rows = (j + 1) + (1 if j >= guard else 0)
        assert batch_sizes[j] == [1, 1, grad_rows, fwd_rows], (j, batch_sizes[j])
    ref = Attributor(site, AttributionConfig(method="ig", steps=3, positions="target", reuse=False)).score(ids, 6)
    assert _rel(res.scores, ref.scores) <= 1e-5
    assert torch.allclose(res.gap, ref.gap, atol=1e-5) and torch.allclose(res.f_zero, ref.f_zero, atol=1e-5)
