"""Split stability, threshold sweeps and the cross-capability matrix (caploc.splits and caploc.stages.stability,
sweep, crosscap), checked against hand-computed answers and planted score patterns."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from caploc.localize import LocateConfig, neuron_set_from_scores
from caploc.runs import LocateRun
from caploc.splits import (
    StabilityConfig,
    pair_record,
    rule_config,
    selection_masks,
    set_from_mask,
    split_indices,
    summarize_pairs,
)
from caploc.stages.crosscap import CrossCapResult, crosscap_from_runs
from caploc.stages.stability import StabilityResult, stability
from caploc.stages.sweep import SweepConfig, SweepResult, sweep


def _strict_json(path: Path):
    """Parse JSON refusing NaN / Infinity (not valid JSON)."""
    def bad(c):
        raise AssertionError(f"{path} holds {c}")

    return json.loads(Path(path).read_text(), parse_constant=bad)


def _run(scores, cfg=None, groups=None, meta=None) -> LocateRun:
    meta = {"model_id": "toy", "dataset": "toy", "params_per_neuron": 3, "total_params": 3000, **(meta or {})}
    return LocateRun(None, scores, meta, cfg or LocateConfig(rule="sigma", sigma=2.0, min_freq=0.5), groups, "test")


# ------------------------------------------------------------------------------------------------------------------
# agreement numbers on hand-made split results
# ------------------------------------------------------------------------------------------------------------------
def test_pair_record_hand_computed():
    # one layer of 10 neurons; A = {0,1,2,3}, B = {2,3,4}: X = 2
    r = pair_record(np.array([0, 1, 2, 3]), np.array([2, 3, 4]), n_layers=1, d_mlp=10)
    assert r["intersection"] == 2 and r["size_a"] == 4 and r["size_b"] == 3
    assert r["overlap_ab"] == pytest.approx(2 / 4)
    assert r["overlap_ba"] == pytest.approx(2 / 3)
    assert r["overlap"] == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert r["overlap_min"] == pytest.approx(2 / 3)
    assert r["iou"] == pytest.approx(2 / 5)
    assert r["dice"] == pytest.approx(4 / 7)
    # chance: X ~ Hypergeom(N=10, K=4, n=3): P(0..3) = 20/120, 60/120, 36/120, 4/120; |A|+|B| = 7
    assert r["chance_intersection"] == pytest.approx(1.2)
    assert r["chance_overlap_ab"] == pytest.approx(0.3)
    assert r["chance_overlap_ba"] == pytest.approx(0.4)
    e_iou = 60 / 120 * 1 / 6 + 36 / 120 * 2 / 5 + 4 / 120 * 3 / 4
    assert r["chance_iou"] == pytest.approx(e_iou, rel=1e-9)


def test_summary_resamples_seeds_as_unit():
    # k = 3 -> 3 pairs per seed; 4 seeds with pair IoUs chosen by hand
    iou = {0: [0.2, 0.4, 0.6], 1: [0.5, 0.5, 0.5], 2: [0.9, 0.6, 0.6], 3: [0.1, 0.1, 0.4]}
    recs = []
    for seed, vals in iou.items():
        for (a, b), v in zip(((0, 1), (0, 2), (1, 2)), vals):
            recs.append({"kind": "random", "seed": seed, "a": a, "b": b, "size_a": 10, "size_b": 10,
                         "n_samples_a": 5, "n_samples_b": 5, "iou": v, "overlap": v, "overlap_ab": v,
                         "overlap_ba": v, "overlap_min": v, "dice": v, "intersection": 1, "chance_iou": 0.01})
    scfg = StabilityConfig(k=3, seeds=[0, 1, 2, 3], kinds=["random"], n_boot=500)
    s = summarize_pairs(recs, scfg)["random"]
    assert s["ci_unit"] == "seed" and s["n_seeds"] == 4 and s["n_pairs"] == 12
    assert s["iou"]["per_unit"] == pytest.approx([0.4, 0.5, 0.7, 0.2])
    assert s["iou"]["mean"] == pytest.approx(0.45)
    # the bootstrap CI of a mean of 4 seed means lies within [min, max] of those means
    assert 0.2 <= s["iou"]["lo"] <= 0.45 <= s["iou"]["hi"] <= 0.7
    assert s["iou"]["chance"] == pytest.approx(0.01)
    # with 2 seeds the pairs are the unit
    s2 = summarize_pairs([r for r in recs if r["seed"] < 2], StabilityConfig(k=3, seeds=[0, 1], kinds=["random"]))
    assert s2["random"]["ci_unit"] == "pair" and len(s2["random"]["iou"]["per_unit"]) == 6


def _planted(groups: list[str], d: int = 16, L: int = 2) -> torch.Tensor:
    """Every sample selects neuron 5; group x samples also neuron 3, group y samples neuron 7 (flat indices)."""
    scores = torch.zeros(len(groups), L, d)
    flat = scores.view(len(groups), -1)
    for i, g in enumerate(groups):
        flat[i, 5] = 10.0
        flat[i, 3 if g == "x" else 7] = 10.0
    return scores


def test_planted_split_agreement_exact(tmp_path):
    groups = ["x", "y"] * 4  # 8 samples, 4 of each group
    run = _run(_planted(groups), groups=groups)
    scfg = StabilityConfig(k=2, seeds=[0, 1, 2, 3, 4], kinds=["random", "group"], null_draws=0, n_boot=200)
    res = stability(run, scfg, out_dir=tmp_path)
    assert res.full_set.flat.tolist() == [3, 5, 7]  # each of 3 and 7 is in 4/8 = 50% of samples
    for r in res.pairs:
        if r["kind"] == "group":  # one part = all x samples {3, 5}, the other all y {5, 7}
            assert (r["size_a"], r["size_b"], r["intersection"]) == (2, 2, 1)
            assert r["iou"] == pytest.approx(1 / 3) and r["overlap"] == pytest.approx(0.5)
        else:  # a part of 4 selects 3 iff it holds >= 2 x samples (S = 2 of 4)
            parts = split_indices(8, groups, 2, r["seed"], "random")
            c = sum(groups[i] == "x" for i in parts[0])
            want = {3, 5, 7} if c == 2 else ({3, 5} if c > 2 else {5, 7})
            got = set(res.split_sets[("random", r["seed"], 0)][1].tolist())
            assert got == want
            assert r["iou"] == pytest.approx(1.0 if c == 2 else 1 / 3)
    # chance of the group pairs: 2 + 2 neurons in layer 0 of 16 -> E[X] = 2*2/16
    g = [r for r in res.pairs if r["kind"] == "group"][0]
    assert g["chance_intersection"] == pytest.approx(0.25)
    assert res.summary["group"]["iou"]["mean"] == pytest.approx(1 / 3)
    claims = res.claims()
    assert claims["split_iou"]["split_kind"] == "random" and claims["split_iou_group"]["value"] == pytest.approx(1 / 3)
    assert claims["share_of_params"]["value"] == pytest.approx(3 * 3 / 3000)
    # save / load round trip
    back = StabilityResult.load(tmp_path)
    assert back.summary == _strict_json(tmp_path / "stability.json")["summary"]
    assert back.full_set.flat.tolist() == [3, 5, 7]
    assert set(back.split_sets) == set(res.split_sets)
    for key, (idx, flat) in res.split_sets.items():
        assert np.array_equal(back.split_sets[key][0], idx) and np.array_equal(back.split_sets[key][1], flat)


# ------------------------------------------------------------------------------------------------------------------
# group-disjoint splits
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
def test_group_disjoint_splits_share_no_group(k):
    rng = np.random.default_rng(0)
    groups = [f"tpl-{g}" for g in rng.integers(0, 9, size=50)]
    for seed in range(5):
        parts = split_indices(50, groups, k, seed, "group")
        assert len(parts) == k
        assert sorted(np.concatenate(parts).tolist()) == list(range(50))  # a partition of the samples
        gsets = [{groups[i] for i in p} for p in parts]
        for i in range(k):
            for j in range(i + 1, k):
                assert not gsets[i] & gsets[j]
    rand = split_indices(50, groups, k, 0, "random")
    assert sorted(len(p) for p in rand) == sorted([50 // k + (1 if i < 50 % k else 0) for i in range(k)])


def test_group_split_without_groups_is_refused():
    from caploc.errors import CaplocError

    with pytest.raises(CaplocError, match="groups"):
        split_indices(10, None, 2, 0, "group")
    run = _run(_planted(["x", "y"] * 4), groups=None)
    res = stability(run, StabilityConfig(kinds=["random", "group"], null_draws=0, n_boot=50))
    assert list(res.summary) == ["random"] and "group" in res.kinds_skipped


# ------------------------------------------------------------------------------------------------------------------
# a sweep point equals a fresh localization
# ------------------------------------------------------------------------------------------------------------------
def test_sweep_points_equal_fresh_localization(tmp_path):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 3, 20, generator=g) ** 3  # heavy tails so the sigma rule selects a few per sample
    groups = [f"g{i % 4}" for i in range(12)]
    base = LocateConfig(rule="sigma", sigma=2.0, min_freq=0.25)
    run = _run(scores, base, groups)
    sw = SweepConfig(sigmas=[1.0, 2.0, 3.0], min_freqs=[0.1, 0.25, 0.5, 3, 1.0], topks=[2, 5],
                     split=StabilityConfig(k=2, seeds=[0, 1, 2], kinds=["random", "group"], null_draws=0, n_boot=100))
    res = sweep(run, sw, tmp_path)
    assert len(res.points) == 3 + 5 + 2
    nonempty = 0
    for p in res.points:
        cfg = rule_config(base, p["rule"], p["rule_value"], p["min_freq"])
        fresh = neuron_set_from_scores(scores, cfg, {})
        assert p["neurons"] == fresh.flat.tolist(), p
        assert p["n_neurons"] == len(fresh)
        nonempty += bool(len(fresh))
        # the split sets behind the agreement numbers are fresh localizations of the split's samples
        mask = selection_masks(scores, cfg)
        for kind in ("random", "group"):
            parts = split_indices(12, groups, 2, 1, kind)
            for idx in parts:
                assert set_from_mask(mask, cfg.min_freq, idx).tolist() == \
                    neuron_set_from_scores(scores[torch.as_tensor(idx)], cfg, {}).flat.tolist()
    assert nonempty >= 5  # the check is not vacuous
    # n_samples axis: a point on the first 8 samples equals a fresh localization of scores[:8]
    sz = sweep(run, SweepConfig(sigmas=[], min_freqs=[], topks=[], sizes=[8, 12], split=sw.split), axes=("n_samples",))
    assert [p["n_samples"] for p in sz.points] == [8, 12]
    assert sz.points[0]["neurons"] == neuron_set_from_scores(scores[:8], base, {}).flat.tolist()
    assert sz.points[1]["neurons"] == neuron_set_from_scores(scores, base, {}).flat.tolist()
    # the grid of sizes agrees with the sigma-axis points at the same S
    g_sig = res.grid["sigmas"].index(2.0)
    g_s = res.grid["min_freqs"].index(0.25)
    pt = [p for p in res.points if p["axis"] == "sigma" and p["rule_value"] == 2.0][0]
    assert res.grid["n_neurons"][g_sig][g_s] == pt["n_neurons"]
    rep = _strict_json(tmp_path / "report.json")
    assert rep["kind"] == "sweep" and {f["file"] for f in rep["figures"]} == {
        "fig_sweep_sigma.png", "fig_sweep_min_freq.png", "fig_sweep_topk.png"}
    for f in rep["figures"]:
        assert (tmp_path / f["file"]).read_bytes()[:4] == b"\x89PNG"
    back = SweepResult.load(tmp_path)
    assert back.points == _strict_json(tmp_path / "sweep.json")["points"]


def test_empty_sets_are_reported_not_crashing(tmp_path):
    scores = _planted(["x", "y"] * 4)
    run = _run(scores, LocateConfig(rule="sigma", sigma=2.0, min_freq=1.0), ["x", "y"] * 4)
    res = stability(run, StabilityConfig(seeds=[0, 1, 2], kinds=["group"], null_draws=20, n_boot=50), out_dir=tmp_path)
    # S = 100%: group splits keep {3,5} and {5,7}; the full set keeps only neuron 5
    assert res.full_set.flat.tolist() == [5]
    sw = sweep(run, SweepConfig(sigmas=[50.0], min_freqs=[1.0], topks=[1],
                                split=StabilityConfig(seeds=[0, 1, 2], kinds=["random"], null_draws=0, n_boot=50)),
               tmp_path / "sw", axes=("sigma",))
    p = sw.points[0]
    assert p["n_neurons"] == 0 and p["agreement"]["random"]["iou"] is None
    assert p["agreement"]["random"]["n_empty_pairs"] == 3
    _strict_json(tmp_path / "sw" / "report.json")
    _strict_json(tmp_path / "report.json")


# ------------------------------------------------------------------------------------------------------------------
# cross-capability matrix
# ------------------------------------------------------------------------------------------------------------------
def test_crosscap_matrix_hand_computed(tmp_path):
    d, L = 16, 2

    def planted(neurons, n=6):
        s = torch.zeros(n, L, d)
        for nn in neurons:
            s.view(n, -1)[:, nn] = 10.0
        return s

    cfg = LocateConfig(rule="sigma", sigma=1.0, min_freq=0.5)
    runs = {"a": _run(planted([1, 2, 3, 20]), cfg), "b": _run(planted([2, 3, 4]), cfg), "c": _run(planted([30]), cfg)}
    res = crosscap_from_runs(runs, cfg, StabilityConfig(seeds=[0, 1, 2], n_boot=50), tmp_path)
    assert res.names == ["a", "b", "c"] and res.sizes == [4, 3, 1]
    i = {n: k for k, n in enumerate(res.names)}
    assert res.iou[i["a"], i["b"]] == pytest.approx(2 / 5)
    assert res.overlap_rate[i["a"], i["b"]] == pytest.approx(2 / 4)  # row-normalised
    assert res.overlap_rate[i["b"], i["a"]] == pytest.approx(2 / 3)
    assert res.iou[i["a"], i["c"]] == 0.0
    assert np.allclose(np.diag(res.iou), 1.0)  # identical samples -> every split finds the same set
    assert res.iou_matched[i["a"], i["b"]] == pytest.approx(2 / 5)  # split sets = full sets here
    assert res.iou_matched[i["b"], i["c"]] == 0.0
    # chance a vs b: layer 0 sizes 3 and 3 of 16 (layer 1: 1 and 0) -> E[X] = 9/16, E[X]/|A| = 9/64
    assert res.chance_overlap_rate[i["a"], i["b"]] == pytest.approx(9 / 64)
    assert res.intersection[i["a"], i["b"]] == 2
    assert res.shared_counts() == {"shared_by_all": 0, "unique": {"a": 2, "b": 1, "c": 1}}
    rep = _strict_json(tmp_path / "report.json")
    assert rep["kind"] == "crosscap" and (tmp_path / "fig_crosscap.png").exists()
    # head(n): the first n stored samples, recorded in the provenance
    h = runs["a"].head(4)
    assert h.n_samples == 4 and torch.equal(h.scores, runs["a"].scores[:4])
    assert h.summary()["samples_used"] == "first 4 of 6"
    back = CrossCapResult.load(tmp_path)
    assert np.allclose(back.iou, res.iou) and back.sizes == res.sizes
    assert np.allclose(back.iou_matched, res.iou_matched)


# ------------------------------------------------------------------------------------------------------------------
# end to end on a tiny model through the CLI
# ------------------------------------------------------------------------------------------------------------------
def _write_data(path: Path, n: int = 16) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
        rows.append({"prompt": f"Q{i % 4}: {a}+{b}=", "target": f" {a + b}", "group": f"tpl-{i % 4}"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_cli_stability_sweep_crosscap_tiny(tmp_path):
    from caploc.cli import main

    data = _write_data(tmp_path / "toy.jsonl")
    out = tmp_path / "stab"
    common = ["--model", "tiny:llama", "--method", "grad_x_act", "--rule", "topk", "--topk", "6", "--min-freq", "0.3"]
    rc = main(["stability", "--data", str(data), "--group-field", "group", *common, "--seeds", "3",
               "--null-draws", "50", "--n-boot", "200", "--out", str(out)])
    assert rc == 0
    rep = _strict_json(out / "report.json")
    assert {"kind", "title", "text", "tables", "figures", "claims"} <= set(rep)
    assert rep["kind"] == "stability"
    assert {"split_overlap", "split_iou", "chance_iou", "share_of_params"} <= set(rep["claims"])
    assert {"split_overlap_group", "split_iou_group"} <= set(rep["claims"])  # groups came through the data file
    for f in rep["figures"]:
        assert (out / f["file"]).read_bytes()[:4] == b"\x89PNG"
    c = rep["claims"]["split_iou"]
    assert c["value"] is not None and c["ci"][0] <= c["value"] <= c["ci"][1] and 0 <= c["chance"] < c["value"]
    assert (out / "locate" / "scores" / "store.json").exists()
    # rerun from the stored run: same numbers (no attribution recomputed, deterministic splits)
    out2 = tmp_path / "stab2"
    rc = main(["stability", "--run", str(out / "locate"), "--seeds", "3", "--null-draws", "50", "--n-boot", "200",
               "--out", str(out2)])
    assert rc == 0
    assert _strict_json(out2 / "stability.json")["summary"] == _strict_json(out / "stability.json")["summary"]
    # sweep from the same run
    rc = main(["sweep", "--run", str(out / "locate"), "--sigmas", "1,2", "--min-freqs", "0.3,0.9", "--topks", "3,6",
               "--seeds", "3", "--n-boot", "100", "--out", str(tmp_path / "sweep")])
    assert rc == 0
    sw = _strict_json(tmp_path / "sweep" / "sweep.json")
    topk6 = [p for p in sw["points"] if p["axis"] == "topk" and p["rule_value"] == 6][0]
    base = [p for p in sw["points"] if p["axis"] == "min_freq" and p["min_freq"] == 0.3][0]
    from caploc.results import NeuronSet

    assert topk6["neurons"] == base["neurons"] == NeuronSet.load(out, name="full_set").flat.tolist()
    # crosscap over two existing runs (the same scores twice -> off-diagonal IoU exactly 1)
    rc = main(["crosscap", "--run", f"one={out / 'locate'}", "--run", f"two={out / 'locate'}", "--rule", "topk",
               "--topk", "6", "--min-freq", "0.3", "--seeds", "3", "--n-boot", "100", "--out", str(tmp_path / "cc")])
    assert rc == 0
    cc = _strict_json(tmp_path / "cc" / "crosscap.json")
    assert cc["names"] == ["one", "two"] and cc["iou"][0][1] == 1.0
    assert cc["sizes"][0] == len(topk6["neurons"])
    # a bad option value is a one-line error, exit code 2
    assert main(["stability", "--run", str(out / "locate"), "--kinds", "banana", "--out", str(tmp_path / "x")]) == 2


def test_crosscap_own_files_with_field_mapping_and_early_errors(tmp_path, capsys):
    """Own data: columns per capability; a bad capability fails before anything is scored, naming it."""
    import json as _json

    from caploc.cli import main

    sent = tmp_path / "sent.jsonl"
    sent.write_text("".join(_json.dumps({"text": f"review {i} was", "label": " good" if i % 2 else " bad"}) + "\n"
                            for i in range(8)))
    tr = tmp_path / "tr.jsonl"
    tr.write_text("".join(_json.dumps({"src": f"le chat {i}", "dst": f" the cat {i}"}) + "\n" for i in range(8)))
    base = ["crosscap", "--model", "tiny:llama", "--n", "6", "--method", "grad_x_act", "--sigma", "1",
            "--min-freq", "0.3", "--seeds", "2", "--n-boot", "20"]
    caps = ["--caps", f"sent={sent},tr={tr}"]
    out = tmp_path / "cc"
    rc = main([*base, *caps, "--fields", "sent:prompt=text,target=label", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "capability 'tr'" in err and "--fields tr:prompt=COL" in err and "\n" == err[-1]
    assert not (out / "runs").exists(), "scored before finding the bad capability"
    rc = main([*base, *caps, "--fields", "sent:prompt=text,target=label", "--fields", "tr:prompt=src,target=dst",
               "--out", str(out)])
    assert rc == 0
    res = _json.loads((out / "crosscap.json").read_text())
    assert set(res["names"]) == {"sent", "tr"}


def test_per_layer_sigma_runs_through_stability_and_sweep(tmp_path):
    from caploc.cli import main

    loc = tmp_path / "loc"
    assert main(["locate", "--model", "tiny:llama", "--data", "facts", "--n", "8", "--method", "grad_x_act",
                 "--rule", "sigma_layer", "--sigma", "1", "--min-freq", "0.25", "--cards", "0", "--out", str(loc)]) == 0
    assert main(["stability", "--run", str(loc), "--k", "2", "--seeds", "2", "--out", str(tmp_path / "st")]) == 0
    assert main(["sweep", "--run", str(loc), "--sigmas", "1,2", "--min-freqs", "0.25", "--topks", "5",
                 "--out", str(tmp_path / "sw")]) == 0
    import json as _json

    st = _json.loads((tmp_path / "st" / "stability.json").read_text())
    assert st["locate_config"]["rule"] == "sigma_layer"
