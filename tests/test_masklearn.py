"""The learned-mask localizer on a tiny random model: gradients, frozen weights, round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caploc.data import Dataset, Sample, encode_dataset
from caploc.errors import CaplocError
from caploc.hooks import capture, count_hooks, scale_neurons
from caploc.models.loading import load_model
from caploc.stages.faithfulness import ablate
from caploc.stages.masklearn import (
    MaskConfig,
    MaskResult,
    batch,
    learn_mask,
    mask_loss,
    mean_activations,
    soft_mask,
    token_nll,
)


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return load_model("tiny:llama")


@pytest.fixture(scope="module")
def enc(lm):
    ds = Dataset("t", [Sample(prompt=f"Q: {i} times {i + 2} is", target=f" {i * (i + 2)} ok") for i in range(6)])
    return encode_dataset(lm.tokenizer, ds)


def _token_nll_ref(lm, encoded):
    """Independent reference: one unpadded sample at a time, the NLL of every gold target token."""
    out = []
    with torch.no_grad():
        for e in encoded:
            lp = torch.log_softmax(lm.model(input_ids=torch.tensor([e.input_ids])).logits[0].double(), -1)
            out += [-float(lp[t - 1, e.input_ids[t]]) for t in range(e.prompt_len, len(e))]
    return np.array(out)


def test_collate_and_token_nll(lm, enc):
    ids, att, tgt = batch(enc[:3])
    assert ids.shape == att.shape == tgt.shape
    assert int(tgt.sum()) == sum(e.target_len for e in enc[:3])
    with torch.no_grad():
        got = token_nll(lm, enc[:3]).double().numpy()
    assert np.allclose(got, _token_nll_ref(lm, enc[:3]), atol=1e-4)


def test_mean_activations_reference(lm, enc):
    m = mean_activations(lm, enc[:3], batch_size=2)
    tot, cnt = 0, 0
    with torch.no_grad():
        for e in enc[:3]:
            with capture(lm.site) as st:
                lm.model(input_ids=torch.tensor([e.input_ids]))
            tot = tot + torch.stack([st[l][0].double().sum(0) for l in range(lm.site.n_layers)])
            cnt += len(e)
    assert torch.allclose(m.double(), tot / cnt, atol=1e-5)


def test_soft_mask_identities(lm, enc):
    site = lm.site
    ids = torch.tensor([enc[0].input_ids])
    fill = mean_activations(lm, enc)
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
        with soft_mask(site, torch.ones(site.n_layers, site.d_mlp), fill):
            assert torch.allclose(lm.model(input_ids=ids).logits, ref, atol=1e-6)
        with soft_mask(site, torch.zeros(site.n_layers, site.d_mlp), fill):
            a = lm.model(input_ids=ids).logits
        with ablate(site, np.arange(site.n_layers * site.d_mlp), fill):
            b = lm.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert count_hooks(lm.model) == 0
    with pytest.raises(CaplocError):
        with soft_mask(site, torch.ones(2, 2)):
            pass


def _objective_ref(lm, keep, on, off, cfg):
    """The documented objective computed through an independent path (hooks.scale_neurons + the reference NLL)."""
    site = lm.site
    V = lm.model.get_output_embeddings().weight.shape[0]
    neurons = {l: torch.arange(site.d_mlp) for l in range(site.n_layers)}
    with scale_neurons(site, neurons, {l: keep[l] for l in range(site.n_layers)}):
        on_t, off_t = _token_nll_ref(lm, on), _token_nll_ref(lm, off)
    return (np.maximum(math.log(V) - on_t, 0).mean() + cfg.beta * off_t.mean()
            + cfg.lam * float((1 - keep.double()).sum()))


def test_mask_gradient_matches_finite_differences(lm, enc):
    """The autograd gradient of the objective w.r.t. each keep factor has the sign (and size) of a central finite
    difference computed through an independent hook path; a neuron whose removal raises the on-target suppression
    term gets a positive gradient (descent lowers its keep factor)."""
    site = lm.site
    cfg = MaskConfig(beta=0.5, lam=1e-3)
    # a fixed, slightly random keep vector so that the point is generic
    g = torch.Generator().manual_seed(0)
    keep0 = (0.7 + 0.25 * torch.rand(site.n_layers, site.d_mlp, generator=g)).double()
    on, off = enc[:3], enc[3:]
    keep = keep0.clone().float().requires_grad_(True)
    loss, _ = mask_loss(lm, keep, on, off, cfg, None)
    loss.backward()
    grad = keep.grad.double()
    assert float(loss.detach()) == pytest.approx(_objective_ref(lm, keep0.float(), on, off, cfg), rel=1e-4)
    flat = grad.reshape(-1)
    picks = torch.argsort(flat.abs(), descending=True)[:4].tolist()
    h = 1e-2
    for j in picks:
        l, i = divmod(j, site.d_mlp)
        kp, km = keep0.clone(), keep0.clone()
        kp[l, i] += h
        km[l, i] -= h
        fd = (_objective_ref(lm, kp.float(), on, off, cfg) - _objective_ref(lm, km.float(), on, off, cfg)) / (2 * h)
        assert np.sign(fd) == np.sign(float(flat[j]))
        assert fd == pytest.approx(float(flat[j]), rel=0.05, abs=1e-4)


def test_learn_mask_frozen_weights_and_progress(lm, enc):
    snap = {k: p.detach().clone() for k, p in lm.model.named_parameters()}
    flags = {k: p.requires_grad for k, p in lm.model.named_parameters()}
    cfg = MaskConfig(steps=25, lr=0.2, init=2.0, beta=0.0, lam=0.0, batch_size=3)
    res = learn_mask(lm, enc[:3], enc[3:], cfg, progress=False)
    for k, p in lm.model.named_parameters():
        assert torch.equal(p, snap[k]), k
        assert p.requires_grad == flags[k], k
    assert count_hooks(lm.model) == 0
    # with only the suppression term, the mask must make the on-target data worse than at the start
    assert res.history[-1]["nll_on"] > res.history[0]["nll_on"]
    assert res.history[-1]["suppression"] < res.history[0]["suppression"]
    r = res.ranking()
    assert sorted(r.tolist()) == list(range(lm.site.n_layers * lm.site.d_mlp))
    assert np.all(np.diff(res.logits.reshape(-1).numpy()[r]) >= 0)


def test_mask_set_and_round_trip(lm, tmp_path):
    L, d = lm.site.n_layers, lm.site.d_mlp
    logits = torch.full((L, d), 3.0)
    logits[0, 4], logits[2, 1] = -1.0, -0.5
    res = MaskResult(logits, [{"step": 0}], {"model_id": "tiny"})
    ns = res.neuron_set()
    assert ns.pairs.tolist() == [[0, 4], [2, 1]]
    assert np.allclose(ns.mean_score, [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-0.5))])
    assert res.ranking()[:2].tolist() == [4, 2 * d + 1]
    res.save(tmp_path)
    back = MaskResult.load(tmp_path)
    assert torch.equal(back.logits, res.logits) and back.meta["model_id"] == "tiny"
    from caploc.results import NeuronSet

    assert NeuronSet.load(tmp_path).pairs.tolist() == [[0, 4], [2, 1]]


def test_bad_config():
    with pytest.raises(CaplocError):
        MaskConfig(fill="median")
    with pytest.raises(CaplocError):
        MaskConfig(lr=0)
