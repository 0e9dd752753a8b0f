"""Faithfulness curves: rankings, budgets, AUC, ablation hooks and the curves on a tiny random model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caploc.data import Dataset, Sample, encode_dataset
from caploc.errors import CaplocError
from caploc.hooks import capture, count_hooks
from caploc.localize import select, select_sigma
from caploc.models.loading import load_model
from caploc.results import NeuronSet
from caploc.stages.faithfulness import (
    FaithConfig,
    FaithResult,
    ablate,
    auc,
    budget_grid,
    contrast_rankings,
    faithfulness,
    frequency_ranking,
    normalize_scores,
    normalized,
    random_rankings,
    rank_by,
    rankings_from_scores,
    score_ranking,
)
from caploc.stages.masklearn import mean_activations


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return load_model("tiny:llama")


@pytest.fixture(scope="module")
def enc(lm):
    ds = Dataset("t", [Sample(prompt=f"Question: what is {i} plus {i + 1}?", target=f" {2 * i + 1}") for i in range(6)])
    return encode_dataset(lm.tokenizer, ds)


def _nll_ref(lm, encoded):
    """Independent reference: one sample at a time, no padding."""
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            lp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)
            for t in range(e.prompt_len, len(e)):
                tot -= float(lp[t - 1, e.input_ids[t]])
                cnt += 1
    return tot / cnt


# ---- pure functions ------------------------------------------------------------------------------------------------
def test_auc_closed_forms():
    ks = np.array([1, 10, 100, 1000])
    assert auc(ks, np.full(4, 0.3)) == pytest.approx(0.3)
    # y = x (linear in log k) integrates to 1/2 exactly under the trapezoidal rule
    x = np.log(ks / ks[0]) / math.log(ks[-1] / ks[0])
    assert auc(ks, x) == pytest.approx(0.5)
    # y = x^2 on 3 equally spaced points (x = 0, .5, 1): trapezoid = (0 + .25)/4 + (.25 + 1)/4 = 0.375
    assert auc(np.array([1, 10, 100]), np.array([0.0, 0.25, 1.0])) == pytest.approx(0.375)
    with pytest.raises(CaplocError):
        auc(np.array([5, 1]), np.array([0.0, 1.0]))


def test_budget_grid():
    ks = budget_grid(46080, 5e-5, 0.02, 10)
    assert ks[0] == 2 and ks[-1] == 922 and np.all(np.diff(ks) > 0)
    assert np.allclose(np.diff(np.log(ks[2:])), np.log(922 / 2) / 9, rtol=0.2)
    with pytest.raises(CaplocError):
        budget_grid(100, 0.5, 0.1)


def test_rank_by_ties_and_permutation():
    p = np.array([1.0, 3.0, 3.0, 2.0])
    assert rank_by(p).tolist() == [1, 2, 3, 0]  # ties by index
    assert rank_by(p, np.array([0, 1, 2, 0])).tolist() == [2, 1, 3, 0]  # ties by the secondary key first
    for r in random_rankings(50, 3, 7):
        assert sorted(r.tolist()) == list(range(50))
    assert not np.array_equal(*random_rankings(50, 2, 7))


def test_normalizations_against_reference():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0])[None, :, None]
    lz = normalize_scores(s, "layer_z")
    for i in range(3):
        for l in range(4):
            v = s[i, l].double().numpy()
            assert np.allclose(lz[i, l].numpy(), (v - v.mean()) / v.std())
    pooled = normalize_scores(s, "pooled")
    v = s[1].double().reshape(-1).numpy()
    assert np.allclose(pooled[1].reshape(-1).numpy(), (v - v.mean()) / v.std())
    lm_ = normalize_scores(s, "layer_max")
    assert torch.allclose(lm_.abs().amax(2), torch.ones(3, 4, dtype=torch.float64))
    # the pooled sigma rule thresholds exactly the pooled z-score: same selection
    assert torch.equal(select_sigma(s.reshape(3, -1), 1.5), (pooled.reshape(3, -1) > 1.5))
    # sigma_layer = the per-layer z-score above sigma
    assert torch.equal(select(s.reshape(3, -1), "sigma_layer", 1.0, n_layers=4), (lz.reshape(3, -1) > 1.0))
    with pytest.raises(CaplocError):
        select(s.reshape(3, -1), "sigma_layer", 1.0)


def test_rankings_follow_scores():
    s = torch.zeros(4, 2, 3)
    s[:, 1, 2] = 5.0  # flat neuron 5 is the loudest everywhere
    s[:2, 0, 1] = 1.0  # flat 1 next in two samples
    assert score_ranking(s, "raw")[:2].tolist() == [5, 1]
    assert frequency_ranking(s, sigma=1.0)[0] == 5
    r = rankings_from_scores("x", s, ("raw", "layer_z"), freq=True, sigma=1.0)
    assert set(r) == {"x:raw", "x:layer_z", "x:cnl", "x:cnl_layer"}


def test_contrast_rankings_put_target_only_neurons_before_generic_ones():
    g = torch.Generator().manual_seed(0)
    t, r = torch.randn(6, 2, 8, generator=g) * 0.1, torch.randn(5, 2, 8, generator=g) * 0.1
    t[:, 1, 7] += 10.0  # flat 15: loud everywhere (generic)
    r[:, 1, 7] += 10.0
    t[:, 0, 3] += 6.0  # flat 3: loud on the target only
    assert score_ranking(t)[:2].tolist() == [15, 3]
    c = contrast_rankings("x", t, {"ref": r}, sigma=1.0)
    assert set(c) == {"x:contrast_z", "x:contrast_freq"}
    for v in c.values():
        assert sorted(v.tolist()) == list(range(16))
    assert c["x:contrast_z"][0] == 3 and c["x:contrast_freq"][0] == 3
    assert c["x:contrast_z"].tolist().index(15) > 8  # the generic neuron falls below the noise
    # the statistic by hand: mean pooled z on the target minus the mean over references
    z = lambda a: ((a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdim=True))  # noqa: E731
                   / a.reshape(len(a), -1).std(1, keepdim=True, unbiased=False)).mean(0)
    stat = (z(t.double()) - z(r.double())).numpy()
    assert c["x:contrast_z"].tolist() == np.argsort(-stat, kind="stable").tolist()
    with pytest.raises(CaplocError, match="same model"):
        contrast_rankings("x", t, {"ref": torch.zeros(3, 2, 4)})
    with pytest.raises(CaplocError, match="reference"):
        contrast_rankings("x", t, {})


def test_normalized_directions():
    assert normalized("erase", np.array([2.0, 4.0]), 2.0, 4.0).tolist() == [0.0, 1.0]
    assert normalized("keep", np.array([2.0, 4.0]), 2.0, 4.0).tolist() == [1.0, 0.0]
    assert np.isnan(normalized("erase", np.array([1.0]), 2.0, 2.0)).all()


# ---- interventions --------------------------------------------------------------------------------------------------
def test_ablate_zero_mean_and_complement(lm, enc):
    site = lm.site
    n = site.n_layers * site.d_mlp
    ids = torch.tensor([enc[0].input_ids])
    fill = torch.randn(site.n_layers, site.d_mlp)
    chosen = np.array([0, 5, site.d_mlp + 3])
    with torch.no_grad():
        # observe what the output projections receive (capture hooks run after the ablation hooks: registered later)
        with ablate(site, chosen, fill), capture(site) as st:
            lm.model(input_ids=ids)
        assert torch.equal(st[0][..., 0], fill[0, 0].expand_as(st[0][..., 0]))
        assert torch.equal(st[1][..., 3], fill[1, 3].expand_as(st[1][..., 3]))
        with ablate(site, chosen, None, complement=True), capture(site) as st:
            lm.model(input_ids=ids)
        x0 = st[0][0]
        assert torch.count_nonzero(x0[:, [1, 2, 4]]) == 0 and torch.count_nonzero(x0[:, [0, 5]]) > 0
        assert torch.count_nonzero(st[2][0]) == 0  # layer 2 has no kept neuron
    assert count_hooks(lm.model) == 0
    with pytest.raises(CaplocError):
        with ablate(site, [n], None):
            pass


def test_identities_k0_and_keep_all(lm, enc):
    site = lm.site
    n = site.n_layers * site.d_mlp
    ids = torch.tensor([enc[1].input_ids])
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
        with ablate(site, np.zeros(0, np.int64), None):  # erase k = 0
            assert torch.equal(lm.model(input_ids=ids).logits, ref)
        with ablate(site, np.arange(n), torch.randn(site.n_layers, site.d_mlp), complement=True):  # keep all
            assert torch.equal(lm.model(input_ids=ids).logits, ref)
        with ablate(site, np.arange(n), None):  # erase all = zero every neuron: differs
            assert not torch.equal(lm.model(input_ids=ids).logits, ref)


def test_curves_on_tiny_model(lm, enc):
    site = lm.site
    n = site.n_layers * site.d_mlp
    snap = {k: p.detach().clone() for k, p in lm.model.named_parameters()}
    means = mean_activations(lm, enc)
    g = np.random.default_rng(3)
    rankings = {"a": g.permutation(n), "b": np.arange(n)}
    s = NeuronSet.from_flat(np.array([1, 2, 3]), site.n_layers, site.d_mlp)
    cfg = FaithConfig(lo=0.01, hi=1.0, points=4, n_random=3)
    data = [("on", enc[:3], "on"), ("off", enc[3:], "off")]
    res = faithfulness(lm, rankings, data, cfg, means=means, sets={"s": s}, progress=False)
    assert res.ks[-1] == n and res.ks[0] == 1
    assert res.methods() == ["a", "b"] and len(res.randoms()) == 3
    # untouched NLL equals an independent per-sample computation
    assert res.base["on"] == pytest.approx(_nll_ref(lm, enc[:3]), rel=1e-5)
    for lab in ("on", "off"):
        for m in ("a", "b", "random:0"):
            # erase k = n (all) equals the fully ablated model; keep k = n (all) equals the untouched model
            assert res.nll["erase"][lab][m][-1] == pytest.approx(res.ablated["erase"][lab], rel=1e-6)
            assert res.nll["keep"][lab][m][-1] == pytest.approx(res.base[lab], rel=1e-6)
            assert res.curve("erase", lab, m)[-1] == pytest.approx(1.0)
            assert res.curve("keep", lab, m)[-1] == pytest.approx(1.0)
    # the fixed set's erase point equals a direct measurement under the same hooks
    with ablate(site, s.flat, None):
        direct = _nll_ref(lm, enc[:3])
    assert res.points["erase"]["on"]["s"][1] == pytest.approx(direct, rel=1e-5)
    rows = res.summary_rows()
    assert len(rows) == 2 * 2 * 2 and all(r["random_auc_mean"] is not None for r in rows)
    # the per-sample record adds up to the means; the bootstrap CI brackets the AUC
    sp = res.samples
    assert sum(sp["base"]["on"]) / sum(sp["counts"]["on"]) == pytest.approx(res.base["on"], rel=1e-9)
    assert sum(sp["nll"]["erase"]["off"]["a"][1]) / sum(sp["counts"]["off"]) == \
        pytest.approx(res.nll["erase"]["off"]["a"][1], rel=1e-9)
    for r in rows:
        lo, hi = r["auc_ci"]
        assert lo - 1e-9 <= r["auc"] <= hi + 1e-9 or abs(hi - lo) > 0
    band = res.random_band("erase", "on")
    assert np.all(band["lo"] <= band["hi"] + 1e-12)
    for k, p in lm.model.named_parameters():
        assert torch.equal(p, snap[k]), k
    assert count_hooks(lm.model) == 0


def test_result_round_trip_and_report(lm, enc, tmp_path):
    from caploc.report.faithfulness import write_report

    n = lm.site.n_layers * lm.site.d_mlp
    res = faithfulness(lm, {"b": np.arange(n)}, [("on", enc[:2], "on")],
                       FaithConfig(lo=0.01, hi=0.5, points=3, n_random=2, directions=("erase",)), progress=False)
    res.save(tmp_path)
    back = FaithResult.load(tmp_path)
    assert back.ks.tolist() == res.ks.tolist() and back.samples == res.samples
    assert back.area("erase", "on", "b") == pytest.approx(res.area("erase", "on", "b"))
    rep = write_report(back, tmp_path)
    assert rep.exists() and (tmp_path / "faithfulness.png").read_bytes()[:4] == b"\x89PNG"


def test_auc_ci_closed_forms():
    """Identical samples: every resample is the sample itself, so the CI is the AUC. Two samples whose curves differ:
    the CI spans the AUCs of each sample alone (the extreme resamples) and no more."""
    ks = np.array([1, 10, 100])
    one = {"counts": {"on": [2, 2]}, "base": {"on": [2.0, 2.0]}, "ablated": {"erase": {"on": [12.0, 12.0]}},
           "nll": {"erase": {"on": {"m": [[4.0, 4.0], [8.0, 8.0], [12.0, 12.0]]}}}}
    res = FaithResult(ks, 1000, {"erase": {"on": {"m": [2.0, 4.0, 6.0]}}}, {"on": 1.0}, {"erase": {"on": 6.0}},
                      samples=one)
    assert res.area("erase", "on", "m") == pytest.approx(0.6)  # y = 0.2, 0.6, 1.0 over x = 0, .5, 1
    lo, hi = res.auc_ci("erase", "on", "m")
    assert lo == pytest.approx(0.6) and hi == pytest.approx(0.6)
    two = {"counts": {"on": [1, 1]}, "base": {"on": [1.0, 1.0]}, "ablated": {"erase": {"on": [11.0, 11.0]}},
           "nll": {"erase": {"on": {"m": [[1.0, 11.0], [1.0, 11.0], [1.0, 11.0]]}}}}
    res2 = FaithResult(ks, 1000, {"erase": {"on": {"m": [6.0, 6.0, 6.0]}}}, {"on": 1.0}, {"erase": {"on": 11.0}},
                       samples=two)
    assert res2.area("erase", "on", "m") == pytest.approx(0.5)
    lo, hi = res2.auc_ci("erase", "on", "m", n_boot=4000)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0)  # {0, 0.5, 1} with probabilities 1/4, 1/2, 1/4
    assert FaithResult(ks, 1000, res.nll, res.base, res.ablated).auc_ci("erase", "on", "m") is None


def test_bad_inputs(lm, enc):
    with pytest.raises(CaplocError):
        FaithConfig(directions=("sideways",))
    with pytest.raises(CaplocError):
        FaithConfig(keep_fill="median")
    with pytest.raises(CaplocError):
        faithfulness(lm, {"bad": np.arange(5)}, [("on", enc[:1], "on")], FaithConfig(n_random=0), progress=False)
    n = lm.site.n_layers * lm.site.d_mlp
    with pytest.raises(CaplocError):  # keep-only with mean fill but no means
        faithfulness(lm, {"b": np.arange(n)}, [("on", enc[:1], "on")], FaithConfig(n_random=0), progress=False)
