"""caploc.memory: the peak-memory formula by hand, against what autograd saves, the LM-head term and the budget split,
the planner on a 7B config, and budgets from free memory."""
from __future__ import annotations

import math

import pytest
import torch

from caploc.attribution.engine import AttributionConfig, Attributor
from caploc.errors import CaplocError
from caploc.lmhead import MIN_CHUNK, chunk_tokens
from caploc.memory import (
    HEAD_CAP,
    HEAD_SHARE,
    ModelShape,
    activation_bytes_per_token_layer,
    auto_memory_mb,
    budgets,
    count_params,
    engine_row_bytes,
    gxa_run_peak_bytes,
    ig_peak_bytes,
    ig_sample_peak_bytes,
    plan,
)
from caploc.models.layouts import Site


@pytest.fixture(scope="module")
def llama():
    from caploc.models.tiny import tiny_model

    return tiny_model("llama")


SMALL = ModelShape(n_layers=2, d_model=4, d_mlp=8, n_heads=2, n_kv_heads=1, head_dim=2, vocab=10, n_params=100)


def test_memory_formula_by_hand():
    # fp32 (e = 4), SDPA, R = 3 rows, S = 5, P = 2, n = 4 scored, D = L = 2, h = 1
    t = ig_peak_bytes(SMALL, 3, 5, 2, "float32", n_scored=4, scaled_layers=1)
    a = 2 * 4 * 4 + 2 * 4 * 4 + 3 * 8 * 4  # 2 fp32 norm inputs + query and SDPA output + 3 MLP vectors = 160
    assert activation_bytes_per_token_layer(SMALL, "float32", "sdpa") == a == 160
    assert t["weights"] == 400
    assert t["sample_state"] == 2 * 2 * 2 * 2 * 4 + 2 * 5 * 4 * 4 + 2 * 5 * 8 * 4  # prefix KV + blocks + acts = 512
    assert t["kv_cache"] == 3 * 2 * 2 * (2 * 2 + 2 * 5) * 4  # = 672
    # (D-1) layers x a, final norm input, GQA repeat with a prefix: 2 H hd (P+S), and the saved SDPA mask S (P+S)
    assert t["saved_activations"] == 3 * 5 * 1 * 160 + 3 * 5 * 4 * 4 + 3 * 1 * 2 * 2 * 2 * 7 * 4 + 3 * 1 * 5 * 7 * 4
    # chunked LM head: one chunk (all 12 scored positions fit) of fp32 logits, their log-softmax and gradients
    # (16 bytes per logit), plus the 12 gathered hidden states and log-probs
    assert t["logits"] == 3 * 4 * 10 * 16 + 3 * 4 * (4 * 4 + 8)
    assert t["backward_transients"] == 3 * 5 * (2 * 4 + 3 * 8) * 4 + 1 * 3 * 5 * 8 * 4
    assert t["total"] == sum(v for k, v in t.items() if k != "total")
    # bf16: weights and most activations halve; the RMSNorm fp32 copies do not
    assert activation_bytes_per_token_layer(SMALL, "bfloat16", "sdpa") == 2 * 4 * 4 + 2 * 4 * 2 + 3 * 8 * 2
    tb = ig_peak_bytes(SMALL, 3, 5, 2, "bfloat16", scored_layers=1)
    assert tb["weights"] == 200
    # bf16 sample state: prefix KV, blocks and captured activations in bf16, fp32 copies of the one scored layer
    assert tb["sample_state"] == 2 * 2 * 2 * 2 * 2 + 2 * 5 * 4 * 2 + 2 * 5 * 8 * 2 + 1 * 5 * 8 * 4


def test_memory_formula_is_monotone():
    base = ig_peak_bytes(SMALL, 4, 16, 8)["total"]
    assert ig_peak_bytes(SMALL, 5, 16, 8)["total"] > base
    assert ig_peak_bytes(SMALL, 4, 17, 8)["total"] > base
    assert ig_peak_bytes(SMALL, 4, 16, 9)["total"] > base
    assert ig_peak_bytes(SMALL, 4, 16, 8, depth=1)["total"] < base
    assert ig_peak_bytes(SMALL, 4, 16, 8, "bfloat16")["total"] < base
    totals = [ig_peak_bytes(SMALL, r, 32)["total"] for r in range(1, 40)]
    assert all(b > a for a, b in zip(totals, totals[1:]))


def test_memory_formula_matches_what_autograd_saves(llama):
    """Saved-for-backward bytes of the deepest micro-batch, counted exactly with saved_tensors_hooks, against the
    formula's saved-activation + log-softmax terms (eager attention with GQA on the tiny Llama)."""
    model = llama
    site = Site(model)
    shape = ModelShape.from_model(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for R, T, P in ((6, 40, 0), (4, 40, 15)):
        saved: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        # R rows with a backward: steps R + 1, as the alpha = 1 point comes from the clean run
        cfg = AttributionConfig(method="ig", steps=R + 1, layers=[0], completeness=False, max_rows=R,
                                positions="all" if P == 0 else "target")
        att = Attributor(site, cfg)
        real = att._ig_chunk

        def chunk(*a, _real=real, **k):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return _real(*a, **k)

        att._ig_chunk = chunk
        ids = list(range(3, 3 + T + 1))
        prompt = T // 2 if P == 0 else P + 1
        att.score(ids, prompt)
        S, n = T - P, T + 1 - prompt
        pred = ig_peak_bytes(shape, R, S, P, "float32", n_scored=n, attn="eager", scaled_layers=1)
        # + the scored hidden states the chunked LM head keeps (its logits are recomputed in the backward)
        expect = pred["saved_activations"] + R * n * shape.d_model * 4
        measured = sum(saved.values())
        # within 2 %: the full log-softmax the plain path saved (R n V 4 bytes) would be 6-12 % more
        assert 0.98 <= measured / expect <= 1.02, (R, T, P, measured, expect)


def test_count_params_on_meta_and_the_7b_plan():
    from transformers import LlamaConfig

    small = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128)
    n = count_params(small)
    d, m, V, kv = 32, 48, 128, 2 * 8
    assert n == 2 * V * d + 2 * (2 * d * d + 2 * d * kv + 3 * d * m + 2 * d) + d  # untied embeddings
    # Llama-2-7B: shape from its config, parameter count in closed form (count_params on the meta device gives the
    # same 6,738,415,616; the benchmark's plan command does that)
    cfg7 = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       vocab_size=32000)
    d, m, V, L = 4096, 11008, 32000, 32
    n7 = 2 * V * d + L * (4 * d * d + 3 * d * m + 2 * d) + d
    assert n7 == 6_738_415_616
    p = plan(ModelShape.from_config(cfg7, n_params=n7), 512, "bfloat16", 80)
    assert p["fits"] and p["rows"] >= 8 and p["peak_gb"] <= 80 * 0.9
    assert math.isclose(p["weights_gb"], n7 * 2 / 2**30)
    assert not plan(ModelShape.from_config(cfg7, n_params=n7), 512, "bfloat16", 12)["fits"]
    with pytest.raises(CaplocError):
        plan(SMALL, 1, "bfloat16", 80)


def test_auto_memory_mb_from_free_device_memory(monkeypatch, llama):
    from transformers import LlamaConfig

    assert auto_memory_mb(llama, 128) is None  # CPU: keep the configured budget

    class Param:  # a parameter on an accelerator (none here): device, dtype and size are all that is read
        device, dtype = torch.device("xpu", 0), torch.bfloat16

        def numel(self):
            return 6_738_415_616

        def element_size(self):
            return 2

    class Model:
        config = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                             vocab_size=32000)

        def parameters(self):
            return iter([Param()])

    free = 60 * 2**30
    monkeypatch.setattr(torch.accelerator, "get_memory_info", lambda dev: (free, 80 * 2**30))
    mb = auto_memory_mb(Model(), 512)
    shape = ModelShape.from_model(Model())
    p = plan(shape, 512, "bfloat16", (free + shape.n_params * 2) / 2**30)
    assert mb == p["memory_mb"] and p["rows"] >= 8
    # the engine packs the planned number of rows with that budget (its own estimate per row, at full depth)
    assert int(budgets(mb).rows // engine_row_bytes(shape, 511, 511, "bfloat16")) == p["rows"]
    monkeypatch.setattr(torch.accelerator, "get_memory_info", lambda dev: (2**30, 80 * 2**30))
    with pytest.raises(CaplocError, match="GB are free"):
        auto_memory_mb(Model(), 512)


def test_row_depths_add_up_row_by_row():
    """A micro-batch of rows at different depths costs the sum of its rows' depth-dependent terms."""
    both = ig_peak_bytes(SMALL, 2, 6, 3, depth=[1, 2], scaled_layers=2)
    one, two = (ig_peak_bytes(SMALL, 1, 6, 3, depth=D, scaled_layers=2) for D in (1, 2))
    for k in ("kv_cache", "saved_activations"):
        assert both[k] == one[k] + two[k], k
    assert ig_peak_bytes(SMALL, 2, 6, 3, depth=[2, 2]) == ig_peak_bytes(SMALL, 2, 6, 3, depth=2)
    with pytest.raises(CaplocError):
        ig_peak_bytes(SMALL, 3, 6, 3, depth=[1, 2])


@pytest.mark.parametrize("memory_mb", [0.5, 2.0, 2048.0])
def test_the_ig_prediction_packs_rows_as_the_engine_does(llama, memory_mb):
    """ig_sample_peak_bytes emulates Attributor's micro-batches: the same sizes, in the same order, with or without a
    backward -- under budgets that force 1, a few or all rows per micro-batch."""
    site = Site(llama)
    cfg = AttributionConfig(method="ig", steps=3, memory_mb=memory_mb)
    att = Attributor(site, cfg)
    seen = []
    real = att._ig_chunk

    def chunk(c, *a, _real=real, **k):
        seen.append((len(c), a[-1] if len(a) >= 11 else k.get("grad", True)))
        return _real(c, *a, **k)

    att._ig_chunk = chunk
    ids, prompt = list(range(3, 3 + 24)), 10
    att.score(ids, prompt)
    alphas, weights = cfg.alpha_points()
    pred = ig_sample_peak_bytes(ModelShape.from_model(llama), len(ids), prompt, alphas, weights, memory_mb=memory_mb)
    assert pred["batches"] == seen
    assert pred["total"] >= pred["micro_batch"] and pred["total"] >= pred["clean"]


@pytest.mark.parametrize("memory_mb", [0.05, 0.5, 2048.0])
def test_grad_x_act_batches_follow_memory_mb_with_the_same_scores(llama, memory_mb):
    """The engine's grad x act batches are the predicted ones, shrink with the budget, and score the same."""
    site = Site(llama)
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(3, 100, (L,), generator=g).tolist(), L // 2) for L in (30, 12, 25, 8, 17, 40, 9)]
    ref = Attributor(site, AttributionConfig(method="grad_x_act", batch_size=1)).score_batch(items)
    att = Attributor(site, AttributionConfig(method="grad_x_act", memory_mb=memory_mb, batch_size=4))
    sizes = []
    real = att._gxa_batch
    att._gxa_batch = lambda b, _real=real: sizes.append(len(b)) or _real(b)
    got = att.score_batch(items)
    pred = gxa_run_peak_bytes(ModelShape.from_model(llama), [len(i) for i, _ in items], [p for _, p in items],
                              batch_size=4, memory_mb=memory_mb,
                              attn="eager" if llama.config._attn_implementation == "eager" else "sdpa")
    assert sizes == pred["batches"]
    assert (max(sizes) == 1) if memory_mb < 0.1 else (max(sizes) == 4) if memory_mb > 1000 else 1 < max(sizes) < 4
    for a, b in zip(got, ref):
        assert abs(a.f - b.f) <= 1e-5 * abs(b.f)
        assert torch.allclose(a.scores, b.scores, rtol=1e-4, atol=1e-6)


def test_budget_split_gives_the_lm_head_a_vocabulary_aware_chunk():
    b = budgets(2048)
    assert b.head == 2048 * 2**20 * HEAD_SHARE and b.rows + b.head == b.total
    assert budgets(1e6).head == HEAD_CAP
    # a 262k vocabulary gets 8x fewer positions per chunk than a 32k one, never fewer than one
    k32, k262 = chunk_tokens(32768, b.head), chunk_tokens(262144, b.head)
    assert k32 == 8 * k262 and chunk_tokens(262144, 1.0) == MIN_CHUNK
    with pytest.raises(CaplocError):
        budgets(0)
