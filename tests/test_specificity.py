"""Specificity: contrastive localization rules (hand-made frequency tables, planted scores), generic-neuron diagnostics,
and a tiny model with a planted GENERIC neuron (fires strongly on every input) and a planted TASK neuron (fires only on
task-A tokens), localized, contrasted, flagged and erased end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from caploc.errors import CaplocError
from caploc.localize import LocateConfig, locate
from caploc.results import NeuronSet
from caploc.stages.contrast import ContrastResult, contrast, split_agreement
from caploc.stages.contrast_rules import (
    ContrastConfig,
    contrast_from_counts,
    contrastive_set,
    default_references,
    normalise_scores,
    normalised_entropy,
)
from caploc.stages.generic import (
    GenericConfig,
    GenericReport,
    common_everywhere,
    erase_specificity,
    exclude_generic,
    find_generic,
    massive_flags,
    sample_nll,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


def _strict_json(path: Path):
    def bad(c):
        raise AssertionError(f"{path} holds {c}")

    return json.loads(Path(path).read_text(), parse_constant=bad)


# ------------------------------------------------------------------------------------------------------------------
# rules on hand-made frequency tables
# ------------------------------------------------------------------------------------------------------------------
# 5 neurons, target N = 10 samples, two references of 10 and 20 samples
T = np.array([10, 9, 6, 5, 2])
R1 = np.array([10, 0, 6, 0, 0])  # f = 1.0, 0.0, 0.6, 0.0, 0.0
R2 = np.array([20, 2, 0, 12, 0])  # f = 1.0, 0.1, 0.0, 0.6, 0.0
REFS = {"r1": (R1, 10), "r2": (R2, 20)}


def _keep(rule, **kw):
    keep, stat, info = contrast_from_counts(T, 10, REFS, ContrastConfig(rule=rule, **kw), min_freq=0.5)
    return np.nonzero(keep)[0].tolist(), stat, info


def test_plain_and_subtract_by_hand():
    assert _keep("none")[0] == [0, 1, 2, 3]  # f_t >= 0.5
    # neuron 0 common on r1 and r2, 2 common on r1 (0.6), 3 common on r2 (0.6) -> only 1 survives
    kept, stat, info = _keep("subtract")
    assert kept == [1]
    assert stat.tolist() == pytest.approx([0.0, 0.8, 0.0, -0.1, 0.2])  # f_t - max_r f_r
    # a stricter reference threshold (0.7) subtracts only neuron 0
    assert _keep("subtract", ref_min_freq=0.7)[0] == [1, 2, 3]
    # pooled: counts 30,2,6,12,0 of 30 samples -> >= 15 only neuron 0
    assert _keep("subtract", ref_mode="pooled")[0] == [1, 2, 3]


def test_freq_diff_by_hand():
    # mean reference frequency: (1+1)/2, (0+.1)/2, (.6+0)/2, (0+.6)/2, 0 = 1, .05, .3, .3, 0
    kept, stat, _ = _keep("freq-diff")
    assert stat.tolist() == pytest.approx([0.0, 0.85, 0.3, 0.2, 0.2])
    assert kept == [1]  # >= 0.5
    assert _keep("freq-diff", threshold=0.2)[0] == [1, 2, 3]
    # floor: neuron 4 (f_t = 0.2) is never kept, even at a low threshold, unless the floor is lowered
    assert 4 not in _keep("freq-diff", threshold=0.1)[0]
    assert 4 in _keep("freq-diff", threshold=0.1, min_target_freq=0.2)[0]
    # max aggregation: 1, .1, .6, .6, 0 -> 0, .8, 0, -.1, .2
    kept, stat, _ = _keep("freq-diff", ref_agg="max")
    assert stat.tolist() == pytest.approx([0.0, 0.8, 0.0, -0.1, 0.2]) and kept == [1]
    assert _keep("freq-diff", top_n=2)[0] == [1, 2]  # 0.85, then 0.3 (f_t floor excludes 4)


def test_freq_ratio_by_hand():
    # smoothed: target (c+1)/12; r1 (c+1)/12; r2 (c+1)/22; reference = mean of the two smoothed frequencies
    ft = (T + 1) / 12
    fr = ((R1 + 1) / 12 + (R2 + 1) / 22) / 2
    kept, stat, _ = _keep("freq-ratio")
    assert stat == pytest.approx(ft / fr)
    # neuron 1: (10/12) / ((1/12 + 3/22)/2) = 7.586...; neuron 2: (7/12)/((7/12 + 1/22)/2) = 1.855; 3: (6/12)/((1/12+13/22)/2) = 1.483
    assert stat[1] == pytest.approx((10 / 12) / ((1 / 12 + 3 / 22) / 2))
    assert kept == [1]  # >= 3, floor f_t >= 0.5
    assert _keep("freq-ratio", threshold=1.5)[0] == [1, 2]
    # without smoothing a reference count of 0 gives an infinite ratio, still floored
    kept0, stat0, _ = _keep("freq-ratio", smoothing=0.0, ref_agg="max")
    assert math.isinf(stat0[4]) and 4 not in kept0


def test_lape_entropy_by_hand():
    P = np.array([[1.0, 0.5, 0.6, 0.0], [0.0, 0.5, 0.2, 0.0], [0.0, 0.0, 0.2, 0.0]])
    H = normalised_entropy(P)
    assert H[0] == pytest.approx(0.0)
    assert H[1] == pytest.approx(math.log(2) / math.log(3))
    assert H[2] == pytest.approx(-(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2)) / math.log(3))  # q = .6,.2,.2
    assert math.isnan(H[3])
    # on the count table: p = (f_t, f_r1, f_r2)
    kept, stat, info = _keep("lape")
    p = np.stack([T / 10, R1 / 10, R2 / 20])
    q = p / p.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(q > 0, q * np.log(q), 0).sum(0) / math.log(3)
    assert stat == pytest.approx(h)
    # neuron 1: p = (.9, 0, .1) -> H = 0.2957 <= 0.5, mass on target; 0: uniform (H = 1); 2: (.6,.6,0) H = .63;
    # 3: (.5, 0, .6) -> most mass on r2, excluded; 4: H = 0 but f_t = 0.2 < floor
    assert kept == [1]
    assert _keep("lape", max_entropy=0.7)[0] == [1, 2]  # neuron 2: tie (.6, .6) -> argmax picks the target row
    assert _keep("lape", top_n=1)[0] == [1]


def test_score_diff_by_hand():
    # 2 target samples, 2 reference samples, 4 neurons
    t = torch.tensor([[[4.0, 0.0, 0.0, 0.0]], [[4.0, 4.0, 0.0, 0.0]]])  # [N, L=1, d=4]
    r = torch.tensor([[[4.0, 0.0, 0.0, 0.0]], [[0.0, 4.0, 0.0, 0.0]]])
    z = normalise_scores(t)
    # sample 1: mean 1, sd sqrt(3) -> z = 3/sqrt3, -1/sqrt3 ...; sample 2: mean 2, sd 2 -> 1, 1, -1, -1
    assert z[0].tolist() == pytest.approx([3 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)])
    assert z[1].tolist() == pytest.approx([1, 1, -1, -1])
    lc = LocateConfig(rule="topk", topk=1, min_freq=0.5)
    ns = contrastive_set(t, {"r": r}, "score-diff", locate_cfg=lc, threshold=0.5)
    # target mean z: (1.732+1)/2, (-.577+1)/2, ... ; reference: (1.732-.577)/2 for neurons 0 and 1
    mt = np.array([(3 / math.sqrt(3) + 1) / 2, (-1 / math.sqrt(3) + 1) / 2, (-1 / math.sqrt(3) - 1) / 2, (-1 / math.sqrt(3) - 1) / 2])
    mr = np.array([(3 / math.sqrt(3) - 1 / math.sqrt(3)) / 2] * 2 + [-1 / math.sqrt(3)] * 2)
    stat = mt - mr
    assert stat[0] == pytest.approx(0.7886751, abs=1e-6)
    assert ns.flat.tolist() == np.nonzero(stat >= 0.5)[0].tolist() == [0]
    rk = normalise_scores(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), "rank")
    assert rk[0].tolist() == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0])


def test_config_refusals_and_default_references():
    with pytest.raises(CaplocError):
        ContrastConfig(rule="entropy")
    with pytest.raises(CaplocError):
        ContrastConfig(rule="subtract", top_n=5)
    with pytest.raises(CaplocError):
        contrast_from_counts(T, 10, {}, ContrastConfig(rule="subtract"))
    with pytest.raises(CaplocError):
        ContrastConfig.from_params("freq-diff", tresh=0.3)
    refs = default_references("gsm_symbolic")
    assert refs == ["facts", "rg:letter_counting", "rg:sentence_reordering", "humaneval"]
    assert "gsm_symbolic" in default_references("facts") and "facts" not in default_references("facts")
    assert not any(r.startswith("rg:letter") or r.startswith("rg:sentence") for r in default_references("rg:letter_counting"))


# ------------------------------------------------------------------------------------------------------------------
# generic flags on hand-made tables
# ------------------------------------------------------------------------------------------------------------------
def test_massive_and_common_flags_by_hand():
    # 2 datasets, 1 layer of 5 neurons; typical peak = median of the layer's peaks
    mx = torch.tensor([[[1.0, 1.0, 1.0, 500.0, 300.0]], [[1.0, 2.0, 1.0, 400.0, 0.5]]])
    f = massive_flags(mx, ratio=100, top=3)
    # dataset 0: median 1 -> ratios 1,1,1,500,300; dataset 1: median 1 -> 1,2,1,400,.5
    assert f["ratio_min"].tolist() == pytest.approx([1, 1, 1, 400, 0.5])
    assert f["flag"].tolist() == [False, False, False, True, False]  # neuron 4 is massive on one dataset only
    assert massive_flags(mx[:1], ratio=100, top=1)["flag"].tolist() == [False, False, False, True, False]
    assert massive_flags(mx[:1], ratio=100, top=2)["flag"].tolist() == [False, False, False, True, True]
    F = np.array([[0.9, 0.5, 0.1], [0.6, 0.4, 1.0], [1.0, 0.5, 1.0]])
    assert common_everywhere(F, 0.5).tolist() == [True, False, False]
    with pytest.raises(CaplocError):
        common_everywhere(F[:1], 0.5)


def test_split_agreement_on_planted_scores():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(20, 2, 30, generator=g) * 0.1
    r = torch.randn(20, 2, 30, generator=g) * 0.1
    t[:, 0, 3] = 10.0  # generic: on every sample of both datasets
    r[:, 0, 3] = 10.0
    t[:, 1, 7] = 8.0  # task neuron
    lc = LocateConfig(rule="topk", topk=2, min_freq=0.5)
    plain = split_agreement(t, {"r": r}, ContrastConfig(rule="none"), lc, n_seeds=3)
    con = split_agreement(t, {"r": r}, ContrastConfig(rule="subtract"), lc, n_seeds=3)
    assert plain["iou"] == pytest.approx(1.0) and con["iou"] == pytest.approx(1.0)
    assert all(p["size_a"] == 2 for p in plain["per_seed"]) and all(p["size_a"] == 1 for p in con["per_seed"])
    assert 0 < con["chance_iou"] < 0.1


# ------------------------------------------------------------------------------------------------------------------
# a tiny llama with a planted generic neuron and a planted task neuron
# ------------------------------------------------------------------------------------------------------------------
K = 31  # the residual dimension that only task-A tokens carry
GEN, TASK = 3, 7  # layer-0 neuron indices
A_CHARS, B_CHARS = "abcdefghijklm", "nopqrstuvwxyz"


def _planted_lm():
    from transformers import AutoModelForCausalLM

    from caploc.models.layouts import Site
    from caploc.models.loading import LoadedModel, model_fingerprint, tiny_tokenizer
    from caploc.models.tiny import tiny_config

    cfg = tiny_config("llama")
    cfg.num_hidden_layers, cfg.intermediate_size, cfg.mlp_bias = 2, 256, True
    cfg.bos_token_id = cfg.eos_token_id = 1
    cfg.pad_token_id = 0
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    tok = tiny_tokenizer()
    a_ids = tok.convert_tokens_to_ids(list(A_CHARS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, K] = 0.0
        emb[a_ids, K] = 1.0  # only task-A tokens carry dimension K
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[K] = 0.0  # nothing else writes dimension K
            layer.mlp.down_proj.weight[K] = 0.0
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.bias.zero_()
        mlp = model.model.layers[0].mlp
        # generic neuron: silu(6) * 6 ~ 36 at every position of every input (bias only)
        mlp.gate_proj.weight[GEN] = 0.0
        mlp.up_proj.weight[GEN] = 0.0
        mlp.gate_proj.bias[GEN] = 6.0
        mlp.up_proj.bias[GEN] = 6.0
        # task neuron: reads dimension K only (normalised ~5.6 on task-A tokens, 0 elsewhere) -> ~31 vs 0
        mlp.gate_proj.weight[TASK] = 0.0
        mlp.up_proj.weight[TASK] = 0.0
        mlp.gate_proj.weight[TASK, K] = 1.0
        mlp.up_proj.weight[TASK, K] = 1.0
        for j in (GEN, TASK):  # large write into the residual stream: erasing either changes the logits
            col = torch.randn(cfg.hidden_size, generator=g) * 0.3
            col[K] = 0.0
            mlp.down_proj.weight[:, j] = col
        model.lm_head.weight.mul_(10.0)  # confident predictions, so disrupting the model moves the NLL visibly
    site = Site(model)
    info = {"model_id": "planted", "model_type": "llama", "n_layers": site.n_layers, "d_mlp": site.d_mlp,
            "fingerprint": model_fingerprint(model), "dtype": "float32"}
    return LoadedModel(model, tok, site, "planted", info)


def _task(chars: str, n: int, seed: int, name: str):
    from caploc.data import Dataset, Sample

    rng = np.random.default_rng(seed)
    samples = [Sample("".join(rng.choice(list(chars), 10)), "".join(rng.choice(list(chars), 3)), id=f"{name}{i}")
               for i in range(n)]
    return Dataset(name, samples, {"loader": "test", "seed": seed, "n": n})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    lm = _planted_lm()
    from caploc.attribution.engine import AttributionConfig

    lc = LocateConfig(attribution=AttributionConfig(method="activation"), rule="sigma", sigma=6.0, min_freq=0.5)
    da, db = _task(A_CHARS, 8, 0, "task_a"), _task(B_CHARS, 8, 1, "task_b")
    ra = locate(lm, da, lc, root / "a", progress=False)
    rb = locate(lm, db, lc, root / "b", progress=False)
    return {"lm": lm, "root": root, "a": ra, "b": rb, "da": da, "db": db, "cfg": lc}


def test_plain_localization_finds_both_planted_neurons(planted):
    a, b = planted["a"].neurons, planted["b"].neurons
    assert a.pairs.tolist() == [[0, GEN], [0, TASK]]
    assert b.pairs.tolist() == [[0, GEN]]


@pytest.mark.parametrize("rule", ["subtract", "freq-diff", "freq-ratio", "lape", "score-diff"])
def test_contrastive_rules_keep_only_the_task_neuron(planted, rule, tmp_path):
    res = contrast(planted["root"] / "a", [planted["root"] / "b"], ContrastConfig(rule=rule), tmp_path / rule,
                   split_seeds=2)
    assert res.neurons.pairs.tolist() == [[0, TASK]], rule
    assert res.plain.pairs.tolist() == [[0, GEN], [0, TASK]]
    rep = _strict_json(tmp_path / rule / "report.json")
    assert rep["kind"] == "contrast" and rep["tables"][0]["rows"][0][1] == 2 and rep["tables"][0]["rows"][1][1] == 1
    plain_row, con_row = res.table
    assert plain_row["common_elsewhere"] == pytest.approx(0.5) and con_row["common_elsewhere"] == pytest.approx(0.0)
    assert con_row["split_iou"] == pytest.approx(1.0)
    back = NeuronSet.load(tmp_path / rule)
    assert back.meta["contrast"]["rule"] == rule and back.meta["contrast"]["removed_from_plain"] == 1
    # the stored result round-trips: the same tables, and the same report from the loaded result
    loaded = ContrastResult.load(tmp_path / rule)
    assert loaded.neurons.pairs.tolist() == [[0, TASK]] and loaded.table == json.loads(json.dumps(res.table))
    np.testing.assert_array_equal(loaded.statistic, res.statistic)
    np.testing.assert_array_equal(loaded.ref_freq, res.ref_freq)
    assert json.loads(json.dumps(loaded.to_report(tmp_path / rule))) == rep


def test_generic_diagnostics_flag_only_the_generic_neuron(planted, tmp_path):
    lm = planted["lm"]
    rep = find_generic(lm, {"task_a": planted["da"], "task_b": planted["db"]},
                       {"task_a": planted["root"] / "a", "task_b": planted["root"] / "b"}, GenericConfig())
    assert rep.generic_pairs.tolist() == [[0, GEN]]
    row = rep.rows[0]
    assert set(row["flags"]) == {"massive", "common_all"} and row["peak"] > 30 and row["peak_ratio"] > 100
    task_rows = [r for r in rep.rows if r["index"] == TASK and r["layer"] == 0]
    assert not task_rows or not task_rows[0]["generic"]
    rep.save(tmp_path / "g")
    assert _strict_json(tmp_path / "g" / "report.json")["kind"] == "generic"
    assert GenericReport.load(tmp_path / "g").generic_pairs.tolist() == [[0, GEN]]
    assert exclude_generic(planted["a"].neurons, rep).pairs.tolist() == [[0, TASK]]
    # massive activations alone (one dataset, no runs) also single it out
    rep1 = find_generic(lm, {"task_b": planted["db"]}, None, GenericConfig(criteria=("massive",)))
    assert rep1.generic_pairs.tolist() == [[0, GEN]]


def test_erase_specificity_ranks_task_neuron_specific(planted):
    from caploc.data import Encoded
    from caploc.hooks import count_hooks, erase_neurons

    lm = planted["lm"]
    model, tok = lm.model, lm.tokenizer

    def greedy(ds):  # targets = the model's own greedy continuation, so disrupting the model raises their NLL
        out = []
        for s in ds:
            ids = tok.encode(s.prompt, add_special_tokens=False)
            P = len(ids)
            with torch.no_grad():
                for _ in range(3):
                    ids = ids + [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
            out.append(Encoded(ids, P, s.id))
        return out

    enc = {"task_a": greedy(planted["da"]), "task_b": greedy(planted["db"])}

    def nll(e, pairs=None):  # reference NLL written here: per sample mean over target tokens, then mean
        vals = []
        for x in e:
            ids = torch.tensor([x.input_ids])
            if pairs is None:
                lg = model(input_ids=ids).logits
            else:
                with erase_neurons(lm.site, pairs):
                    lg = model(input_ids=ids).logits
            lp = torch.log_softmax(lg[0].double(), -1)
            tgt = ids[0, x.prompt_len:]
            vals.append(-lp[x.prompt_len - 1: -1].gather(-1, tgt[:, None]).mean())
        return float(torch.stack(vals).mean())

    with torch.no_grad():
        delta = {(n, k): nll(e, [[0, j]]) - nll(e) for n, j in (("gen", GEN), ("task", TASK)) for k, e in enc.items()}
    assert delta[("task", "task_b")] == pytest.approx(0.0, abs=1e-6)  # silent on task B: erasing changes nothing
    assert delta[("task", "task_a")] > 0.1
    assert delta[("gen", "task_a")] > 0.1 and delta[("gen", "task_b")] > 0.1
    assert float(sample_nll(lm, enc["task_a"], [[0, TASK]]).mean()) - float(sample_nll(lm, enc["task_a"]).mean()) == \
        pytest.approx(delta[("task", "task_a")], abs=1e-5)
    res = erase_specificity(lm, {"generic": [[0, GEN]], "task": [[0, TASK]]}, enc, target="task_a", n_random=4)
    assert count_hooks(model) == 0
    t, gn = res["sets"]["task"], res["sets"]["generic"]
    assert t["delta"]["task_a"] == pytest.approx(delta[("task", "task_a")], abs=1e-5)
    assert t["specificity"] > 0.1  # hurts task A, nothing else
    assert gn["excess"]["task_b"] > 0.1  # the generic neuron hurts the off-target task too
    assert t["specificity"] > gn["specificity"] + 0.1
    assert t["excess"]["task_b"] == pytest.approx(-t["random_mean"]["task_b"], abs=1e-9)
    assert t["si"] > gn["si"]
    # the same through a contrast result directory: table, claims and figure in report.json
    from caploc.stages.contrast import add_erase_specificity

    out = planted["root"] / "c-erase"
    contrast(planted["root"] / "a", [planted["root"] / "b"], ContrastConfig(rule="subtract"), out, split_seeds=0)
    er = add_erase_specificity(out, lm, enc, target="task_a", n_random=2)
    assert er["sets"]["plain"]["n_neurons"] == 2 and er["sets"]["subtract"]["n_neurons"] == 1
    # the nats difference rewards a set that simply hurts more (plain = task + generic: 0.22 vs 0.17 here); the
    # z-based index and the off-target excess tell them apart
    assert er["sets"]["subtract"]["si"] > 0.9 > er["sets"]["plain"]["si"]
    assert er["sets"]["subtract"]["excess"]["task_b"] < 0.01 < 0.1 < er["sets"]["plain"]["excess"]["task_b"]
    rep = _strict_json(out / "report.json")
    assert rep["tables"][-1]["rows"][1][0] == "subtract" and (out / rep["figures"][-1]["file"]).stat().st_size > 1000


def test_cli_contrast_and_generic_from_runs(planted, tmp_path):
    from caploc.cli import main

    a, b = str(planted["root"] / "a"), str(planted["root"] / "b")
    assert main(["contrast", a, "--reference", b, "--rule", "freq-diff", "--split-seeds", "2", "--out",
                 str(tmp_path / "c")]) == 0
    assert NeuronSet.load(tmp_path / "c").pairs.tolist() == [[0, TASK]]
    assert main(["generic", "--runs", f"{a},{b}", "--out", str(tmp_path / "g")]) == 0
    assert NeuronSet.load(tmp_path / "g").pairs.tolist() == [[0, GEN]]
    assert main(["contrast", a, "--reference", b, "--rule", "nonsense", "--out", str(tmp_path / "x")]) == 2


def test_cli_locate_with_contrast_and_exclude_generic(tmp_path):
    from caploc.cli import main

    out = tmp_path / "loc"
    assert main(["locate", "--model", "tiny:llama", "--data", "rg:basic_arithmetic", "--n", "4", "--method", "activation",
                 "--sigma", "3", "--contrast", "subtract", "--reference", "rg:letter_counting", "--exclude-generic",
                 "--out", str(out)]) == 0
    plain, final = NeuronSet.load(out, name="plain"), NeuronSet.load(out)
    spec = _strict_json(out / "specificity.json")
    assert spec["plain_size"] == len(plain) >= 1 and spec["final_size"] == len(final)
    assert set(map(tuple, final.pairs.tolist())) <= set(map(tuple, plain.pairs.tolist()))
    ref = NeuronSet.load(out / "references" / "rg_letter_counting")
    assert ref.n_samples == 4 and ref.meta["config"] == plain.meta["config"]  # scored with the target's settings
    # subtract: nothing that is common on the reference survives; generic neurons are gone
    ref_common = set(map(tuple, ref.pairs.tolist()))
    assert not ref_common & set(map(tuple, final.pairs.tolist()))
    gen = set(map(tuple, NeuronSet.load(out / "generic").pairs.tolist()))
    assert not gen & set(map(tuple, final.pairs.tolist()))
    assert final.meta["contrast"]["rule"] == "subtract"
    assert _strict_json(out / "contrast-subtract" / "report.json")["kind"] == "contrast"
    assert _strict_json(out / "generic" / "report.json")["kind"] == "generic"
    # plain locate keeps working and writes no specificity files
    out2 = tmp_path / "plain"
    assert main(["locate", "--model", "tiny:llama", "--data", "rg:basic_arithmetic", "--n", "4", "--method", "activation",
                 "--out", str(out2)]) == 0
    assert not (out2 / "specificity.json").exists() and not (out2 / "plain.json").exists()


@pytest.mark.real
def test_real_massive_activation_neurons_flagged():
    """SmolLM2-135M: the three massive-activation neurons (peaks 1000-3000 at the first token) on two tiny datasets."""
    from caploc.data import load_dataset
    from caploc.models.loading import load_model

    lm = load_model("smollm2-135m")
    data = {"facts": load_dataset("facts", n=2, seed=0), "letters": load_dataset("rg:letter_counting", n=2, seed=0)}
    rep = find_generic(lm, data, None, GenericConfig(criteria=("massive",)), progress=False)
    flagged = set(map(tuple, rep.generic_pairs.tolist()))
    assert {(11, 1229), (28, 678), (11, 1487)} <= flagged
    top = {(r["layer"], r["index"]): r for r in rep.rows}
    assert top[(11, 1229)]["peak"] > 1000 and top[(11, 1229)]["first_token_share"] >= 0.5
