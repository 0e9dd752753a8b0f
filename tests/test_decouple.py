"""Decoupling: group construction (deterministic, groups are what they claim), within-group aggregation by hand,
result save/load/report, and a tiny end-to-end run through the CLI."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from caploc.data import load_dataset
from caploc.errors import CaplocError
from caploc.runs import StageResult
from caploc.stages.decouple import (
    DecoupleConfig,
    DecoupleResult,
    DomainResult,
    Group,
    content_items,
    content_sharing,
    diff_ci,
    fact_groups,
    group_agreement,
    gsm_groups,
)


@pytest.fixture(scope="module")
def gsm_pool():
    return load_dataset("gsm_symbolic", n=600, seed=0, target="answer")


@pytest.fixture(scope="module")
def facts_pool():
    return load_dataset("facts")


def _keys(groups):
    return {k: [(g.key, g.indices) for g in v] for k, v in groups.items()}


def test_content_items_by_hand():
    q = "Question: James has 2,400 apples and 3 pears. He eats 3.5 apples. How many are left?\nAnswer:"
    v = {"name": "James", "n": 2400, "m": 3, "e": 3.5, "total": 2403, "fruit": "apples", "other": "plums",
         "flag": True, "items": ["pears", "kiwis"]}
    assert content_items(q, v) == {"str=james", "num=2400", "num=3", "num=3.5", "str=apples", "str=pears"}


def test_gsm_groups_are_deterministic_and_what_they_claim(gsm_pool):
    g1, items = gsm_groups(gsm_pool, 4, 4, seed=0)
    g2, _ = gsm_groups(gsm_pool, 4, 4, seed=0)
    g3, _ = gsm_groups(gsm_pool, 4, 4, seed=1)
    assert _keys(g1) == _keys(g2) and _keys(g1) != _keys(g3)
    assert {k: len(v) for k, v in g1.items()} == {"commonality": 4, "content": 4, "random": 4}
    S = list(gsm_pool)
    all_idx = [i for gs in g1.values() for g in gs for i in g.indices]
    assert len(all_idx) == len(set(all_idx))  # no problem in two groups
    for g in g1["commonality"]:
        tpls = {S[i].meta["template"] for i in g.indices}
        assert len(tpls) == 1 and g.key == f"tpl-{tpls.pop()}"
        vs = [json.dumps(S[i].meta["variables"], sort_keys=True) for i in g.indices]
        assert len(set(vs)) == len(vs)  # pairwise different variables
    for g in g1["content"]:
        tpls = [S[i].meta["template"] for i in g.indices]
        assert len(set(tpls)) == len(tpls) >= 2  # pairwise different templates
        shared = g.key.split("+")
        assert shared[0].startswith("str=") and set(shared) <= set(g.shared)
        for i in g.indices:
            assert set(shared) <= content_items(S[i].prompt, S[i].meta["variables"]) == items[i]
            word = shared[0][4:]
            assert re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", S[i].prompt.lower())
    sharing = content_sharing(g1, items)
    assert sharing["content"]["shared_by_all_mean"] >= 1 and sharing["random"]["shared_by_all_mean"] <= \
        sharing["content"]["shared_by_all_mean"]


def test_fact_groups_are_what_they_claim(facts_pool):
    g, items = fact_groups(facts_pool, 6, 5, seed=0)
    assert _keys(g) == _keys(fact_groups(facts_pool, 6, 5, seed=0)[0])
    S = list(facts_pool)
    for grp in g["commonality"]:
        rels = {S[i].meta["relation_id"] for i in grp.indices}
        assert len(rels) == 1
        for key in ("subject", "attribute"):
            vals = [S[i].meta[key] for i in grp.indices]
            assert len(set(vals)) == len(vals)
    for grp in g["content"]:
        attrs = {S[i].meta["attribute"] for i in grp.indices}
        rels = [S[i].meta["relation_id"] for i in grp.indices]
        assert len(attrs) == 1 and len(set(rels)) == len(rels) == 5 and grp.key == f"attr={attrs.pop()}"
    # the data has 12 attributes in >= 5 relations and none in >= 10
    assert len(fact_groups(facts_pool, 20, 5, seed=0)[0]["content"]) == 12
    assert fact_groups(facts_pool, 4, 10, seed=0)[0]["content"] == []


def test_group_agreement_by_hand():
    sets = [np.array([1, 2, 3]), np.array([2, 3, 4]), np.array([3, 4, 5])]
    # IoU: (1,2) 2/4, (1,3) 1/5, (2,3) 2/4
    assert group_agreement(sets, "iou") == pytest.approx((0.5 + 0.2 + 0.5) / 3)
    # symmetrised overlap: 2/3, 1/3, 2/3
    assert group_agreement(sets, "overlap") == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)
    assert np.isnan(group_agreement([np.array([], int), np.array([], int)]))
    assert diff_ci([1.0, 1.0], [0.0, 0.0]) == (1.0, 1.0, 1.0)
    d, lo, hi = diff_ci([0.5, 0.6, 0.7], [0.1, 0.2, 0.3], n_boot=500, seed=3)
    assert d == pytest.approx(0.4) and lo <= d <= hi and diff_ci([0.5, 0.6, 0.7], [0.1, 0.2, 0.3], 500, 3) == (d, lo, hi)


def _hand_result():
    L, d = 2, 10
    sets = [np.array(s) for s in ([0, 1, 2], [0, 1, 2], [0, 1, 3], [5, 6], [7, 8], [9, 15], [11], [12], [13, 14])]
    groups = {"commonality": [Group("commonality", "t0", [0, 1]), Group("commonality", "t1", [1, 2])],
              "content": [Group("content", "c0", [3, 4]), Group("content", "c1", [4, 5])],
              "random": [Group("random", "r0", [6, 7]), Group("random", "r1", [7, 8])]}
    dr = DomainResult("gsm_symbolic", groups, [f"s{i}" for i in range(9)], sets, np.zeros(9),
                      {k: {"shared_by_all_mean": 0.0, "pairwise_content_jaccard": 0.0} for k in groups},
                      list(range(9)))
    cfg = DecoupleConfig(n_groups=2, group_size=2, pool_size=100, n_boot=200).to_dict()
    return DecoupleResult({"gsm_symbolic": dr}, L, d, cfg, {"model_id": "hand"})


def test_result_summary_report_save_load(tmp_path):
    r = _hand_result()
    s = r.summary()["gsm_symbolic"]
    assert s["iou"]["commonality"]["per_group"] == pytest.approx([1.0, 0.5])
    assert s["iou"]["content"]["per_group"] == pytest.approx([0.0, 0.0])
    assert s["iou"]["commonality"]["mean"] == pytest.approx(0.75) and s["follows_commonality"] is True
    assert isinstance(r, StageResult) and r.provenance["model_id"] == "hand"
    r.save(tmp_path)
    b = DecoupleResult.load(tmp_path)
    assert json.dumps(b.summary()) == json.dumps(r.summary())
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["kind"] == "decouple" and rep["claims"]["follows_commonality"]["value"] is True
    assert rep["claims"]["decoupling_commonality_iou"]["value"] == pytest.approx(0.75)
    assert {"decoupling_content_iou", "decoupling_random_iou"} <= set(rep["claims"])
    for f in rep["figures"]:
        assert (tmp_path / f["file"]).exists()


def test_config_validation():
    with pytest.raises(CaplocError):
        DecoupleConfig(domains=["gsm"])
    with pytest.raises(CaplocError):
        DecoupleConfig(group_size=1)
    full = DecoupleConfig.full()
    assert full.n_groups * full.group_size == 1000


def test_cli_end_to_end_tiny(tmp_path):
    from caploc.cli import main

    out = tmp_path / "dec"
    rc = main(["decouple", "--model", "tiny:llama", "--domains", "facts", "--n-groups", "2", "--group-size", "2",
               "--pool-size", "60", "--rule", "topk", "--topk", "20", "--n-boot", "100", "--out", str(out)])
    assert rc == 0
    r = DecoupleResult.load(out)
    d = r.domains["facts"]
    assert len(d.sets) == 12 and all(s.size == 20 for s in d.sets)
    rep = json.loads((out / "report.json").read_text())
    assert "facts_follows_commonality" in rep["claims"]


def test_domain_without_groups_is_skipped_or_refused():
    from caploc.errors import DataError
    from caploc.models import load_model
    from caploc.stages.decouple import decouple

    lm = load_model("tiny:llama")
    with pytest.raises(DataError) as ei:  # facts: no attribute occurs in 10 relations -> nothing left to measure
        decouple(lm, DecoupleConfig(domains=["facts"], n_groups=2, group_size=10, pool_size=60), progress=False)
    assert "facts" in str(ei.value) and "\n" not in str(ei.value)
