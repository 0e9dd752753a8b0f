"""Known-answer tests for caploc.stats (hand-computed values; no model needed)."""

import itertools
import math

import numpy as np
import pytest

from caploc import stats
from caploc.errors import CaplocError

# ---------------------------------------------------------------------------------------------------------------
# conversion


def test_to_flat_to_pairs_round_trip():
    d = 10
    pairs = [[2, 3], [0, 9], [1, 0], [0, 0], [2, 3]]  # unsorted, one duplicate
    flat = stats.to_flat(pairs, d)
    assert flat.dtype == np.int64
    assert flat.tolist() == [0, 9, 10, 23]
    back = stats.to_pairs(flat, d)
    assert back.dtype == np.int64 and back.shape == (4, 2)
    assert back.tolist() == [[0, 0], [0, 9], [1, 0], [2, 3]]
    assert np.array_equal(stats.to_flat(back, d), flat)


def test_to_flat_empty_and_errors():
    assert stats.to_flat([], 8).shape == (0,)
    assert stats.to_pairs([], 8).shape == (0, 2)
    with pytest.raises(CaplocError):
        stats.to_flat([[0, 8]], 8)  # idx == d_mlp
    with pytest.raises(CaplocError):
        stats.to_flat([[-1, 0]], 8)
    with pytest.raises(CaplocError):
        stats.to_flat([[3, 0]], 8, n_layers=3)
    with pytest.raises(CaplocError):
        stats.to_flat([[0, 1, 2]], 8)
    with pytest.raises(CaplocError):
        stats.to_flat([[0, 1]], 0)
    with pytest.raises(CaplocError):
        stats.to_flat([[0, 1.5]], 8)


def test_per_layer_counts():
    flat = stats.to_flat([[0, 1], [0, 2], [2, 0], [2, 4], [2, 3]], 5)
    assert stats.per_layer_counts(flat, 4, 5).tolist() == [2, 0, 3, 0]
    assert stats.per_layer_counts([], 3, 5).tolist() == [0, 0, 0]
    with pytest.raises(CaplocError):
        stats.per_layer_counts([20], 4, 5)  # flat 20 is layer 4 of a 4-layer model


# ---------------------------------------------------------------------------------------------------------------
# agreement metrics on hand-made sets

A = np.array([1, 2, 3, 4], dtype=np.int64)
B = np.array([3, 4, 5, 6, 7, 8], dtype=np.int64)  # |A∩B| = 2, |A∪B| = 8


def test_metrics_known_values():
    assert stats.overlap_rate(A, B) == pytest.approx(2 / 4)
    assert stats.overlap_rate(B, A) == pytest.approx(2 / 6)
    assert stats.overlap_min(A, B) == pytest.approx(2 / 4)
    assert stats.iou(A, B) == pytest.approx(2 / 8)
    assert stats.dice(A, B) == pytest.approx(4 / 10)
    ag = stats.agreement(A, B)
    assert ag["overlap_ab"] == pytest.approx(0.5)
    assert ag["overlap_ba"] == pytest.approx(1 / 3)
    assert ag["overlap"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert ag["overlap_min"] == pytest.approx(0.5)
    assert ag["iou"] == pytest.approx(0.25)
    assert ag["dice"] == pytest.approx(0.4)
    assert (ag["size_a"], ag["size_b"], ag["intersection"]) == (4, 6, 2)


def test_metrics_identical_disjoint_subset_empty():
    assert stats.agreement(A, A)["iou"] == 1.0 and stats.agreement(A, A)["overlap"] == 1.0
    dis = stats.agreement(A, [10, 11])
    assert dis["iou"] == 0.0 and dis["dice"] == 0.0 and dis["overlap"] == 0.0
    sub = stats.agreement([3, 4], A)  # subset
    assert sub["overlap_min"] == 1.0 and sub["overlap_ab"] == 1.0 and sub["overlap_ba"] == 0.5
    assert sub["iou"] == pytest.approx(0.5)
    # empty sets: 0/0 -> nan
    assert math.isnan(stats.overlap_rate([], A)) and stats.overlap_rate(A, []) == 0.0
    assert math.isnan(stats.iou([], [])) and math.isnan(stats.dice([], []))
    assert stats.iou([], A) == 0.0
    assert math.isnan(stats.overlap_min([], A))


def test_metrics_treat_input_as_set():
    # unsorted with duplicates == sorted unique
    assert stats.agreement([4, 3, 2, 1, 1], B) == stats.agreement(A, B)
    with pytest.raises(CaplocError):
        stats.iou([-1, 2], [2])
    with pytest.raises(CaplocError):
        stats.iou([[1, 2]], [2])


def test_pairwise_matrix():
    sets = {"a": A, "b": B, "c": A.copy()}
    names, M = stats.pairwise_matrix(sets, "iou")
    assert names == ["a", "b", "c"]
    assert np.allclose(M, [[1, 0.25, 1], [0.25, 1, 0.25], [1, 0.25, 1]])
    _, R = stats.pairwise_matrix(sets, "overlap_rate")  # asymmetric: row set normalises
    assert R[0, 1] == pytest.approx(0.5) and R[1, 0] == pytest.approx(1 / 3)
    _, D = stats.pairwise_matrix(sets, lambda a, b: len(a) + len(b))
    assert D[0, 1] == 10
    with pytest.raises(CaplocError):
        stats.pairwise_matrix(sets, "nope")


# ---------------------------------------------------------------------------------------------------------------
# hypergeometric / exact chance level


def test_hypergeom_one_layer_sums_to_one_and_mean():
    for N, K, n in [(50, 7, 12), (30, 25, 20), (1, 1, 1), (10, 0, 4), (2048, 300, 900)]:
        pmf = stats.hypergeom_pmf(N, K, n)
        k = np.arange(pmf.size)
        # raw lgamma formula (not renormalised): rounding grows like N log N * eps
        assert pmf.sum() == pytest.approx(1.0, abs=1e-13 if N < 100 else 1e-10)
        assert (pmf * k).sum() == pytest.approx(K * n / N, rel=1e-10, abs=1e-12)
        # every entry against exact integer binomials
        exact = [math.comb(K, j) * math.comb(N - K, n - j) / math.comb(N, n) for j in range(pmf.size)]
        assert np.allclose(pmf, exact, rtol=1e-9, atol=1e-300)
    # support lower bound: K + n - N = 15 -> P(X < 15) = 0
    assert np.all(stats.hypergeom_pmf(30, 25, 20)[:15] == 0)


def test_hypergeom_matches_brute_force():
    N, K, n = 7, 3, 4
    A_set = set(range(K))  # by symmetry any fixed K-set
    counts = np.zeros(min(K, n) + 1)
    subsets = list(itertools.combinations(range(N), n))
    for s in subsets:
        counts[len(A_set & set(s))] += 1
    assert np.allclose(stats.hypergeom_pmf(N, K, n), counts / len(subsets), atol=1e-14)


def test_intersection_pmf_two_layers_matches_brute_force():
    # enumerate all pairs of layer-matched sets on 2 layers of 4 neurons: sizes a=(2,1), b=(3,2)
    d, sa, sb = 4, [2, 1], [3, 2]
    dist = {}
    combos = lambda sizes: [
        set(c0) | {d + i for i in c1}
        for c0 in itertools.combinations(range(d), sizes[0])
        for c1 in itertools.combinations(range(d), sizes[1])
    ]
    all_a, all_b = combos(sa), combos(sb)
    for x in all_a:
        for y in all_b:
            k = len(x & y)
            dist[k] = dist.get(k, 0) + 1
    total = len(all_a) * len(all_b)
    values, probs = stats.intersection_pmf(sa, sb, d)
    got = dict(zip(values.tolist(), probs.tolist()))
    for k, c in dist.items():
        assert got.get(k, 0.0) == pytest.approx(c / total, abs=1e-14)
    # and the exact expectations agree with brute force
    e_iou = sum(c / total * k / (3 + 5 - k) for k, c in dist.items())
    exp = stats.expected_random_agreement(sa, sb, d)
    assert exp["iou"] == pytest.approx(e_iou, rel=1e-12)
    assert exp["intersection"] == pytest.approx(sum(c / total * k for k, c in dist.items()), rel=1e-12)


def test_expected_intersection_formula():
    sa, sb, d = [10, 0, 5, 64], [8, 3, 5, 1], 64
    exp = stats.expected_random_agreement(sa, sb, d)
    ex = (10 * 8 + 0 + 25 + 64) / 64
    na, nb = 79, 17
    assert exp["intersection"] == pytest.approx(ex)
    assert exp["overlap_ab"] == pytest.approx(ex / na)
    assert exp["overlap_ba"] == pytest.approx(ex / nb)
    assert exp["overlap"] == pytest.approx((ex / na + ex / nb) / 2)
    assert exp["overlap_min"] == pytest.approx(ex / nb)
    assert exp["dice"] == pytest.approx(2 * ex / (na + nb))
    # E[X/(S-X)] >= E[X]/(S-E[X]) by convexity (Jensen), and close for a concentrated X
    assert exp["iou"] >= ex / (na + nb - ex)
    # layer with a_l = d contributes b_l exactly (variance 0)
    exp_full = stats.expected_random_agreement([64], [9], 64)
    assert exp_full["intersection"] == 9 and exp_full["intersection_sd"] == 0 and exp_full["iou"] == pytest.approx(9 / 64)


def test_expected_iou_matches_simulation():
    sa, sb, d = [6, 10, 3], [9, 4, 12], 32
    exp = stats.expected_random_agreement(sa, sb, d)
    n = 20000
    sim = stats.simulate_random_agreement(sa, sb, d, n_draws=n, seed=1)
    for key in ("iou", "intersection", "overlap", "overlap_min", "dice"):
        se = sim[key]["sd"] / math.sqrt(n)
        assert abs(sim[key]["mean"] - exp[key]) < 3 * se, key
    # the test has power: the plug-in E[X]/(|A|+|B|-E[X]) is > 3 MC standard errors away from the simulation
    plug_in = exp["intersection"] / (sum(sa) + sum(sb) - exp["intersection"])
    assert abs(sim["iou"]["mean"] - plug_in) > 3 * sim["iou"]["sd"] / math.sqrt(n)
    # intersection sd matches the analytic hypergeometric variance (MC sd is within a few %)
    assert sim["intersection"]["sd"] == pytest.approx(exp["intersection_sd"], rel=0.05)
    assert set(sim["iou"]) == {"mean", "sd", "q95"}
    assert sim["iou"]["q95"] >= sim["iou"]["mean"]


def test_simulation_seeded_and_edge_layers():
    a = stats.simulate_random_agreement([3, 0, 8], [2, 5, 8], 8, n_draws=50, seed=3)
    b = stats.simulate_random_agreement([3, 0, 8], [2, 5, 8], 8, n_draws=50, seed=3)
    assert a == b
    full = stats.simulate_random_agreement([8], [5], 8, n_draws=10)
    assert full["intersection"] == {"mean": 5.0, "sd": 0.0, "q95": 5.0}


def test_expected_input_errors():
    with pytest.raises(CaplocError):
        stats.expected_random_agreement([1, 2], [1], 10)
    with pytest.raises(CaplocError):
        stats.expected_random_agreement([11], [1], 10)
    with pytest.raises(CaplocError):
        stats.simulate_random_agreement([1], [-1], 10)
    with pytest.raises(CaplocError):
        stats.hypergeom_pmf(5, 6, 1)


def test_expected_realistic_size_is_fast():
    # 30 layers x 8192 neurons, ~1 % per layer: convolution must stay short (tail trimming)
    rng = np.random.default_rng(0)
    sa, sb = rng.integers(40, 120, 30), rng.integers(40, 120, 30)
    exp = stats.expected_random_agreement(sa, sb, 8192)
    assert exp["intersection"] == pytest.approx(float(np.sum(sa * sb)) / 8192)
    assert 0 < exp["iou"] < 0.02


# ---------------------------------------------------------------------------------------------------------------
# random controls


def test_random_layer_matched_set_counts_and_exclusion():
    d, sizes = 10, [3, 0, 10, 9]
    rng = np.random.default_rng(0)
    exclude = stats.to_flat([[0, 0], [0, 1], [3, 5]], d)
    for _ in range(20):
        s = stats.random_layer_matched_set(sizes, d, rng, exclude=exclude)
        assert s.dtype == np.int64 and np.all(np.diff(s) > 0)
        assert stats.per_layer_counts(s, 4, d).tolist() == sizes
        assert np.intersect1d(s, exclude).size == 0
    # layer 3 must be everything but the excluded neuron
    assert set(s[s >= 30].tolist()) == set(range(30, 40)) - {35}
    # seeded: same seed -> same set
    assert np.array_equal(
        stats.random_layer_matched_set(sizes, d, np.random.default_rng(5)),
        stats.random_layer_matched_set(sizes, d, np.random.default_rng(5)),
    )


def test_random_layer_matched_set_impossible():
    with pytest.raises(CaplocError):
        stats.random_layer_matched_set([10], 10, np.random.default_rng(0), exclude=[3])
    with pytest.raises(CaplocError):
        stats.random_layer_matched_set([1], 10, np.random.default_rng(0), exclude=[10])  # outside the model
    assert stats.random_layer_matched_set([0, 0], 4, 0).shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# bootstrap and null comparison


def test_bootstrap_ci_contains_mean_and_deterministic():
    v = np.random.default_rng(0).normal(1.0, 2.0, size=200)
    est, lo, hi = stats.bootstrap_ci(v, n_boot=1000, seed=4)
    assert est == pytest.approx(v.mean())
    assert lo < est < hi
    # roughly the normal-theory half-width 1.96 sd/sqrt(n)
    assert (hi - lo) / 2 == pytest.approx(1.96 * v.std(ddof=1) / math.sqrt(v.size), rel=0.2)
    assert stats.bootstrap_ci(v, n_boot=1000, seed=4) == (est, lo, hi)
    assert stats.bootstrap_ci(v, n_boot=1000, seed=5) != (est, lo, hi)


def test_bootstrap_ci_nan_single_and_custom_stat():
    assert stats.bootstrap_ci([3.0, float("nan")]) == (3.0, 3.0, 3.0)
    assert all(math.isnan(x) for x in stats.bootstrap_ci([float("nan")]))
    v = [1.0, 2.0, 3.0, 4.0, 100.0]
    est, lo, hi = stats.bootstrap_ci(v, n_boot=500, stat=np.median)
    assert est == 3.0 and lo <= 3.0 <= hi
    est2, lo2, hi2 = stats.bootstrap_ci(v, n_boot=500, stat=lambda x: float(np.max(x)))  # no axis kwarg
    assert est2 == 100.0 and hi2 == 100.0 and lo2 <= 100.0
    with pytest.raises(CaplocError):
        stats.bootstrap_ci(v, level=1.0)


def test_compare_to_null_hand_cases():
    null = [0.0, 1.0, 2.0, 3.0, 4.0]  # mean 2, sd sqrt(2.5)
    r = stats.compare_to_null(4.0, null)
    assert r["null_mean"] == 2.0 and r["null_sd"] == pytest.approx(math.sqrt(2.5))
    assert r["z"] == pytest.approx(2.0 / math.sqrt(2.5))
    assert r["percentile"] == pytest.approx(4.5 / 5)  # 4 below + 1 tie counted half
    assert r["p_two_sided"] == pytest.approx((1 + 2) / 6)  # |0-2| and |4-2| >= 2
    assert r["n_null"] == 5 and r["degenerate_null"] is False
    r = stats.compare_to_null(10.0, null)
    assert r["percentile"] == 1.0 and r["p_two_sided"] == pytest.approx(1 / 6)
    r = stats.compare_to_null(-1.0, null)
    assert r["percentile"] == 0.0 and r["z"] < 0
    r = stats.compare_to_null(2.0, null + [float("nan")])  # nan dropped
    assert r["n_null"] == 5 and r["z"] == 0.0 and r["percentile"] == pytest.approx(2.5 / 5)
    assert r["p_two_sided"] == 1.0


def test_compare_to_null_degenerate():
    r = stats.compare_to_null(0.5, [0.1, 0.1, 0.1])
    assert r["degenerate_null"] is True and r["null_sd"] == 0.0
    assert r["z"] == math.inf and r["percentile"] == 1.0 and r["p_two_sided"] == pytest.approx(1 / 4)
    assert stats.compare_to_null(0.0, [0.1, 0.1])["z"] == -math.inf
    r = stats.compare_to_null(0.1, [0.1, 0.1])
    assert r["z"] == 0.0 and r["percentile"] == 0.5 and r["p_two_sided"] == 1.0
    assert stats.compare_to_null(1.0, [2.0])["degenerate_null"] is True  # one value: sd 0
    with pytest.raises(CaplocError):
        stats.compare_to_null(1.0, [])
    with pytest.raises(CaplocError):
        stats.compare_to_null(float("nan"), [1.0, 2.0])
