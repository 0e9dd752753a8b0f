"""``--memory-mb`` beyond attribution: the batching rule, evaluation batches and fine-tuning micro-batches follow the
budget and give the same numbers as unconstrained batches; the fine-tuning formula against what autograd saves."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import caploc.measure as measure
from caploc.data.encode import Encoded
from caploc.lmhead import batch_nll
from caploc.memory import ModelShape, batches, fit_count, micro_batches, train_sample_bytes
from caploc.models.layouts import Site
from caploc.models.tiny import tiny_model
from caploc.stages.finetune import FinetuneConfig
from caploc.stages.finetune.train import collate_batch, train

train_mod = sys.modules["caploc.stages.finetune.train"]  # the package's `train` attribute is the function


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Encoded(torch.randint(3, 100, (L,), generator=g).tolist(), L // 2) for L in lengths]


def test_fit_count_by_hand():
    per = lambda T: T  # noqa: E731 - one byte per token
    assert fit_count([10, 5, 8], 0, 8, per, 20) == 2  # 2 x 10 fits, 3 x 10 does not
    assert fit_count([10, 5, 8], 1, 8, per, 20) == 2  # 5, then 2 x 8 = 16
    assert fit_count([10, 5, 8], 0, 1, per, 1e9) == 1  # the cap
    assert fit_count([50, 5], 0, 8, per, 20) == 1  # too long alone: still runs, alone
    assert fit_count([5, 50], 0, 8, per, 20) == 1  # padding to 50 makes the pair too big
    assert fit_count([1, 1, 1], 2, 8, per, 20) == 1  # the last item


def test_batches_in_order_or_longest_first():
    per = lambda T: T  # noqa: E731
    assert batches([10, 5, 8], 8, per, 20) == [[0, 1], [2]]
    assert batches([5, 10, 8], 8, per, 20, longest_first=True) == [[1, 2], [0]]
    assert batches([4, 4, 4], 8, per, 8, longest_first=True) == [[0, 1], [2]]  # ties keep their order
    assert batches([], 8, per, 8) == []


def test_micro_batches_keep_a_fitting_batch_and_split_longest_first():
    per = lambda T: T  # noqa: E731
    assert micro_batches([3, 9, 4], 100, per) == [[0, 1, 2]]  # fits: the batch's own order (same sums as before)
    assert micro_batches([3, 9, 4], 10, per) == [[1], [2, 0]]  # 9 alone; 4 and 3 padded to 4
    assert sorted(sum(micro_batches([7, 2, 9, 1, 5], 12, per), [])) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("memory_mb", [1e-4, 0.25, 2048.0])
def test_evaluation_batches_follow_memory_mb_with_the_same_nll(llama, memory_mb, monkeypatch):
    lm = SimpleNamespace(model=llama, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=0), site=Site(llama))
    enc = _samples([30, 12, 25, 8, 17, 40, 9])
    ref, counts = measure.nll_sums(lm, enc, batch_size=1, progress=False, memory_mb=2048.0)
    sizes = []
    real = measure.row_nll
    monkeypatch.setattr(measure, "row_nll", lambda m, ids, *a, **k: sizes.append(ids.shape[0]) or real(m, ids, *a, **k))
    got, counts2 = measure.nll_sums(lm, enc, batch_size=4, progress=False, memory_mb=memory_mb)
    assert sum(sizes) == len(enc) and (counts == counts2).all()
    if memory_mb < 1e-3:
        assert max(sizes) == 1
    elif memory_mb > 1000:
        assert sizes == [4, 3]
    else:
        assert max(sizes) > 1 and sizes != [4, 3]  # the budget, not only the cap, cut a batch
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_fine_tuning_micro_batches_give_the_same_steps(monkeypatch):
    """A budget too small for the batch splits every step into micro-batches; the accumulated gradients are the
    batch's, so losses and trained weights match the unsplit run (float32 summation order aside)."""
    enc = _samples([30, 12, 25, 8, 17, 40, 9, 22])
    runs = {}
    for mb in (1e-4, 4096.0):
        model = tiny_model("llama")
        params = [p for n, p in model.named_parameters() if "mlp" in n]
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in params))
        calls = []
        monkeypatch.setattr(train_mod, "batch_nll",
                            lambda m, b, _c=calls, **k: _c.append(b["input_ids"].shape[0]) or batch_nll(m, b, **k))
        cfg = FinetuneConfig(steps=3, batch_size=4, lr=1e-2, memory_mb=mb, max_grad_norm=0.0)
        log = train(model, params, enc, cfg, progress=False)
        runs[mb] = (log.losses, [p.detach().clone() for p in params], calls)
    (l_small, w_small, c_small), (l_big, w_big, c_big) = runs[1e-4], runs[4096.0]
    assert c_big == [4, 4, 4] and c_small == [1] * 12
    np.testing.assert_allclose(l_small, l_big, rtol=1e-5)
    init = [p for n, p in tiny_model("llama").named_parameters() if "mlp" in n]
    assert max(float((b - p0).abs().max()) for b, p0 in zip(w_big, init)) > 1e-3  # the steps moved the weights
    for a, b in zip(w_small, w_big):
        # Adam divides by sqrt(v): a near-zero gradient's float32 rounding can move its entry by ~1e-6 (lr 1e-2)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,lo,hi", [("llama", 0.9, 1.1), ("qwen3", 0.85, 1.1), ("gpt2", 1.0, 1.4)])
def test_fine_tuning_formula_against_what_autograd_saves(arch, lo, hi):
    """Saved-for-backward bytes of a fine-tuning forward (every parameter trains), counted with saved_tensors_hooks,
    against ``B x train_sample_bytes`` plus the chunked head's gathered hidden states. Llama-family blocks are
    counted tensor by tensor (within 10 %); GPT-2-style blocks use the conservative default (never under)."""
    model = tiny_model(arch).eval()
    shape = ModelShape.from_model(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for B, T in ((1, 40), (3, 40), (2, 80)):
        saved: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        batch = collate_batch(_samples([T] * B), 0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            batch_nll(model, batch)
        n_scored = B * (T - T // 2)
        pred = B * train_sample_bytes(shape, T, "float32", model.config._attn_implementation) \
            + n_scored * shape.d_model * 4
        ratio = pred / sum(saved.values())
        assert lo <= ratio <= hi, (arch, B, T, ratio)
