"""Tests of the individual-knowledge audit: causal tracing (restoration, noise), KN selection / refinement,
paraphrase IoU, reliability manipulations, the result round trip, and the CLI — on tiny random models."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from caploc.errors import CaplocError
from caploc.hooks import count_hooks, scale_neurons
from caploc.models.loading import load_model
from caploc.runs import StageResult
from caploc.stages.audit.config import AuditConfig, KNConfig, TracingConfig
from caploc.stages.audit.facts import Fact, facts_from_dataset
from caploc.stages.audit.kn import kn_select
from caploc.stages.audit.metrics import (
    control_partners,
    fidelity_summary,
    layer_iou,
    random_set_iou,
    set_iou,
    weighted_iou,
)
from caploc.stages.audit.neurons import refine, row_set_probs, share_threshold, target_probs
from caploc.stages.audit.result import AuditResult, summarize
from caploc.stages.audit.run import run_audit
from caploc.stages.audit.tracer import Tracer, embedding_std, find_attention, subject_positions
from caploc.stages.audit.tracing import abs_layer_diff_pmf, uniform_abs_layer_diff
from caploc.stats import expected_random_agreement


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny:llama")


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny:gpt2")


PROMPT = "Paris is the capital of"
SUBJECT = "Paris"


def _ids(lm, prompt=PROMPT):
    return lm.tokenizer.encode(prompt)


def _manual_corrupted_prob(lm, ids, sp, noise_row, target):
    """Independent reference: embeddings + noise fed as inputs_embeds."""
    model = lm.model
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.tensor([ids]))
        emb[0, sp] += noise_row
        logits = model(inputs_embeds=emb, use_cache=False).logits
    return float(logits[0, -1].softmax(-1)[target])


# ---------------------------------------------------------------------------------------------------------------------
# causal tracing
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_restore_nothing_is_corrupted_and_everything_is_clean(name, request):
    lm = request.getfixturevalue(name)
    ids = _ids(lm)
    sp = subject_positions(lm.tokenizer, PROMPT, ids, SUBJECT)
    tr = Tracer(lm.site, TracingConfig(n_noise=3))
    noise = tr.make_noise(len(sp), seed=1)
    target = 50
    rn = torch.arange(3)
    # nothing restored == corrupted reference computed by hand (inputs_embeds + noise)
    p_none = tr.run(ids, target, sp, noise=noise, row_noise=rn)
    for z in range(3):
        assert float(p_none[z]) == pytest.approx(_manual_corrupted_prob(lm, ids, sp, noise[z], target), abs=1e-6)
    # clean
    rec: dict = {}
    p_clean = float(tr.run(ids, target, sp, noise=None, record=rec, n_rows=1)[0])
    clean = {k: v[0] for k, v in rec.items() if k[0] != "block"}
    T, L = len(ids), lm.site.n_layers
    # restoring every layer's hidden state at every token recovers the clean probability exactly
    every = {("hidden", l): [(r, t) for r in range(3) for t in range(T)] for l in range(L)}
    p_all = tr.run(ids, target, sp, noise=noise, row_noise=rn, patches=every, clean=clean)
    assert torch.allclose(p_all, torch.full((3,), p_clean), atol=1e-6)
    # so does restoring the hidden state of any single layer at all tokens
    for l in range(L):
        one = {("hidden", l): [(r, t) for r in range(3) for t in range(T)]}
        p_one = tr.run(ids, target, sp, noise=noise, row_noise=rn, patches=one, clean=clean)
        assert torch.allclose(p_one, torch.full((3,), p_clean), atol=1e-6)
    assert p_none.sub(p_clean).abs().max() > 1e-6  # the corruption did change something
    assert count_hooks(lm.model) == 0


def test_trace_consistency_and_replay(llama, gpt2):
    for lm in (llama, gpt2):
        ids = _ids(lm)
        sp = subject_positions(lm.tokenizer, PROMPT, ids, SUBJECT)
        a = Tracer(lm.site, TracingConfig(n_noise=2)).trace(ids, 50, sp, seed=3)
        b = Tracer(lm.site, TracingConfig(n_noise=2, reuse=False)).trace(ids, 50, sp, seed=3)
        assert not a.fallback
        assert torch.allclose(a.p_restored, b.p_restored, atol=1e-6)
        assert a.p_corrupt == pytest.approx(b.p_corrupt, abs=1e-7)
        L = lm.site.n_layers
        last = a.positions.index(len(ids) - 1)
        # hidden state of the last layer at the last token determines the output: full recovery
        assert float(a.p_restored[a.kinds.index("hidden"), L - 1, last]) == pytest.approx(a.p_clean, abs=1e-6)
        assert a.positions == sorted(set(sp) | {len(ids) - 1})
        assert a.classes[a.positions.index(sp[-1])] == "last_subject" and a.classes[last] == "last"
        ie = a.ie()
        assert torch.allclose(ie, a.p_restored - a.p_corrupt)
        pk = a.peak()
        assert pk["ie"] == pytest.approx(float(torch.nan_to_num(ie, nan=-1).max()))
        c = a.layer_curve("mlp", "last_subject")
        assert a.peak_layer("mlp") == int(c.argmax())
        # key mode = the subject mode's numbers at the last subject token and the last token
        k = Tracer(lm.site, TracingConfig(n_noise=2, tokens="key")).trace(ids, 50, sp, seed=3)
        cols = [a.positions.index(p) for p in k.positions]
        assert k.positions == [sp[-1], len(ids) - 1]
        assert torch.allclose(k.p_restored, a.p_restored[:, :, cols], atol=1e-6)
        assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("arch", ["mistral", "gemma3_text", "gpt_neox"])
def test_trace_reuse_matches_plain_other_archs(arch):
    """Layer replay + prefix KV cache (sliding-window caches included: window 8 < prompt length) = plain loop."""
    lm = load_model(f"tiny:{arch}")
    ids = _ids(lm)
    sp = subject_positions(lm.tokenizer, PROMPT, ids, SUBJECT)
    cfg = dict(n_noise=2, tokens="key", kinds=("mlp", "attn"))
    a = Tracer(lm.site, TracingConfig(**cfg)).trace(ids, 50, sp, seed=5)
    b = Tracer(lm.site, TracingConfig(reuse=False, **cfg)).trace(ids, 50, sp, seed=5)
    assert not a.fallback
    assert torch.allclose(a.p_restored, b.p_restored, atol=1e-6)


def test_trace_rows_enter_at_their_layer_windows_and_chunks(llama, gpt2):
    """Rows of all layers in one forward, entering at their lowest restored layer (window 3 restores 3 layers; tiny
    chunks split a position's rows) = the plain loop; each block computes only the rows that have entered."""
    for lm in (llama, gpt2):
        ids = _ids(lm)
        sp = subject_positions(lm.tokenizer, PROMPT, ids, SUBJECT)
        L = lm.site.n_layers
        for extra in (dict(window=3), dict(max_rows=5)):
            cfg = dict(n_noise=2, kinds=("mlp", "attn", "hidden"), **extra)
            rows_seen: dict[int, list[int]] = {j: [] for j in range(L)}
            handles = [m.register_forward_pre_hook(lambda mod, a, _j=j: rows_seen[_j].append(a[0].shape[0]))
                       for j, m in enumerate(lm.site.out_projs)]
            try:
                a = Tracer(lm.site, TracingConfig(**cfg)).trace(ids, 50, sp, seed=1)
            finally:
                for h in handles:
                    h.remove()
            b = Tracer(lm.site, TracingConfig(reuse=False, **cfg)).trace(ids, 50, sp, seed=1)
            assert not a.fallback
            assert torch.allclose(a.p_restored, b.p_restored, atol=1e-6, equal_nan=True), extra
            if "window" in extra:  # one forward per restored position; block j computes the rows entering at <= j
                n_pos = len(a.positions)
                for j in range(L):
                    # rows: mlp/attn of layer l enter at max(0, l - 1), hidden at l; the 2 check rows at L // 2
                    n_at = 2 * (2 * min(j + 2, L) + (j + 1)) + (2 if j >= L // 2 else 0)
                    # other calls: the clean run (1 row), the corrupted run and the prefix caches (2 rows)
                    assert [r for r in rows_seen[j] if r > 2] == [n_at] * n_pos, (j, rows_seen[j])
        assert count_hooks(lm.model) == 0


def test_trace_falls_back_when_entering_rows_are_wrong(llama, monkeypatch):
    from caploc import blocks

    ids = _ids(llama)
    sp = subject_positions(llama.tokenizer, PROMPT, ids, SUBJECT)
    cfg = dict(n_noise=2, tokens="key", kinds=("mlp",))
    good = Tracer(llama.site, TracingConfig(reuse=False, **cfg)).trace(ids, 50, sp, seed=2)
    real = blocks.rows_of
    monkeypatch.setattr(blocks, "rows_of", lambda t, lo, hi: real(t, lo, hi) + 1.0)  # (a scale would be normed away)
    tr = Tracer(llama.site, TracingConfig(**cfg))
    bad = tr.trace(ids, 50, sp, seed=2)
    assert bad.fallback and tr.stats["fallbacks"] == 1
    assert torch.allclose(bad.p_restored, good.p_restored, atol=1e-6)


def test_mlp_and_attn_patch_write_clean_values(llama):
    lm = llama
    ids = _ids(lm)
    sp = subject_positions(lm.tokenizer, PROMPT, ids, SUBJECT)
    tr = Tracer(lm.site, TracingConfig(n_noise=2))
    noise = tr.make_noise(len(sp), 0)
    rec: dict = {}
    tr.run(ids, 50, sp, noise=None, record=rec, n_rows=1)
    clean = {k: v[0] for k, v in rec.items() if k[0] != "block"}
    for kind in ("mlp", "attn"):
        t = sp[-1]
        got: dict = {}
        tr.run(ids, 50, sp, noise=noise, row_noise=torch.arange(2), patches={(kind, 1): [(0, t)]}, clean=clean,
               record=got)
        out = got[(kind, 1)]  # recorded after the patch hook
        assert torch.equal(out[0, t], clean[(kind, 1)][t])  # row 0 restored at t
        assert not torch.allclose(out[1, t], clean[(kind, 1)][t])  # row 1 untouched (still corrupted)


def test_noise_scale_is_three_embedding_sd(llama):
    lm = llama
    w = lm.model.get_input_embeddings().weight
    assert embedding_std(lm.model) == pytest.approx(float(w.detach().double().std(unbiased=False)), rel=1e-9)
    tr = Tracer(lm.site, TracingConfig(n_noise=16))
    assert tr.noise_sd == pytest.approx(3 * float(w.detach().double().std(unbiased=False)), rel=1e-9)
    ids = _ids(lm)
    sp = subject_positions(lm.tokenizer, PROMPT, ids, SUBJECT)
    noise = tr.make_noise(len(sp), seed=0)
    clean = lm.model.get_input_embeddings()(torch.tensor(ids)).detach()
    # the corrupted embeddings as block 0 receives them: clean + noise at the subject positions, clean elsewhere
    got = {}

    def pre(m, a, k):
        got["x"] = (a[0] if a else k["hidden_states"]).detach().clone()

    h = lm.site.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        tr.run(ids, 5, sp, noise=noise, row_noise=torch.arange(16))
    finally:
        h.remove()
    d = got["x"] - clean[None]
    other = [t for t in range(len(ids)) if t not in sp]
    assert d[:, other].abs().max().item() == 0.0
    assert torch.allclose(d[:, sp], noise, atol=1e-6)
    assert d[:, sp].std().item() == pytest.approx(tr.noise_sd, rel=0.1)


def test_embedding_std_includes_gemma_scale():
    lm = load_model("tiny:gemma")
    emb = lm.model.get_input_embeddings()
    ref = emb(torch.arange(emb.weight.shape[0])).detach().double().std(unbiased=False)
    assert embedding_std(lm.model, chunk=37) == pytest.approx(float(ref), rel=1e-9)


def test_find_attention_all_architectures(tiny_models):
    names = {}
    for arch, m in tiny_models.items():
        from caploc.models.layouts import Site

        site = Site(m)
        a = find_attention(site.blocks[0])
        names[arch] = type(a).__name__
        assert "Attention" in type(a).__name__
    bad = torch.nn.Module()
    bad.add_module("mlp", torch.nn.Linear(2, 2))
    with pytest.raises(CaplocError):
        find_attention(bad)


def test_subject_positions_and_layer_chance(llama):
    tok = llama.tokenizer
    p = "The Eiffel Tower is in"
    ids = [99] + tok.encode(p)  # a leading special token is skipped by alignment
    assert subject_positions(tok, p, ids, "Eiffel Tower") == list(range(5, 17))
    with pytest.raises(CaplocError):
        subject_positions(tok, p, ids, "Louvre")
    L = 5
    pmf = abs_layer_diff_pmf(L)
    assert pmf.sum() == pytest.approx(1.0)
    assert float((np.arange(L) * pmf).sum()) == pytest.approx(uniform_abs_layer_diff(L))
    # brute force
    diffs = [abs(a - b) for a in range(L) for b in range(L)]
    assert uniform_abs_layer_diff(L) == pytest.approx(np.mean(diffs))


# ---------------------------------------------------------------------------------------------------------------------
# KN selection, refinement, IoU
# ---------------------------------------------------------------------------------------------------------------------
def test_kn_select_by_hand():
    s = torch.tensor([[1.0, 0.1, 0.3], [0.25, -1.0, 0.19]])
    assert kn_select(s, 0.2).tolist() == [0, 2, 3]  # 0.19 is not > 0.2
    assert kn_select(s, 0.0).tolist() == [0, 1, 2, 3, 5]
    assert kn_select(-s.abs(), 0.2).tolist() == []  # max <= 0: no neuron


def test_refine_by_hand():
    A, B, C, D = [1, 2], [2, 3], [3], [1]
    # counts: 1 -> 2, 2 -> 2, 3 -> 2 of n = 4 phrasings, p = 0.5 -> p*n = 2
    assert refine([A, B, C, D], 0.5, "gt").tolist() == []
    assert refine([A, B, C, D], 0.5, "ge").tolist() == [1, 2, 3]
    # two phrasings: gt -> intersection, ge -> union
    assert refine([[1, 2, 5], [2, 5, 9]], 0.5, "gt").tolist() == [2, 5]
    assert refine([[1, 2, 5], [2, 5, 9]], 0.5, "ge").tolist() == [1, 2, 5, 9]
    assert share_threshold(3, 0.5, "gt") == 2 and share_threshold(3, 0.5, "ge") == 2
    assert share_threshold(10, 0.7, "gt") == 8 and share_threshold(10, 0.7, "ge") == 7  # 0.7*10 float noise
    assert share_threshold(4, 0.0, "ge") == 1 and share_threshold(4, 1.0, "gt") == 5
    assert refine([], 0.5).tolist() == [] and refine([[], []], 0.5).tolist() == []
    assert refine([[1], [1, 1]], 0.5).tolist() == [1]  # duplicates inside one set count once


def test_paraphrase_iou_by_hand():
    a, b, c = [1, 2, 3], [2, 3, 4], [3]
    assert set_iou(a, b) == pytest.approx(0.5)
    assert math.isnan(set_iou([], []))
    fid = fidelity_summary([[a, b, c]], set_iou, [{"same_template": None, "unrelated": None}])
    assert fid["same_fact"]["mean"] == pytest.approx((0.5 + 1 / 3 + 1 / 3) / 3)
    assert fid["n_pairs"] == 3
    assert layer_iou(3, 3) == 1.0 and layer_iou(3, 4) == 0.0 and math.isnan(layer_iou(None, 2))
    assert weighted_iou({"x": 10, "y": 30}, {"y": 30, "z": 60}) == pytest.approx(0.3)
    # random baseline: same per-layer sizes, exact expectation from stats
    L, d = 2, 10
    r = random_set_iou([0, 1, 12], [3, 15], L, d)
    assert r == pytest.approx(expected_random_agreement([2, 1], [1, 1], d)["iou"])
    # two facts with controls: fact 1 = same template as fact 0 (pairs given), unrelated not given
    locs = [[[1, 2], [1, 2]], [[1, 2], [7]]]
    partners = [{"same_template": {"fact": 1, "pairs": [(0, 0), (1, 1)]}, "unrelated": None},
                {"same_template": None, "unrelated": None}]
    fid = fidelity_summary(locs, set_iou, partners)
    assert fid["same_fact"]["mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert fid["same_template"]["mean"] == pytest.approx((1.0 + 0.0) / 2) and fid["same_template"]["n"] == 1


def test_control_partners_and_facts():
    facts = [Fact("a", ["X lives in", "X resides in"], " P", "X", "r1"),
             Fact("b", ["Y lives in", "Y was born in"], " Q", "Y", "r1"),
             Fact("c", ["Z plays", "Z is a"], " R", "Z", "r2")]
    pr = control_partners(facts, seed=0)
    assert pr[0]["same_template"] == {"fact": 1, "pairs": [(0, 0)]}
    assert pr[0]["unrelated"]["fact"] == 2 and len(pr[0]["unrelated"]["pairs"]) == 4
    assert pr[2]["same_template"] is None and pr[2]["unrelated"]["fact"] in (0, 1)
    from caploc.data import Dataset, Sample

    ds = Dataset("x", [Sample("A is", " b", meta={"paraphrases": ["A was", "A is"], "subject": "A"}, id="1"),
                       Sample("C is", " d", meta={"paraphrases": []}, id="2")], {})
    fs, dropped = facts_from_dataset(ds)
    assert dropped == 1 and fs[0].phrasings == ["A is", "A was"] and fs[0].subject == "A"
    with pytest.raises(CaplocError):
        facts_from_dataset(Dataset("y", [Sample("p", " t", id="1")], {}))


# ---------------------------------------------------------------------------------------------------------------------
# reliability manipulations
# ---------------------------------------------------------------------------------------------------------------------
def _encs(lm, prompts, target):
    from caploc.data import Sample, encode

    return [encode(lm.tokenizer, Sample(prompt=p, target=target)) for p in prompts]


def test_manipulation_equals_scale_neurons(llama):
    lm = llama
    site = lm.site
    encs = _encs(lm, ["Paris is the capital of", "The capital city of"], "France")
    neurons = np.array([0 * site.d_mlp + 3, 1 * site.d_mlp + 7, 2 * site.d_mlp + 40])
    for factor in (0.0, 2.0):
        got = row_set_probs(site, encs, [neurons, None], factor, "all", pad_id=0)
        ref = []
        for k, e in enumerate(encs):
            P = e.prompt_len
            ctx = scale_neurons(site, {0: [3], 1: [7], 2: [40]}, factor) if k == 0 else torch.no_grad()
            with torch.no_grad(), ctx:
                lg = lm.model(input_ids=torch.tensor([e.input_ids[:P]])).logits[0, -1]
            ref.append(float(lg.softmax(-1)[e.input_ids[P]]))
        assert got == pytest.approx(ref, abs=1e-6)
        # the single-set helper agrees, and "last" only differs from "all" through the last position
        assert target_probs(site, encs[:1], neurons, factor, "all")[0] == pytest.approx(ref[0], abs=1e-6)
    p_last = row_set_probs(site, encs, [neurons, neurons], 0.0, "last", pad_id=0)
    ref = []
    for e in encs:
        P = e.prompt_len

        def fn(_l, x, _P=P):
            x = x.clone()
            x[:, _P - 1, {0: 3, 1: 7, 2: 40}[_l]] = 0.0
            return x
        from caploc.hooks import neuron_hooks

        with torch.no_grad(), neuron_hooks(site, {0: fn, 1: fn, 2: fn}):
            lg = lm.model(input_ids=torch.tensor([e.input_ids[:P]])).logits[0, -1]
        ref.append(float(lg.softmax(-1)[e.input_ids[P]]))
    assert p_last == pytest.approx(ref, abs=1e-6)
    assert count_hooks(lm.model) == 0


def test_planted_neuron_found_and_suppress_lowers_p():
    """Plant a neuron in the last layer that writes the target's unembedding on this prompt: KN must find it and
    suppressing the refined set must lower P(target), enhancing must raise it."""
    from caploc.attribution.engine import Attributor

    lm = load_model("tiny:llama")
    site, model = lm.site, lm.model
    prompts = ["Paris is the capital of", "Paris is capital of"]
    encs = _encs(lm, prompts, "F")
    tgt = encs[0].input_ids[encs[0].prompt_len]
    L, i = site.n_layers - 1, 7
    x_in = {}
    h = site.mlps[L].register_forward_hook(lambda m, a, o: x_in.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model(input_ids=torch.tensor([encs[0].input_ids[: encs[0].prompt_len]]))
    h.remove()
    x = x_in["x"][0, -1]
    mlp = site.mlps[L]
    with torch.no_grad():
        mlp.gate_proj.weight[i] = 3 * x / x.norm() ** 2 * 4
        mlp.up_proj.weight[i] = x / x.norm() ** 2 * 4
        u = model.get_output_embeddings().weight[tgt]
        mlp.down_proj.weight[:, i] = 0.01 * u / u.norm()  # small: IG is not saturated
    cfg = KNConfig(steps=4)
    att = Attributor(site, cfg.attribution())
    sets = [kn_select(att.score(e.input_ids, e.prompt_len).scores, cfg.t) for e in encs]
    planted = L * site.d_mlp + i
    assert all(planted in s for s in sets)
    ref = refine(sets, cfg.p, cfg.share_rule)
    assert planted in ref
    p0 = target_probs(site, encs)
    ps = target_probs(site, encs, ref, 0.0)
    pe = target_probs(site, encs, ref, 2.0)
    assert (ps < 0.7 * p0).all() and (pe > p0).all()


# ---------------------------------------------------------------------------------------------------------------------
# end to end: run_audit, save / load, report, resume, CLI, circuits hook
# ---------------------------------------------------------------------------------------------------------------------
def _facts_file(tmp_path):
    rows = [
        {"prompt": "Paris is the capital of", "target": "France", "subject": "Paris",
         "paraphrases": ["Paris is capital of", "Paris, the capital of"], "group": "capital"},
        {"prompt": "Rome is the capital of", "target": "Italy", "subject": "Rome",
         "paraphrases": ["Rome is capital of"], "group": "capital"},
        {"prompt": "Messi plays", "target": "soccer", "subject": "Messi", "paraphrases": ["Messi is a player of"],
         "group": "sport"},
    ]
    p = tmp_path / "facts.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


def test_run_audit_tiny_roundtrip_and_resume(tmp_path, llama, monkeypatch):
    from caploc.data import load_dataset
    from caploc.stages.audit import circuits as circuits_mod

    class _CA:  # stands in for a CircuitAudit: the audit consumes its param_sets / universe / summary / save
        def __init__(self, facts):
            self.param_sets = [[{"L0.attn": 100.0, "L1.mlp": 300.0} if j == 0 else {"L1.mlp": 300.0}
                                for j in range(len(f.phrasings))] for f in facts]
            self.universe = {"L0.attn": 100.0, "L1.mlp": 300.0, "L2.mlp": 300.0}

        def summary(self):
            return {}

        def save(self, out_dir):
            return out_dir

    monkeypatch.setattr(circuits_mod, "audit_circuits", lambda lm, facts, cfg: _CA(facts))
    ds = load_dataset(str(_facts_file(tmp_path)), group_field="group")
    cfg = AuditConfig(methods=("kn", "tracing", "cnl", "circuits"), n_facts=3, known="none",
                      kn=KNConfig(steps=2), tracing=TracingConfig(n_noise=2), n_random=2, cnl_sigma=3.0)
    out = tmp_path / "audit"
    res = run_audit(llama, ds, cfg, out, progress=False)
    s = res.summary
    assert s["n_facts"] == 3 and s["n_phrasings"] == 7
    assert {"kn", "cnl", "tracing", "circuits"} <= set(s)
    # circuits weighted IoU by hand: fact 0 pairs (0,1)=0.75,(0,2)=0.75,(1,2)=1; facts 1, 2: 0.75
    assert s["circuits"]["fidelity"]["same_fact"]["mean"] == pytest.approx(((0.75 + 0.75 + 1) / 3 + 0.75 + 0.75) / 3)
    # KN fidelity = the mean over facts of the mean pairwise IoU of the stored sets
    per = []
    for r in res.records:
        sets = r["kn"]["sets"]
        v = [set_iou(sets[a], sets[b]) for a in range(len(sets)) for b in range(a + 1, len(sets))]
        v = [x for x in v if not math.isnan(x)]
        if v:
            per.append(np.mean(v))
    assert s["kn"]["fidelity"]["same_fact"]["mean"] == pytest.approx(np.mean(per))
    # reliability: refined-set suppression recorded equals a direct recomputation
    r0 = res.records[0]["kn"]
    if r0["refined"]:
        encs = _encs(llama, res.facts[0].phrasings, res.facts[0].target)
        direct = target_probs(llama.site, encs, np.array(r0["refined"]), 0.0, "last")
        assert r0["refined_suppress"] == pytest.approx(direct.tolist(), abs=1e-6)
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == "audit" and rep["tables"] and "facts_localizable" in rep["claims"]
    assert "kn_paraphrase_iou" in rep["claims"] and "tracing_same_layer" in rep["claims"]
    for f in rep["figures"]:
        assert (out / f["file"]).stat().st_size > 0
    assert {f["file"] for f in rep["figures"]} >= {"fig_kn_layers.png", "fig_tracing_peaks.png", "fig_iou.png"}
    loaded = AuditResult.load(out)
    assert isinstance(loaded, StageResult) and loaded.to_report(tmp_path / "rep")["claims"] == rep["claims"]
    assert len(loaded.records) == 3 and loaded.traces is not None
    assert torch.equal(loaded.traces[0][0].p_restored, res.traces[0][0].p_restored)
    s2 = summarize(loaded)
    assert s2["kn"]["fidelity"]["same_fact"]["mean"] == pytest.approx(s["kn"]["fidelity"]["same_fact"]["mean"])
    assert s2["tracing"]["mlp"]["same_fact"]["mean"] == pytest.approx(s["tracing"]["mlp"]["same_fact"]["mean"],
                                                                      nan_ok=True)
    # resume: nothing recomputed
    res2 = run_audit(llama, ds, cfg, out, progress=False)
    assert res2.summary["reused_facts"] == 3
    assert count_hooks(llama.model) == 0
    # an unfinished run: only the finished prefix of facts is loaded (with allow_partial). An unfinished run has not
    # committed its manifest (written last); one edited after its commit is refused (test_integrity).
    (out / ".caploc-manifest.json").unlink()
    meta = json.loads((out / "audit.json").read_text())
    meta["complete"] = False
    (out / "audit.json").write_text(json.dumps(meta))
    (out / "facts" / "fact_00002.json").unlink()
    with pytest.raises(CaplocError):
        AuditResult.load(out)
    part = AuditResult.load(out, allow_partial=True)
    assert not part.complete and len(part.records) == 2 and len(part.facts) == 2
    assert part.summary["n_facts"] == 2


def test_audit_config_errors():
    with pytest.raises(CaplocError):  # an unknown circuits option fails at construction, before the per-fact loop
        AuditConfig(methods=("kn", "circuits"), circuits={"top_kk": 3})
    for bad in (dict(methods=("kn", "rome")), dict(n_facts=0), dict(known="maybe"), dict(cnl_method="x")):
        with pytest.raises(CaplocError):
            AuditConfig(**bad)
    with pytest.raises(CaplocError):
        KNConfig(share_rule=">=")
    with pytest.raises(CaplocError):
        TracingConfig(kinds=("resid",))


def test_cli_audit_tiny(tmp_path):
    from caploc.cli import main

    out = tmp_path / "cli"
    rc = main(["audit", "--model", "tiny:llama", "--facts", str(_facts_file(tmp_path)), "--n-facts", "2",
               "--methods", "kn,tracing", "--steps", "2", "--noise-samples", "2", "--n-random", "1",
               "--known", "none", "--trace-kinds", "mlp", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["claims"]["facts_localizable"]["value"] in (True, False)
    assert main(["audit", "--model", "tiny:llama", "--facts", str(_facts_file(tmp_path)), "--methods", "kn,xx",
                 "--out", str(out)]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# real model (tiny settings)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.real
def test_real_smollm2_subject_tokens_and_trace():
    lm = load_model("smollm2-135m")
    tok = lm.tokenizer
    prompt, subject = "The Eiffel Tower is located in the city of", "Eiffel Tower"
    ids = tok.encode(prompt)
    sp = subject_positions(tok, prompt, ids, subject)
    assert tok.decode([ids[p] for p in sp]).strip() == subject
    target = tok.encode(" Paris", add_special_tokens=False)[0]
    cfg = dict(n_noise=2, tokens="key", kinds=("mlp", "hidden"))
    a = Tracer(lm.site, TracingConfig(**cfg)).trace(ids, target, sp, seed=0, layers=[0, 10, 29])
    b = Tracer(lm.site, TracingConfig(reuse=False, **cfg)).trace(ids, target, sp, seed=0, layers=[0, 10, 29])
    assert torch.allclose(a.p_restored, b.p_restored, atol=1e-5, equal_nan=True)
    assert a.p_clean > 0.1 and a.p_corrupt < a.p_clean  # the model knows it; noise on the subject hurts
    last = a.positions.index(len(ids) - 1)
    assert float(a.p_restored[a.kinds.index("hidden"), 29, last]) == pytest.approx(a.p_clean, abs=1e-5)
