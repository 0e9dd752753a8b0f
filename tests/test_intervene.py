"""Interventions, controls, specificity and the exportable enhancement, on tiny random models."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from caploc.data import Dataset, Sample
from caploc.errors import CaplocError
from caploc.export import (
    apply_gains,
    export_enhanced,
    folded_gains,
    gain_vectors,
    load_gains,
)
from caploc.hooks import count_hooks
from caploc.models.loading import load_model
from caploc.neurons import gain_for, intervention
from caploc.results import NeuronSet
from caploc.stages.controls import activation_matched_set, random_controls
from caploc.stages.intervene import (
    InterveneConfig,
    InterventionResult,
    _key,
    run_intervention,
    specificity_index,
)
from caploc.verdicts import absolute_specificity, actmatched_share, permutation_p, verdict


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_bit_identical(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n


def _ids(lm, text="Question: what is 2+3?\nAnswer: 5"):
    return torch.tensor([lm.tokenizer.encode(text, add_special_tokens=False)])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------------------------------
# the intervention
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_weights_bit_identical_after_intervention_and_exception(arch):
    lm = load_model(f"tiny:{arch}")
    snap = _snapshot(lm.model)
    ids = _ids(lm)
    base = _logits(lm.model, ids)
    ns = NeuronSet(np.array([[0, 1], [1, 3], [2, 5]]), lm.site.n_layers, lm.site.d_mlp)
    for g in (0.0, 2.0, 0.5):
        with intervention(lm.site, ns, g):
            assert count_hooks(lm.model) == 2 * 0 + 3  # one pre-hook per layer with neurons
            out = _logits(lm.model, ids)
        assert not torch.equal(out, base)
    with pytest.raises(RuntimeError):
        with intervention(lm.site, ns, 3.0):
            _logits(lm.model, ids)
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with folded_gains(lm.site, gain_vectors(ns, 3.0, lm.site.n_layers, lm.site.d_mlp)):
            raise RuntimeError("boom")
    assert count_hooks(lm.model) == 0
    _assert_bit_identical(lm.model, snap)
    assert torch.equal(_logits(lm.model, ids), base)
    with intervention(lm.site, ns, 1.0):  # identity installs nothing
        assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_erase_whole_layer_equals_zeroing_out_proj_input(arch):
    lm = load_model(f"tiny:{arch}")
    ids = _ids(lm)
    layer = 1
    with intervention(lm.site, {layer: np.arange(lm.site.d_mlp)}, gain_for("erase", 2.0)):
        erased = _logits(lm.model, ids)
    h = lm.site.out_projs[layer].register_forward_pre_hook(lambda m, args: (torch.zeros_like(args[0]),))
    try:
        zeroed = _logits(lm.model, ids)
    finally:
        h.remove()
    torch.testing.assert_close(erased, zeroed, rtol=0, atol=1e-6)
    assert not torch.allclose(erased, _logits(lm.model, ids))


def test_gain_for():
    assert gain_for("erase", 5) == 0.0 and gain_for("enhance", 2) == 2.0
    with pytest.raises(CaplocError):
        gain_for("boost", 2)
    with pytest.raises(CaplocError):
        gain_for("enhance", -1)


# ---------------------------------------------------------------------------------------------------------------------
# controls
# ---------------------------------------------------------------------------------------------------------------------
def test_random_controls_match_layers_and_exclude_set():
    d, L = 48, 3
    ns = NeuronSet(np.array([[0, 1], [0, 2], [0, 40], [2, 7], [2, 8]]), L, d)
    sets = random_controls(ns, L, d, 10, seed=3)
    flat = ns.flat
    assert len(sets) == 10
    for s in sets:
        np.testing.assert_array_equal(np.bincount(s // d, minlength=L), [3, 0, 2])
        assert not np.intersect1d(s, flat).size
        assert len(np.unique(s)) == len(s)
    assert len({tuple(s) for s in sets}) == 10  # different seeds, different sets
    again = random_controls(ns, L, d, 10, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(sets, again))  # seeded


def test_activation_matched_set_known_answer():
    act = np.array([[0.0, 1.0, 2.0, 3.0, 10.0, 2.9],
                    [5.0, 4.0, 0.1, 0.2, 0.3, 6.0]])
    # layer 0: set {3 (3.0), 4 (10.0)}: 4 first -> closest free is 5 (2.9), then 3 -> closest free is 2 (2.0)
    # layer 1: set {0 (5.0)} -> 1 (4.0) and 5 (6.0) tie at distance 1: lower index 1
    got = activation_matched_set(np.array([[0, 3], [0, 4], [1, 0]]), act)
    np.testing.assert_array_equal(got, [2, 5, 6 + 1])


def test_specificity_index():
    assert specificity_index(4.0, 0.0) == 1.0
    assert specificity_index(0.0, 4.0) == -1.0
    assert specificity_index(3.0, 3.0) == 0.0
    assert specificity_index(6.0, 2.0) == pytest.approx(0.5)
    assert specificity_index(math.inf, 3.0) == 1.0
    assert math.isnan(specificity_index(0.0, 0.0))


def _synthetic(set_on, set_off, rnd_on, rnd_off, min_controls=None):
    """A result with 2 samples of 1 token each (base NLL 1.0) and hand-set ΔNLL per condition at k = 0; verdicts need
    ``min_controls`` random sets (default: as many as given)."""
    conds = ["set"] + [f"random_{i}" for i in range(len(rnd_on))]
    tokens = {"on": np.array([1, 3]), "off": np.array([2, 2])}
    base = {"on": np.array([1.0, 3.0]), "off": np.array([2.0, 2.0])}
    sums = {}
    for lab, s_eff, r_eff in (("on", set_on, rnd_on), ("off", set_off, rnd_off)):
        for c, e in zip(conds, [s_eff] + list(r_eff)):
            sums[_key(lab, 0.0, c)] = base[lab] + e * tokens[lab]  # uniform ΔNLL e per token
    ds = [{"label": "on", "role": "on"}, {"label": "off", "role": "off"}]
    need = len(rnd_on) if min_controls is None else min_controls
    return InterventionResult(meta={"config": {"primary_k": 0.0, "n_boot": 200, "min_controls": need}}, datasets=ds, ks=[0.0],
                              conditions=conds, tokens=tokens, base=base, sums=sums, sets={})


def test_effects_null_and_specificity_on_synthetic_result():
    rnd = [0.0, 0.1, -0.1, 0.05, -0.05]
    res = _synthetic(1.0, 0.0, rnd, rnd)
    assert res.effect("on", 0.0, "set") == pytest.approx(1.0)
    assert res.base_nll("on") == pytest.approx(1.0)
    c = res.compare("on", 0.0)
    assert c["null_mean"] == pytest.approx(0.0) and c["percentile"] == 1.0
    assert c["z"] == pytest.approx(1.0 / np.std(rnd, ddof=1))
    est, lo, hi = res.effect_ci("on", 0.0)
    assert est == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    spec = res.specificity(0.0)[0]
    assert spec["z_off"] == pytest.approx(0.0) and spec["si"] == pytest.approx(1.0)
    assert spec["excess_on_nats"] == pytest.approx(1.0)
    cl = res.claims()
    assert cl["erase_beats_random"]["holds"] and cl["specificity"]["holds"]
    # a generic set: the same excess on- and off-target -> SI 0, not specific
    gen = _synthetic(1.0, 1.0, rnd, rnd).claims()["specificity"]
    assert gen["value"] == pytest.approx(0.0) and not gen["holds"]
    # hurting off-target data more than on-target data (the previous smollm2 finding) -> SI < 0
    assert _synthetic(0.3, 1.0, rnd, rnd).claims()["specificity"]["value"] < 0


# ---------------------------------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------------------------------
def _data(tag, n=5):
    return Dataset(tag, [Sample(f"{tag} {i}: {'xy' * (i % 3)}?", f" {i * 7}", group=f"g{i % 2}") for i in range(n)])


def test_run_intervention_end_to_end(tmp_path, monkeypatch):
    lm = load_model("tiny:llama")
    snap = _snapshot(lm.model)
    ns = NeuronSet(np.array([[0, 1], [0, 9], [2, 4]]), lm.site.n_layers, lm.site.d_mlp, meta={"dataset": "on"})
    cfg = InterveneConfig(ks=(0.0, 1.0, 3.0), primary_k=0.0, n_random=4, seed=5, act_samples=3, batch_size=3, n_boot=100)
    res = run_intervention(lm, ns, [("on", _data("on"), "on"), ("off", _data("off", 4), "off")], cfg, out_dir=tmp_path,
                           progress=False)
    _assert_bit_identical(lm.model, snap)
    assert count_hooks(lm.model) == 0
    assert res.conditions == ["set", "act_matched", "random_5", "random_6", "random_7", "random_8"]
    for c in res.conditions[1:]:
        assert not np.intersect1d(res.sets[c], ns.flat).size
        np.testing.assert_array_equal(np.bincount(res.sets[c] // lm.site.d_mlp, minlength=3), [2, 0, 1])
    # k = 1 is exactly the untouched model; the set's effect equals an independent recomputation
    assert res.effect("on", 1.0, "set") == 0.0
    from caploc.measure import nll

    base = nll(lm, _data("on"))
    with intervention(lm.site, ns, 3.0):
        enh = nll(lm, _data("on"))
    assert res.effect("on", 3.0, "set") == pytest.approx(enh.nll_per_token - base.nll_per_token, abs=1e-5)
    # random set 6 is the one drawn with seed 6
    from caploc.stats import random_layer_matched_set

    np.testing.assert_array_equal(res.sets["random_6"],
                                  random_layer_matched_set([2, 0, 1], lm.site.d_mlp, np.random.default_rng(6), exclude=ns.flat))
    back = InterventionResult.load(tmp_path)
    assert back.summary_rows() == res.summary_rows()
    assert back.claims() == res.claims()
    rep = json.loads((tmp_path / "report.json").read_text())
    assert {"kind", "title", "text", "tables", "figures", "claims"} <= set(rep)
    assert {"erase_beats_random", "enhance_beats_random", "specificity"} <= set(rep["claims"])
    for f in rep["figures"]:
        assert (tmp_path / f["file"]).stat().st_size > 1000
    # two null histograms; no dose-response curve from two gains besides k = 1 (it needs three)
    assert len(rep["figures"]) == 2 and not any("Dose" in f["title"] for f in rep["figures"])
    from caploc.report import intervene as report_intervene

    drawn = []
    monkeypatch.setattr(report_intervene, "fig_dose_response", lambda r, lab, path: drawn.append(lab))
    res.ks = [0.0, 0.5, 1.0, 3.0]  # three gains besides k = 1 -> a curve per dataset
    report_intervene._figures(res, tmp_path)
    assert drawn == ["on", "off"]


def test_run_intervention_rejects_bad_input():
    lm = load_model("tiny:llama")
    ns = NeuronSet(np.array([[0, 1]]), 3, lm.site.d_mlp)
    with pytest.raises(CaplocError):
        run_intervention(lm, ns, [("off", _data("x"), "off"), ("on", _data("y"), "on")])
    with pytest.raises(CaplocError):
        run_intervention(lm, NeuronSet(np.zeros((0, 2), int), 3, lm.site.d_mlp), [("on", _data("x"), "on")])
    with pytest.raises(CaplocError):
        InterveneConfig(ks=(0.0,), n_random=1)
    with pytest.raises(CaplocError):
        InterveneConfig(ks=(0.0,), primary_k=2.0)


# ---------------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_export_enhanced_reloads_with_plain_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = load_model(f"tiny:{arch}")
    snap = _snapshot(lm.model)
    d = lm.site.d_mlp
    ns = NeuronSet(np.array([[0, 2], [0, 11], [2, 0], [2, d - 1]]), lm.site.n_layers, d)
    out = tmp_path / "enh"
    s = export_enhanced(lm, ns, 2.5, out, peft=arch in ("llama", "gpt2"))
    _assert_bit_identical(lm.model, snap)  # folding was undone bit for bit
    ids = _ids(lm)
    with intervention(lm.site, ns, 2.5):
        hooked = _logits(lm.model, ids)
    plain = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert (_logits(plain, ids) - hooked).abs().max() <= 1e-5
    assert (_logits(lm.model, ids) - hooked).abs().max() > 1e-3  # the enhancement does something
    assert s["max_abs_logit_diff_folded"] <= 1e-5
    # gains file: k at the set, 1 elsewhere, only the touched layers; applying it with hooks reproduces too
    gains = load_gains(out)
    assert sorted(gains) == [0, 2]
    assert torch.equal(gains[0][[2, 11]], torch.tensor([2.5, 2.5])) and float(gains[0].sum()) == d - 2 + 5.0
    with apply_gains(lm.site, gains):
        torch.testing.assert_close(_logits(lm.model, ids), hooked, rtol=0, atol=1e-6)
    if arch in ("llama", "gpt2"):
        from peft import PeftModel

        base = load_model(f"tiny:{arch}").model
        pm = PeftModel.from_pretrained(base, str(out / "ia3_adapter")).eval()
        assert (_logits(pm, ids) - hooked).abs().max() <= 1e-5
        assert s["max_abs_logit_diff_ia3"] <= 1e-5
    rep = json.loads((out / "report.json").read_text())
    assert rep["claims"]["export_reproduces_hooks"]["holds"]
    with pytest.raises(CaplocError):
        export_enhanced(lm, ns, 2.5, out)  # non-empty, no overwrite


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def test_cli_intervene_eval_export(tmp_path):
    from caploc.cli import main

    rows = [{"prompt": f"Question: {i} plus {i}?\nAnswer:", "target": f" {2 * i}", "group": f"t{i % 4}"} for i in range(24)]
    on = tmp_path / "on.jsonl"
    on.write_text("\n".join(json.dumps(r) for r in rows))
    off = tmp_path / "off.jsonl"
    off.write_text("\n".join(json.dumps({"prompt": f"Word {i} is", "target": f" w{i}"}) for i in range(6)))
    ns = NeuronSet(np.array([[0, 3], [1, 5]]), 3, 48, meta={"model_id": "tiny:llama"})
    ns.save(tmp_path / "loc")
    rc = main(["intervene", "--neurons", str(tmp_path / "loc"), "--data", str(on), "--data", str(off), "--ks", "0,2",
               "--n-random", "3", "--n", "4", "--no-heldout", "--out", str(tmp_path / "iv"), "--n-boot", "50"])
    assert rc == 0
    rep = json.loads((tmp_path / "iv" / "report.json").read_text())
    assert rep["claims"]["erase_beats_random"]["n_random"] == 3
    rc = main(["eval", "--neurons", str(tmp_path / "loc"), "--data", str(on), "--data", str(off), "--n", "4",
               "--mode", "enhance", "--k", "2", "--out", str(tmp_path / "ev")])
    assert rc == 0 and (tmp_path / "ev" / "report.json").exists()
    rc = main(["export-enhanced", "--neurons", str(tmp_path / "loc"), "--k", "2", "--out", str(tmp_path / "ex"),
               "--no-peft"])
    assert rc == 0 and (tmp_path / "ex" / "config.json").exists()
    assert main(["intervene", "--neurons", str(tmp_path / "loc"), "--mode", "boost"]) == 2  # one-line error


# ---------------------------------------------------------------------------------------------------------------------
# verdicts (issue 19 item 4): permutation p, minimum number of controls, absolute specificity, act-matched share
# ---------------------------------------------------------------------------------------------------------------------
def test_permutation_p_closed_form():
    null = [0.1, 0.2, 0.3, 0.4]
    assert permutation_p(0.35, null, +1) == pytest.approx(2 / 5)  # only 0.4 is at least as large
    assert permutation_p(0.35, null, -1) == pytest.approx(4 / 5)  # 0.1, 0.2, 0.3 are at least as small
    assert permutation_p(0.3, null, +1) == pytest.approx(3 / 5)  # a tie counts against the claim
    assert permutation_p(9.0, null, +1) == pytest.approx(1 / 5)  # beyond every random set: the smallest p, 1/(n+1)
    assert permutation_p(-9.0, null, +1) == pytest.approx(1.0)
    assert permutation_p(0.35, null + [float("nan")], +1) == pytest.approx(2 / 5)  # non-finite null values ignored
    assert math.isnan(permutation_p(0.35, [], +1))
    with pytest.raises(CaplocError):
        permutation_p(0.0, null, 0)


def test_verdict_needs_min_controls():
    assert verdict(True, 19, 20) == (None, "insufficient controls")
    assert verdict(False, 5, 20) == (None, "insufficient controls")
    assert verdict(True, 20, 20) == (True, "holds")
    assert verdict(False, 25, 20) == (False, "does not hold")


def test_absolute_specificity_rule():
    a = absolute_specificity(1.0, 0.4, margin=0.0, max_off_share=0.5)
    assert a["holds"] and a["off_share"] == pytest.approx(0.4) and a["gap_nats"] == pytest.approx(0.6)
    assert not absolute_specificity(1.0, 0.6, margin=0.0, max_off_share=0.5)["holds"]  # off > 0.5 x on
    assert absolute_specificity(1.0, -2.0, margin=0.0, max_off_share=0.5)["holds"]  # off-target moved the other way
    assert not absolute_specificity(1.0, 0.4, margin=0.7, max_off_share=0.5)["holds"]  # gap 0.6 < margin 0.7
    none = absolute_specificity(0.0, 0.0, margin=0.0, max_off_share=0.5)
    assert not none["holds"] and none["off_share"] is None  # no on-target effect: nothing is specific
    assert actmatched_share(0.25, 1.0) == pytest.approx(0.25) and math.isnan(actmatched_share(0.1, 0.0))


def _spread(n, half_width):
    """n evenly spaced values in [-half_width, half_width]: mean 0, known sd."""
    return list(np.linspace(-half_width, half_width, n))


def test_claims_with_few_controls_are_insufficient_and_with_enough_get_exact_p():
    few = _synthetic(1.0, 0.0, _spread(5, 0.1), _spread(5, 0.1), min_controls=20).claims()
    for name in ("erase_beats_random", "specificity"):
        assert few[name]["holds"] is None and few[name]["verdict"] == "insufficient controls"
    assert few["erase_beats_random"]["p"] == pytest.approx(1 / 6)  # the smallest p 5 random sets can give
    enough = _synthetic(1.0, 0.0, _spread(20, 0.1), _spread(20, 0.1), min_controls=20).claims()
    assert enough["erase_beats_random"]["holds"] is True and enough["erase_beats_random"]["verdict"] == "holds"
    assert enough["erase_beats_random"]["p"] == pytest.approx(1 / 21)
    assert enough["specificity"]["holds"] is True
    # the set inside the random spread: p = (1 + #{random >= 0.05}) / 21 with 0.05 between grid points
    inside = _synthetic(0.05, 0.0, _spread(20, 0.1), _spread(20, 0.1), min_controls=20).claims()["erase_beats_random"]
    n_ge = sum(v >= 0.05 for v in _spread(20, 0.1))
    assert inside["p"] == pytest.approx((1 + n_ge) / 21) and inside["holds"] is False


def test_specificity_needs_z_and_absolute_criteria():
    # on-target: effect 1.0 against a tight null (huge z); off-target: effect 0.6 against a wide null (z' small), so the
    # z criterion holds, but 0.6 > 0.5 x 1.0 fails the absolute one: not specific
    res = _synthetic(1.0, 0.6, _spread(20, 0.1), _spread(20, 5.0), min_controls=20)
    s = res.specificity(0.0)[0]
    assert s["z_criterion"] and not s["abs_criterion"] and s["off_share"] == pytest.approx(0.6)
    spec = res.claims()["specificity"]
    assert spec["z_criterion"] is True and spec["abs_criterion"] is False and spec["holds"] is False
    # with off-target effect 0.4 (<= half the on-target one) both hold
    ok = _synthetic(1.0, 0.4, _spread(20, 0.1), _spread(20, 5.0), min_controls=20).claims()["specificity"]
    assert ok["z_criterion"] and ok["abs_criterion"] and ok["holds"] is True


def test_activation_matched_share_claim():
    res = _synthetic(1.0, 0.0, _spread(20, 0.1), _spread(20, 0.1), min_controls=20)
    res.conditions.insert(1, "act_matched")
    for lab in ("on", "off"):
        res.sums[_key(lab, 0.0, "act_matched")] = res.base[lab] + 0.25 * res.tokens[lab]  # ΔNLL 0.25 per token
    c = res.claims()["act_matched_share"]
    assert c["value"] == pytest.approx(0.25) and c["effect_set"] == pytest.approx(1.0)
    row = next(r for r in res.summary_rows() if r["condition"] == "act_matched" and r["dataset"] == "on")
    assert row["share_of_set"] == pytest.approx(0.25)


def test_activation_matched_sentence_readings():
    from caploc.report.intervene import actmatched_sentence

    assert "undefined" in actmatched_sentence(float("nan"), "gsm", 0.0)
    assert "not read" in actmatched_sentence(3.3, "gsm", 0.0, set_effect=-0.01)  # erase made NLL better: no reading
    assert "not read" in actmatched_sentence(0.5, "gsm", 2.0, set_effect=+0.01)  # enhance made NLL worse
    assert "alone explains" in actmatched_sentence(1.2, "gsm", 0.0, set_effect=0.5)
    assert "part of the set's effect" in actmatched_sentence(0.3, "gsm", 0.0, set_effect=0.5)
    assert "not explained" in actmatched_sentence(0.05, "gsm", 0.0, set_effect=0.5)
    assert "other way" in actmatched_sentence(-0.5, "gsm", 2.0, set_effect=-0.5)
