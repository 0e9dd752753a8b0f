"""Knowledge circuits (EAP): exactness on a linear toy network, gradients against finite-difference edge patching on a
tiny Llama, mean ablation against hand-computed values, parameter accounting, fidelity aggregation, save/load."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from caploc.data import Dataset, Sample
from caploc.errors import CaplocError
from caploc.hooks import count_hooks
from caploc.models.layouts import MLPLayout, Site, register_layout
from caploc.models.tiny import tiny_model
from caploc.stages.audit.circuit_eap import (
    ablated_metric,
    clean_embedding,
    edge_attribution,
    make_ablation,
    node_means,
    stack_ablations,
    tap,
)
from caploc.stages.audit.circuit_graph import NodeGraph
from caploc.stages.audit.circuit_result import CircuitAudit, ParamSet, param_ranges, param_sets
from caploc.stages.audit.circuits import audit_circuits, subject_span
from caploc.stages.audit.config import CircuitConfig


# ---------------------------------------------------------------------------------------------------------------------
# a linear toy transformer: fixed causal-mean attention, linear "norms", linear MLP -> EAP is exact for metric=logit
# ---------------------------------------------------------------------------------------------------------------------
class _Cfg:
    model_type = "toy_eap_linear"
    num_attention_heads = 2
    head_dim = 2
    hidden_size = 4
    pad_token_id = 0


class _Out:
    def __init__(self, logits):
        self.logits = logits


class ToyNorm(nn.Module):  # elementwise scale: linear, but found as the "norm" that feeds the MLP
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.weight


class ToyAttention(nn.Module):
    def __init__(self, d, H, hd):
        super().__init__()
        self.H, self.hd = H, hd
        self.v_proj = nn.Linear(d, H * hd, bias=False)  # also d -> d: the probe must pick o_proj
        self.o_proj = nn.Linear(H * hd, d, bias=True)

    def forward(self, x):
        T = x.shape[1]
        A = torch.tril(torch.ones(T, T, dtype=x.dtype))
        A = A / A.sum(1, keepdim=True)
        z = A @ self.v_proj(x)  # [B, T, H*hd]
        return self.o_proj(z)


class ToyMLP(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.up = nn.Linear(d, k, bias=False)
        self.down = nn.Linear(k, d, bias=False)

    def forward(self, x):
        return self.down(self.up(x))


class ToyBlock(nn.Module):
    def __init__(self, d, H, hd, k):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ToyNorm(d), ToyAttention(d, H, hd), ToyNorm(d), ToyMLP(d, k)

    def forward(self, hidden_states):
        h = hidden_states + self.attn(self.ln1(hidden_states))
        return h + self.mlp(self.ln2(h))


class ToyLinearLM(nn.Module):
    def __init__(self, L=3, d=4, H=2, hd=2, k=5, vocab=11, seed=0):
        super().__init__()
        self.config = _Cfg()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(ToyBlock(d, H, hd, k) for _ in range(L))
        self.ln_f = ToyNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.7 + 0.1)
        self.double()

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, **kw):
        h = self.emb(input_ids)
        for b in self.layers:
            h = b(h)
        return _Out(self.lm_head(self.ln_f(h)))


register_layout("toy_eap_linear", MLPLayout("layers", "mlp", "down", ("up",)))


def _toy():
    model = ToyLinearLM().eval()
    return model, NodeGraph(model, Site(model))


def _ref_run(model, emb, patch=None):
    """Reference forward of the toy written node by node: returns (metric rows = final logits [T, V], outputs of the
    upstream nodes in graph order). ``patch = (v, delta)`` adds ``delta`` to node v's input only."""
    L, H, hd = len(model.layers), 2, 2
    outs = [emb]
    resid = emb
    idx = 1

    def inp(x, i):
        return x + patch[1] if patch is not None and patch[0] == i else x

    T = emb.shape[0]
    A = torch.tril(torch.ones(T, T, dtype=emb.dtype))
    A = A / A.sum(1, keepdim=True)
    for l in range(L):
        b = model.layers[l]
        total = torch.zeros_like(resid) + b.attn.o_proj.bias
        for h in range(H):
            x = b.ln1(inp(resid, idx))
            z = A @ (x @ b.attn.v_proj.weight[h * hd:(h + 1) * hd].T)
            o = z @ b.attn.o_proj.weight[:, h * hd:(h + 1) * hd].T
            outs.append(o)
            total = total + o
            idx += 1
        resid = resid + total
        o = b.mlp(b.ln2(inp(resid, idx)))
        outs.append(o)
        idx += 1
        resid = resid + o
    logits = model.lm_head(model.ln_f(inp(resid, idx)))
    return logits, outs


def test_toy_graph_structure():
    model, g = _toy()
    assert g.nodes[0] == "emb" and g.nodes[-1] == "logits" and g.n_nodes == 1 + 3 * 3 + 1
    assert g.out_proj[0] is model.layers[0].attn.o_proj  # not v_proj, which has the same shape
    assert g.mlp_norm[0] is model.layers[0].ln2 and g.parallel == [False] * 3
    # edges: u strictly before v in node order, except heads of the same layer and MLP -> same-layer heads
    want = set()
    for u in range(g.n_nodes - 1):
        for v in range(u + 1, g.n_nodes):
            same_layer_heads = g.kind[u] == g.kind[v] == "head" and g.layer[u] == g.layer[v]
            if not same_layer_heads:
                want.add((u, v))
    assert set(map(tuple, g.edges.tolist())) == want


def test_eap_is_exact_on_linear_toy():
    """With linear nodes and a linear metric, EAP = the true effect of patching each single edge."""
    model, g = _toy()
    ids = [3, 1, 4, 1, 5]
    P, target = len(ids), 7
    emb = clean_embedding(g, ids)
    gen = torch.Generator().manual_seed(1)
    cor = emb.clone()
    cor[0, 1:3] += torch.randn(2, 4, generator=gen, dtype=torch.float64)
    ea = edge_attribution(g, ids, P, [target], cor, metric="logit")
    with torch.no_grad():
        logits, clean_outs = _ref_run(model, emb[0])
        _, cor_outs = _ref_run(model, cor[0])
        m0 = logits[P - 1, target]
        assert ea.m_clean == pytest.approx(float(m0), abs=1e-9)
        true = []
        for u, v in g.edges:
            delta = cor_outs[u] - clean_outs[u]
            lp, _ = _ref_run(model, emb[0], patch=(v, delta))
            true.append(float(lp[P - 1, target] - m0))
    true = torch.tensor(true, dtype=torch.float64)
    assert true.abs().max() > 1e-3
    torch.testing.assert_close(ea.scores.double(), true, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# tiny Llama in float64: EAP score = delta . gradient, the gradient from finite-difference edge patching in the test
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama", seed=3, dtype=torch.float64)
    return model, NodeGraph(model, Site(model))


def _m(model, ids, P, t):
    with torch.no_grad():
        return float(torch.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, P - 1], -1)[t])


def _patched_metric(model, g, ids, P, t, v, delta):
    """Metric (a tensor, differentiable in ``delta``) when only node v reads residual + delta; written with the
    test's own hooks, independently of the code under test."""
    blk_in, store = {}, {}
    handles = []
    kind, l = g.kind[v], int(g.layer[v])
    att = model.model.layers[l].self_attn if kind == "head" else None
    try:
        if kind == "logits":
            handles.append(model.model.norm.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
        elif kind == "mlp":
            blk = model.model.layers[l]
            handles.append(blk.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a: store.setdefault("x", a[0]) is None or None))
            handles.append(blk.mlp.register_forward_pre_hook(
                lambda m, a: (blk.post_attention_layernorm(store["x"] + delta),)))
        else:
            h, hd = int(g.head[v]), g.head_dim
            blk = model.model.layers[l]
            handles.append(blk.register_forward_pre_hook(
                lambda m, a, k: blk_in.__setitem__("x", a[0] if a else k["hidden_states"]), with_kwargs=True))
            orig = att.forward

            def fwd(hidden_states, *a, **k):
                cap = {}
                hk = att.o_proj.register_forward_pre_hook(lambda m, args: cap.__setitem__("z", args[0]))
                try:
                    orig(blk.input_layernorm(blk_in["x"] + delta), *a, **k)
                finally:
                    hk.remove()

                def sub(m, args):
                    z = args[0].clone()
                    z[..., h * hd:(h + 1) * hd] = cap["z"][..., h * hd:(h + 1) * hd]
                    return (z,)
                hk = att.o_proj.register_forward_pre_hook(sub)
                try:
                    return orig(hidden_states, *a, **k)
                finally:
                    hk.remove()

            att.forward = fwd  # instance attribute; deleted in finally
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
        return torch.log_softmax(logits[0, P - 1], -1)[t]
    finally:
        for hd_ in handles:
            hd_.remove()
        if att is not None and "forward" in att.__dict__:
            del att.forward


def test_eap_equals_delta_times_independent_gradient(llama):
    """score(u -> v) = (a_u^corrupt - a_u^clean) . dm/d(in_v), with dm/d(in_v) from the test's own edge patch
    (a zero perturbation seen by node v only, differentiated by autograd) and a_u from the test's own hooks."""
    model, g = llama
    ids, P, t = [5, 9, 14, 7, 22, 31], 6, 40
    emb = clean_embedding(g, ids)
    cor = emb.clone()
    cor[0, 1:3] += 0.8 * torch.randn(2, emb.shape[-1], generator=torch.Generator().manual_seed(0), dtype=emb.dtype)
    ea = edge_attribution(g, ids, P, [t], cor, metric="logprob", keep=True)
    assert ea.m_clean == pytest.approx(_m(model, ids, P, t), abs=1e-9)
    picks = [("emb", "L2.H1"), ("L0.MLP", "L1.H3"), ("L0.H0", "L0.MLP"), ("L1.MLP", "logits"), ("L1.H2", "L2.MLP"),
             ("L0.H1", "L2.H0"), ("emb", "L0.H3")]
    for un, vn in picks:
        u, v = g.nodes.index(un), g.nodes.index(vn)
        e = int(g.edge_id[u, v])
        assert e >= 0, (un, vn)
        zero = torch.zeros_like(emb, requires_grad=True)
        with torch.enable_grad():
            m = _patched_metric(model, g, ids, P, t, v, zero)
            grad = torch.autograd.grad(m, zero)[0]
        assert float(m.detach()) == pytest.approx(ea.m_clean, abs=1e-9)
        d = ea.deltas[u].double()[None]
        want = float((d * grad).sum())
        assert float(ea.scores[e]) == pytest.approx(want, rel=1e-6, abs=1e-12), (un, vn)
        # the score is the derivative of the real edge patch along delta (central difference; the model's norms and
        # softmax run in float32, so eps cannot be tiny)
        eps = 1e-3
        with torch.no_grad():
            fd = (float(_patched_metric(model, g, ids, P, t, v, eps * d))
                  - float(_patched_metric(model, g, ids, P, t, v, -eps * d))) / (2 * eps)
        assert fd == pytest.approx(want, rel=0.05, abs=1e-5), (un, vn)
    # the head output difference itself, recomputed with the test's own hooks
    h, hd, l = 2, g.head_dim, 1
    zs = {}
    hk = model.model.layers[l].self_attn.o_proj.register_forward_pre_hook(lambda m, a: zs.setdefault(len(zs), a[0]))
    try:
        for x in (cor, emb):
            with torch.no_grad():
                model(inputs_embeds=x, use_cache=False)
    finally:
        hk.remove()
    W = model.model.layers[l].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd]
    want = (zs[0][0, :, h * hd:(h + 1) * hd] - zs[1][0, :, h * hd:(h + 1) * hd]) @ W.T
    torch.testing.assert_close(ea.deltas[g.head_node(l, h)].double(), want, rtol=1e-7, atol=1e-10)
    assert count_hooks(model) == 0


def test_mean_ablation_nothing_and_everything(llama):
    model, g = llama
    seqs = [[5, 9, 14, 7, 22, 31], [8, 3, 3, 60, 2], [17, 4, 90, 11]]
    mz, mm = node_means(g, seqs, first_pos=1)
    # means recomputed independently
    L = g.n_layers
    zsum, msum, n = torch.zeros_like(mz, dtype=torch.float64), torch.zeros_like(mm, dtype=torch.float64), 0
    for s in seqs:
        rec = {}
        hs = []
        for l in range(L):
            hs.append(model.model.layers[l].self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, _l=l: rec.__setitem__(("z", _l), a[0])))
            hs.append(model.model.layers[l].mlp.register_forward_hook(lambda m, a, o, _l=l: rec.__setitem__(("m", _l), o)))
        with torch.no_grad():
            model(input_ids=torch.tensor([s]))
        for h_ in hs:
            h_.remove()
        for l in range(L):
            zsum[l] += rec[("z", l)][0, 1:].sum(0)
            msum[l] += rec[("m", l)][0, 1:].sum(0)
        n += len(s) - 1
    torch.testing.assert_close(mz.double(), zsum / n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mm.double(), msum / n, rtol=1e-5, atol=1e-6)

    ids, P, t = seqs[0], 6, 40
    full = make_ablation(g, np.ones(g.n_nodes, bool), mz, mm, 1)
    assert ablated_metric(g, ids, P, [t], full) == pytest.approx(_m(model, ids, P, t), abs=1e-9)
    none = make_ablation(g, np.zeros(g.n_nodes, bool), mz, mm, 1)
    got = ablated_metric(g, ids, P, [t], none)
    # by hand: the last position's residual = its embedding + sum of the mean outputs of every head and MLP
    with torch.no_grad():
        x = model.model.embed_tokens(torch.tensor(ids[-1])).double()
        for l in range(L):
            x = x + model.model.layers[l].self_attn.o_proj(mz[l].double()) + mm[l].double()
        want = float(torch.log_softmax(model.lm_head(model.model.norm(x[None]))[0], -1)[t])
    assert got == pytest.approx(want, abs=1e-5)
    # a batch of ablation patterns gives the same numbers as one pattern at a time
    rng = np.random.default_rng(0)
    pats = [rng.random(g.n_nodes) < 0.5 for _ in range(3)]
    abls = [make_ablation(g, k, mz, mm, 1) for k in pats] + [none, full]
    one = [ablated_metric(g, ids, P, [t], a) for a in abls]
    many = ablated_metric(g, ids, P, [t], stack_ablations(abls))
    assert many == pytest.approx(np.array(one), abs=1e-9)
    assert len(set(np.round(one, 6))) == 5
    assert count_hooks(model) == 0


def test_tap_removes_hooks_after_exception(llama):
    model, g = llama
    with pytest.raises(RuntimeError):
        with tap(g, {}):
            raise RuntimeError("boom")
    assert count_hooks(model) == 0


def test_param_units_by_hand(llama):
    model, g = llama
    units, sizes, node_units, ranges = g.param_units()
    d, hd, dm = 32, 8, 48
    by = dict(zip(units, sizes.tolist()))
    assert by["L0.q0"] == hd * d and by["L0.o3"] == d * hd and by["L2.k1"] == hd * d and by["L1.mlp"] == 3 * d * dm
    assert len(units) == 3 * (4 + 4 + 2 + 2 + 1)
    # GQA: 4 query heads, 2 kv heads -> heads 0, 1 share k0/v0
    n0, n1, n2 = (node_units[g.head_node(0, h)] for h in range(3))
    assert set(n0) & set(n1) == {units.index("L0.k0"), units.index("L0.v0")} and not set(n0) & set(n2)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    a = ParamSet({"model.layers.0.self_attn.q_proj.weight": [(0, 0, 8)]}, shapes)
    b = ParamSet({"model.layers.0.self_attn.q_proj.weight": [(0, 4, 16)], "model.layers.0.mlp.up_proj.weight": [(-1, 0, 0)]},
                 shapes)
    assert a.n_params() == 8 * 32 and b.n_params() == 12 * 32 + 48 * 32
    assert a.iou(b) == pytest.approx(4 * 32 / (16 * 32 + 48 * 32))


def test_gemma2_is_refused_with_one_line_error():
    model = tiny_model("gemma2")
    with pytest.raises(CaplocError) as ei:
        NodeGraph(model, Site(model))
    assert "\n" not in str(ei.value) and "additive residual" in str(ei.value)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "phi3"])
def test_other_architectures_build_and_score(arch):
    model = tiny_model(arch)
    g = NodeGraph(model, Site(model))
    assert g.parallel == [arch == "gpt_neox"] * 3
    ids = [5, 9, 14, 7]
    emb = clean_embedding(g, ids)
    ea = edge_attribution(g, ids, 4, [3], emb, keep=True)  # corrupt == clean: every score is 0
    assert ea.scores.abs().max() == 0 and ea.m_clean == pytest.approx(ea.m_corrupt, abs=1e-5)
    units, sizes, _, _ = g.param_units()
    assert sizes.min() > 0
    assert count_hooks(model) == 0


# ---------------------------------------------------------------------------------------------------------------------
# fidelity aggregation on hand-made circuits; the audit end to end on a tiny model; save / load
# ---------------------------------------------------------------------------------------------------------------------
def _hand_audit():
    nodes = ["emb", "a", "b", "c", "logits"]
    edges = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [1, 2], [1, 3], [1, 4], [2, 3], [2, 4], [3, 4]])
    top = np.array([[0, 1, 2], [0, 1, 4], [7, 8, 9], [7, 8, 9]])  # fact 0: IoU 2/4; fact 1: IoU 1
    units = ["a", "b", "c"]
    return CircuitAudit(
        nodes=nodes, edges=edges, node_units=[[], [0], [1], [2], []], unit_names=units,
        unit_sizes=np.array([10, 20, 70]), unit_ranges={u: [] for u in units},
        phrasing_fact=np.array([0, 0, 1, 1]), phrasing_slot=np.array([0, 1, 0, 1]), phrasing_text=["p0", "p1", "p2", "p3"], phrasing_corruption=["noise"] * 4,
        facts=[{"id": "f0", "relation_id": "R", "input_index": 0, "n_phrasings": 2},
               {"id": "f1", "relation_id": "R", "input_index": 2, "n_phrasings": 3}], top_edges=top,
        top_scores=np.ones((4, 3), np.float32), m_clean=np.zeros(4), m_corrupt=np.zeros(4), m_empty=np.log([.1, .2, .3, .4]),
        ratio_circuit=np.array([0.9, 0.2, 0.6, 0.1]), ratio_random=np.array([[0.1, 0.9]] * 4), total_params=1000,
        config=CircuitConfig(top_k=3, fidelity_draws=50).to_dict(), meta={"model_id": "hand"}, n_input_facts=3,
    )


def test_fidelity_and_reliability_on_hand_made_circuits(tmp_path):
    a = _hand_audit()
    f = a.fidelity()
    assert f["edge_iou"]["per_fact"] == pytest.approx([0.5, 1.0])
    assert f["edge_iou"]["paraphrase"] == pytest.approx(0.75)
    # node sets: p0 {0,1,2,3}, p1 {0,1,2}, p2 = p3 = {2,3,4}; units: p0 {a,b,c}, p1 {a,b}, p2 = p3 {b,c}
    assert f["node_iou"]["per_fact"] == pytest.approx([3 / 4, 1.0])
    assert f["param_iou"]["per_fact"] == pytest.approx([30 / 100, 1.0])
    # cross-fact pairs (same relation): (0,2) (0,3) (1,2) (1,3): no shared edge; node IoUs 2/5, 2/5, 1/5, 1/5
    assert f["edge_iou"]["same_relation_other_fact"] == pytest.approx(0.0)
    assert f["node_iou"]["same_relation_other_fact"] == pytest.approx((2 / 5 + 1 / 5) / 2)
    # exact chance IoU of two random 3-subsets of 10 edges: sum_x P(x) x / (6 - x)
    from math import comb
    want = sum(comb(3, x) * comb(7, 3 - x) / comb(10, 3) * x / (6 - x) for x in range(4))
    assert f["edge_iou"]["random_same_size"] == pytest.approx(want)
    r = a.reliability(threshold=0.5)
    assert r["circuit"]["share_keeps"] == pytest.approx(0.5) and r["random"]["share_keeps"] == pytest.approx(0.5)
    assert r["empty"]["share_keeps"] == pytest.approx(0.0)
    assert a.param_share().tolist() == pytest.approx([0.1, 0.03, 0.09, 0.09])
    # common-metric export: per input fact (fact 1 of the input was skipped), per phrasing {unit: parameter count}
    assert a.param_sets == [[{"a": 10, "b": 20, "c": 70}, {"a": 10, "b": 20}], [], [{"b": 20, "c": 70}, {"b": 20, "c": 70}, None]]
    assert a.universe == {"a": 10, "b": 20, "c": 70}
    a.save(tmp_path)
    b = CircuitAudit.load(tmp_path)
    assert b.param_sets == a.param_sets
    assert json.dumps(b.fidelity()) == json.dumps(a.fidelity()) and np.array_equal(b.top_edges, a.top_edges)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["kind"] == "audit_circuits" and rep["claims"]["circuit_edge_iou"]["value"] == pytest.approx(0.75)
    for fig in rep["figures"]:
        assert (tmp_path / fig["file"]).exists()


def _tiny_facts():
    rows = [("Ab", "xy", ["The Ab is x", "Ab thing is x"]), ("Gh", "zy", []), ("Cd", "yz", ["The Cd is x", "Cd thing is x"]),
            ("Ef", "zz", ["The Ef is x"])]
    samples = [Sample(prompt=f"{s} is in", target=" " + a, group="R1",
                      meta={"subject": s, "attribute": a, "relation_id": "R1", "paraphrases": p}, id=f"f{i}")
               for i, (s, a, p) in enumerate(rows)]
    return Dataset("tinyfacts", samples, {"loader": "test"})


def test_audit_end_to_end_tiny(tmp_path):
    from caploc.models import load_model

    lm = load_model("tiny:llama")
    ids = lm.tokenizer.encode("The Ab is x", add_special_tokens=False)
    a, b = subject_span(lm.tokenizer, ids, "The Ab is x", "Ab")
    assert lm.tokenizer.decode(ids[a:b]).strip() == "Ab"
    cfg = CircuitConfig(top_k=20, max_phrasings=3, random_draws=3, fidelity_draws=20, corrupt="swap")
    res = audit_circuits(lm, _tiny_facts(), cfg, progress=False)
    assert res.n_phrasings == 3 + 3 + 2 and res.top_edges.shape == (8, 20)
    assert set(res.phrasing_corruption) <= {"swap", "noise"}
    assert np.all(res.ratio_circuit > 0) and res.ratio_random.shape == (8, 3)
    # ranked by |score|
    assert np.all(np.diff(np.abs(res.top_scores), axis=1) <= 1e-7)
    ps = param_sets(res)  # per input fact; "Gh" (one phrasing) was skipped
    assert [len(f) for f in ps] == [3, 0, 3, 2] and ps == res.param_sets
    assert sum(ps[0][0].values()) == pytest.approx(res.param_share()[0] * res.total_params)
    pr = param_ranges(res)
    assert len(pr) == 8 and pr[0].n_params() == sum(ps[0][0].values())
    # the audit's own Fact objects work too
    from caploc.stages.audit.facts import facts_from_dataset
    facts, dropped = facts_from_dataset(_tiny_facts())
    res2 = audit_circuits(lm, facts, cfg, progress=False)
    assert dropped == 1 and res2.n_phrasings == 8 and [len(f) for f in res2.param_sets] == [3, 3, 2]
    assert res2.phrasing_text == res.phrasing_text
    res.save(tmp_path)
    back = CircuitAudit.load(tmp_path)
    assert json.dumps(back.summary()) == json.dumps(res.summary())
    assert count_hooks(lm.model) == 0


@pytest.mark.real
def test_audit_real_model_tiny_settings():
    from caploc.data import load_dataset
    from caploc.models import load_model

    lm = load_model("smollm2-135m")
    facts = load_dataset("facts", n=2, seed=3)
    res = audit_circuits(lm, facts, CircuitConfig(top_k=50, max_phrasings=2, random_draws=1, fidelity_draws=10),
                         progress=False)
    assert res.n_phrasings >= 2 and math.isfinite(res.fidelity()["edge_iou"]["paraphrase"])
