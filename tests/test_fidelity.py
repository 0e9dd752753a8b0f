"""Scorer fidelity and stability-gap computations on synthetic stored scores (closed forms, reference code)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caploc.errors import CaplocError
from caploc.localize import LocateConfig, neuron_set_from_scores
from caploc.scorestore import ScoreStore
from caploc.splits import StabilityConfig, split_indices
from caploc.stages.fidelity import (
    align,
    average_ranks,
    compare_scorers,
    fidelity,
    jaccard_rows,
    load_partial,
    sample_counts,
    spearman,
    split_iou,
    stability_curve,
)


def _ranks_ref(x):
    """O(n^2) reference: rank = #smaller + (#equal - 1) / 2."""
    x = np.asarray(x)
    return np.array([(x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])


def test_average_ranks_and_spearman():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # many ties
    assert np.allclose(average_ranks(x), _ranks_ref(x))
    a, b = rng.normal(size=50), rng.normal(size=50)
    d = _ranks_ref(a) - _ranks_ref(b)
    assert spearman(a, b) == pytest.approx(1 - 6 * (d ** 2).sum() / (50 * (50 ** 2 - 1)))
    assert spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    y = rng.integers(0, 3, 50).astype(float)
    ra, ry = _ranks_ref(a), _ranks_ref(y)
    assert spearman(a, y) == pytest.approx(np.corrcoef(ra, ry)[0, 1])
    assert np.isnan(spearman(a, np.ones(50)))


def test_jaccard_rows():
    A = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    B = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    j = jaccard_rows(A, B)
    assert j[0] == pytest.approx(1 / 3) and np.isnan(j[1]) and j[2] == 1.0


def test_compare_scorers_identities():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 3, 40, generator=g)
    s[:, 0, :3] += 10  # some consistently loud neurons
    same = compare_scorers(s, s.clone(), sigma=2.0, topk=5)
    assert same["spearman"] == pytest.approx(1.0)
    assert same["sigma"]["sample_jaccard"] == 1.0 and same["topk"]["sample_jaccard"] == 1.0
    assert same["sigma"]["common_iou"] == 1.0 and same["sigma_layer"]["common_iou"] == 1.0
    mono = compare_scorers(s, torch.exp(s), sigma=2.0, topk=5)  # monotone per sample: ranks and top-k unchanged
    assert mono["spearman"] == pytest.approx(1.0) and mono["topk"]["sample_jaccard"] == 1.0
    other = compare_scorers(s, torch.randn(6, 3, 40, generator=g), sigma=2.0, topk=5)
    assert abs(other["spearman"]) < 0.3 and other["topk"]["sample_jaccard"] < 0.5
    # the commonality set agrees with localize's own set for the same rule
    cfg = LocateConfig(rule="sigma", sigma=2.0, min_freq=0.5)
    ref = neuron_set_from_scores(s, cfg, {})
    assert same["sigma"]["common_size_ref"] == len(ref)
    with pytest.raises(CaplocError):
        compare_scorers(s, s[:, :2])


def _store(root, scores, fingerprint="fp", shard=2, skip=()):
    st = ScoreStore(root / "scores")
    st.open({"dataset": {"fingerprint": fingerprint}, "attribution": {"method": "x"}}, scores.shape[0], shard)
    for k in range(-(-scores.shape[0] // shard)):
        if k in skip:
            continue
        idx = list(range(k * shard, min(scores.shape[0], (k + 1) * shard)))
        st.write_shard(k, idx, scores[idx], [0.0] * len(idx), torch.zeros(len(idx), scores.shape[1]))


def test_partial_stores_and_alignment(tmp_path):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 2, 10, generator=g)
    _store(tmp_path / "a", s)
    _store(tmp_path / "b", 2 * s, skip=(1,))
    a, b = load_partial(tmp_path / "a"), load_partial(tmp_path / "b")
    assert a["complete"] and not b["complete"] and b["index"].tolist() == [0, 1, 4, 5]
    idx, al = align({"a": a, "b": b})
    assert idx.tolist() == [0, 1, 4, 5] and torch.equal(al["b"], 2 * al["a"])
    res = fidelity({"a": tmp_path / "a", "b": tmp_path / "b"}, "a", sigma=1.0, topk=3)
    assert res["n_samples"] == 4 and res["comparisons"]["b"]["spearman"] == pytest.approx(1.0)
    _store(tmp_path / "c", s, fingerprint="other")
    with pytest.raises(CaplocError):
        align({"a": a, "c": load_partial(tmp_path / "c")})
    with pytest.raises(CaplocError):
        fidelity({"a": tmp_path / "a"}, "ig")
    with pytest.raises(CaplocError):
        load_partial(tmp_path / "nothing")


def test_split_iou_reference_and_curve():
    g = torch.Generator().manual_seed(3)
    N, L, d = 12, 2, 30
    s = torch.randn(N, L, d, generator=g)
    s[:, 1, :4] += 6
    scfg = StabilityConfig(k=2, seeds=[0, 1, 2], kinds=["random"], null_draws=0, n_boot=50)
    got = split_iou(s, "sigma", 2.0, 0.5, scfg)
    # reference: localize each half with localize's own function and average the IoU over seeds
    cfg = LocateConfig(rule="sigma", sigma=2.0, min_freq=0.5)
    ious = []
    for seed in scfg.seeds:
        a, b = split_indices(N, None, 2, seed, "random")
        A = set(neuron_set_from_scores(s[torch.as_tensor(a)], cfg, {}).flat.tolist())
        B = set(neuron_set_from_scores(s[torch.as_tensor(b)], cfg, {}).flat.tolist())
        ious.append(len(A & B) / len(A | B))
    assert got["iou"] == pytest.approx(np.mean(ious))
    same = torch.stack([s[0]] * N)  # identical samples: identical halves
    rows = stability_curve(same, [4, 8, N], rules=("sigma", "sigma_layer"), sigmas=(2.0,), min_freqs=(0.5,), seeds=3)
    assert len(rows) == 6 and all(r["iou"] == 1.0 for r in rows)
    assert sample_counts(100) == [8, 16, 32, 64, 100] and sample_counts(8) == [8]
