"""The chunked LM head against the plain computation: the model's own forward from the same hidden states (full
[batch, tokens, vocab] logits, log-softmax, gather), values and gradients, on every tiny architecture."""
from __future__ import annotations

import pytest
import torch

from caploc import lmhead
from caploc.lmhead import (
    bytes_per_logit,
    chunk_tokens,
    head_logprobs,
    head_of,
    model_logprobs,
    resolve_head,
    verify_head,
)
from caploc.models.tiny import tiny_model

from .toy import ToyLM


@pytest.fixture(autouse=True)
def _no_chunk_floor(monkeypatch):
    """Budgets here are a few logits, to exercise the chunking on tiny vocabularies: no floor on the chunk size."""
    monkeypatch.setattr(lmhead, "MIN_CHUNK", 1)


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _plain(model, ids, hidden, positions, targets):
    """The model's own forward, with the LM head's input replaced by ``hidden``: full logits for every position, then
    log-softmax and a gather (written independently of caploc.lmhead)."""
    out = model.get_output_embeddings()
    h = out.register_forward_pre_hook(lambda m, args: (hidden,))
    try:
        logits = model(input_ids=ids).logits
    finally:
        h.remove()
    lp = torch.log_softmax(logits.float(), -1)
    sel = torch.take_along_dim(lp, positions[:, :, None], dim=1)
    return sel.gather(-1, targets[..., None]).squeeze(-1)


def _case(model, seed=0, B=3, T=11, n=7):
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    ids = torch.randint(2, V, (B, T), generator=g)
    positions = torch.stack([torch.randperm(T, generator=g)[:n] for _ in range(B)])
    targets = torch.randint(0, V, (B, n), generator=g)
    w = torch.randn(B, n, generator=g, dtype=torch.float32)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
    return ids, positions, targets, w, hidden


@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_values_and_gradients_match_the_full_logits(tiny_models, arch, chunk):
    model = tiny_models[arch]
    head = resolve_head(model)
    assert head is not None, arch
    ids, positions, targets, w, hidden = _case(model)
    h_ref = hidden.clone().requires_grad_(True)
    ref = _plain(model, ids, h_ref, positions, targets)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), h_ref)
    h = hidden.clone().requires_grad_(True)
    got = head_logprobs(head, h, targets, positions, chunk=chunk)
    (g,) = torch.autograd.grad((got * w).sum(), h)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert _rel(got, ref) <= 1e-6, (arch, _rel(got, ref))
    assert _rel(g, g_ref) <= 1e-6, (arch, _rel(g, g_ref))
    assert bool((g[:, :, 0] != 0).any())  # the gradient is not trivially zero


def test_strong_softcap_and_weight_gradients_through_tied_embeddings():
    """Gemma 2 with a soft-cap that bends the logits (cap 0.1), and the tied embedding's weight gradient."""
    model = tiny_model("gemma2")
    model.config.final_logit_softcapping = 0.1
    head = head_of(model)
    assert head.softcap == 0.1 and verify_head(model, head)
    W = model.get_output_embeddings().weight
    assert W is model.get_input_embeddings().weight  # tied
    ids, positions, targets, w, hidden = _case(model, seed=3)
    W.requires_grad_(True)
    try:
        ref = _plain(model, ids, hidden, positions, targets)
        (gw_ref,) = torch.autograd.grad((ref * w).sum(), W)
        got = head_logprobs(head, hidden, targets, positions, chunk=2)
        (gw,) = torch.autograd.grad((got * w).sum(), W)
    finally:
        W.requires_grad_(False)
    assert _rel(got, ref) <= 1e-6 and _rel(gw, gw_ref) <= 1e-6
    z = head.logits(hidden)
    assert float(z.abs().max()) < 0.1 < float((hidden @ W.T).abs().max()) / 3  # the cap really bends


def test_bias_gradient_gptj(tiny_models):
    model = tiny_models["gptj"]
    b = model.get_output_embeddings().bias
    assert b is not None
    ids, positions, targets, w, hidden = _case(model, seed=5)
    b.requires_grad_(True)
    try:
        (gb_ref,) = torch.autograd.grad((_plain(model, ids, hidden, positions, targets) * w).sum(), b)
        (gb,) = torch.autograd.grad((head_logprobs(resolve_head(model), hidden, targets, positions, chunk=3) * w).sum(), b)
    finally:
        b.requires_grad_(False)
    assert _rel(gb, gb_ref) <= 1e-6


def test_shared_positions_targets_and_ignore_index(tiny_models):
    model = tiny_models["qwen3"]
    head = resolve_head(model)
    _, _, _, _, hidden = _case(model, B=2, T=9)
    pos = torch.tensor([4, 5, 6, 7])
    t = torch.tensor([10, 11, 12, 13])
    shared = head_logprobs(head, hidden, t, pos)
    per_row = head_logprobs(head, hidden, t[None].expand(2, 4), pos[None].expand(2, 4))
    assert torch.equal(shared, per_row)
    # all positions, -100 ignored: zeros there, the same numbers elsewhere
    labels = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    full = head_logprobs(head, hidden, labels)
    masked = labels.clone()
    masked[0, :3] = -100
    masked[1, -2:] = -100
    got = head_logprobs(head, hidden, masked, chunk=2)
    keep = masked != -100
    assert torch.equal(got[~keep], torch.zeros(int((~keep).sum())))
    assert _rel(got[keep], full[keep]) <= 1e-6
    with pytest.raises(ValueError, match="do not match"):
        head_logprobs(head, hidden, torch.zeros(2, 3, dtype=torch.long), pos)


def test_chunks_respect_the_budget_forward_and_backward(tiny_models):
    """The head never sees more positions than one chunk -- also when the backward recomputes -- and nothing of
    vocabulary size is kept for the backward (the same hooks do see it on the plain path)."""
    model = tiny_models["llama"]
    head = resolve_head(model)
    V = head.vocab
    per = bytes_per_logit(torch.float32, grad=True)
    k = chunk_tokens(V, 5 * V * per + 3, torch.float32, grad=True)
    assert k == 5
    _, positions, targets, w, hidden = _case(model, B=3, T=11, n=7)  # 21 positions -> 3 x (3 rows x 1 position)
    seen = []
    hk = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].numel() // a[0].shape[-1]))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    h = hidden.clone().requires_grad_(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp = head_logprobs(head, h, targets, positions, budget_bytes=5 * V * per + 3)
        n_fwd = len(seen)
        torch.autograd.grad((lp * w).sum(), h)
    finally:
        hk.remove()
    assert max(seen) <= k and sum(seen[:n_fwd]) == 21
    assert sum(seen[n_fwd:]) == 21  # the backward recomputed every chunk, one at a time
    assert not any(s and s[-1] == V for s in saved), saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the plain path keeps [.., V] tensors
        torch.log_softmax(head.logits(hidden.clone().requires_grad_(True)).float(), -1)
    assert any(s and s[-1] == V for s in saved)


def test_chunk_sizes_by_hand():
    assert bytes_per_logit(torch.float32, grad=False) == 4 + 4
    assert bytes_per_logit(torch.float32, grad=True) == 8 + 8
    assert bytes_per_logit(torch.bfloat16, grad=True) == (2 + 4 + 4) + (8 + 2)
    assert bytes_per_logit(torch.float32, grad=True, softcap=True) == 12 + 4 + 8
    # 262k vocabulary, fp32 with a backward, 128 MiB: 32 positions per chunk; a 32k vocabulary gets 8x more
    assert chunk_tokens(262144, 128 * 2**20) == 32 and chunk_tokens(32768, 128 * 2**20) == 256
    assert chunk_tokens(262144, 1) == 1


def test_chunks_have_a_floor_of_min_chunk_positions(monkeypatch):
    monkeypatch.setattr(lmhead, "MIN_CHUNK", 32)
    assert chunk_tokens(262144, 1) == 32 and chunk_tokens(262144, 128 * 2**20) == 32
    assert chunk_tokens(32768, 128 * 2**20) == 256
    assert lmhead.head_peak_bytes(262144, 10, 128 * 2**20) == 10 * 262144 * 16


def test_model_logprobs_matches_plain_and_falls_back(tiny_models):
    model = tiny_models["mistral"]
    ids, positions, targets, _, _ = _case(model, seed=2)
    with torch.no_grad():
        plain = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        ref = torch.take_along_dim(plain, positions[:, :, None], 1).gather(-1, targets[..., None]).squeeze(-1)
        got = model_logprobs(model, targets, positions, input_ids=ids)
        assert _rel(got, ref) <= 1e-6
        # shared positions at the end: also through the fallback (a head caploc does not know -> the model's logits)
        pos = torch.arange(6, 11)
        t = targets[0, :5]
        want = plain[:, 6:11].gather(-1, t[None, :, None].expand(3, 5, 1)).squeeze(-1)
        assert _rel(model_logprobs(model, t, pos, input_ids=ids), want) <= 1e-6
    odd = tiny_model("llama")
    odd.config.final_logit_softcapping = 5.0  # llama's forward ignores it: the reconstructed head is wrong
    assert head_of(odd).softcap == 5.0 and not verify_head(odd, head_of(odd))
    assert resolve_head(odd) is None
    with torch.no_grad():
        ref_odd = torch.log_softmax(odd(input_ids=ids).logits.float(), -1)[:, 6:11]
        got_odd = model_logprobs(odd, t, pos, input_ids=ids)
    assert _rel(got_odd, ref_odd.gather(-1, t[None, :, None].expand(3, 5, 1)).squeeze(-1)) <= 1e-6
    toy = ToyLM()  # no base model: its own logits
    assert head_of(toy) is None
    with torch.no_grad():
        lp = model_logprobs(toy, torch.tensor([0, 0]), torch.tensor([3, 4]), input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
        q = toy(torch.tensor([[1, 2, 3, 4, 5]])).logits[0, 3:5, 0]
    assert torch.allclose(lp[0], q, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# the per-use functions (evaluation NLL, fine-tuning loss, next-token probabilities) against the plain computation
# ---------------------------------------------------------------------------------------------------------------------
def _padded_batch(model, seed=0):
    """Right-padded rows of different lengths, prompt then target (the layout of evaluation and fine-tuning)."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    lens, prompts = [12, 7, 10], [5, 3, 9]
    T = max(lens)
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    att = torch.zeros_like(ids)
    tgt = torch.zeros_like(ids, dtype=torch.bool)
    for r, (L, P) in enumerate(zip(lens, prompts)):
        ids[r, :L] = torch.randint(2, V, (L,), generator=g)
        att[r, :L] = 1
        tgt[r, P:L] = True
    return ids, att, tgt, lens, prompts


# a budget of a few logits: one position per chunk, so the chunking itself is exercised
TINY_BUDGET = 1.0


@pytest.mark.parametrize("budget", [None, TINY_BUDGET])
def test_row_nll_is_the_plain_per_row_nll(tiny_models, arch, budget):
    model = tiny_models[arch]
    ids, att, tgt, lens, prompts = _padded_batch(model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits
        got = lmhead.row_nll(model, ids, tgt, att, budget_bytes=budget)
    assert got.dtype == torch.float64 and got.shape == (3,)
    for r, (L, P) in enumerate(zip(lens, prompts)):
        lp = torch.log_softmax(logits[r, P - 1 : L - 1].float(), -1).gather(1, ids[r, P:L, None])[:, 0]
        want = -lp.double().sum()
        assert abs(float(got[r] - want)) <= 1e-6 * abs(float(want)), (arch, r, float(got[r]), float(want))


@pytest.mark.parametrize("budget", [None, TINY_BUDGET])
def test_batch_nll_is_cross_entropy_with_the_same_gradients(tiny_models, arch, budget):
    model = tiny_models[arch]
    ids, att, tgt, *_ = _padded_batch(model, seed=1)
    batch = {"input_ids": ids, "attention_mask": att, "target_mask": tgt}
    # the LM head's weight (tied to the input embeddings in some) and one weight inside the blocks
    params = [model.get_output_embeddings().weight, list(model.base_model.parameters())[-3]]
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        logits = model(input_ids=ids, attention_mask=att).logits
        mask = tgt[:, 1:] & att[:, 1:].bool()
        want = torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), ids[:, 1:][mask], reduction="sum")
        g_want = torch.autograd.grad(want, params)
        got, n = lmhead.batch_nll(model, batch, budget_bytes=budget)
        g_got = torch.autograd.grad(got, params)
    finally:
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    assert int(n) == int(mask.sum())
    assert _rel(got, want) <= 1e-6, arch
    for a, b in zip(g_got, g_want):
        assert _rel(a, b) <= 1e-5, arch  # gradients: sums of many products, rounded in another order


def test_position_probs_and_logits_match_the_full_softmax(tiny_models, arch):
    model = tiny_models[arch]
    ids, att, _tgt, lens, _ = _padded_batch(model, seed=2)
    last = torch.tensor(lens) - 1
    targets = torch.tensor([3, 5, 7])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        rows = logits[torch.arange(3), last]
        want = rows.softmax(-1).gather(1, targets[:, None])[:, 0]
        got = lmhead.position_probs(model, targets, last, input_ids=ids, attention_mask=att)
        got_logits = lmhead.position_logits(model, last, input_ids=ids, attention_mask=att)
        # the last position of every row (unpadded inputs, as causal tracing runs them) and one shared target id
        full = ids[:, :7]
        want_last = model(input_ids=full).logits[:, -1].float().softmax(-1)[:, 4]
        got_last = lmhead.position_probs(model, 4, input_ids=full)
    assert _rel(got, want) <= 1e-6 and _rel(got_logits, rows) <= 1e-6 and _rel(got_last, want_last) <= 1e-6, arch


def test_per_use_functions_fall_back_to_the_models_own_logits():
    """A model without a separate base model (the toy: 2 output classes) is scored through its own logits: same
    numbers."""
    model = ToyLM()
    assert resolve_head(model) is None
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 2, (3, 9), generator=g)
    att = torch.ones_like(ids)
    att[1, 6:] = 0
    tgt = torch.zeros_like(ids, dtype=torch.bool)
    tgt[:, 4:] = True
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits
        got = lmhead.row_nll(model, ids, tgt, att)
        for r, L in enumerate((9, 6, 9)):
            lp = torch.log_softmax(logits[r, 3 : L - 1].float(), -1).gather(1, ids[r, 4:L, None])[:, 0]
            assert abs(float(got[r] + lp.double().sum())) <= 1e-6 * abs(float(lp.sum()))
        last = torch.tensor([8, 5, 8])
        t = torch.tensor([1, 0, 1])
        p = lmhead.position_probs(model, t, last, input_ids=ids, attention_mask=att)
        want = logits[torch.arange(3), last].float().softmax(-1)[torch.arange(3), t]
    assert _rel(p, want) <= 1e-6


def test_peft_wrapped_model_scores_through_its_adapter():
    """A LoRA-wrapped model: the chunked head reads the wrapped model (adapters included), same as its own logits."""
    import peft
    import torch.nn.functional as F

    from caploc.lmhead import batch_nll
    from caploc.models import load_model

    lm = load_model("tiny:llama")
    wrapped = peft.get_peft_model(lm.model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21], [2, 6, 10, 14, 0, 0]])
    att = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    tgt = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": att, "target_mask": tgt}
    got, n = batch_nll(wrapped, batch)
    logits = wrapped(input_ids=ids, attention_mask=att).logits
    m = tgt[:, 1:] & att[:, 1:].bool()
    want = F.cross_entropy(logits[:, :-1][m].float(), ids[:, 1:][m], reduction="sum")
    assert int(n) == int(m.sum()) and torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    base = batch_nll(lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model, batch)[0]
    assert torch.allclose(base, got)  # the unwrapped model carries the adapter layers in place
