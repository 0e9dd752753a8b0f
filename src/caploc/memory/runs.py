"""Whole-run peak predictions: each batches samples / packs IG rows exactly as the code it predicts (the engine, the
evaluation NLL, the fine-tuning step) and takes the worst batch's peak by the terms of :mod:`.formula`."""
from __future__ import annotations

from .formula import (
    _elem,
    _head_bytes,
    _shape,
    batches,
    budgets,
    engine_row_bytes,
    eval_sample_bytes,
    gxa_peak_bytes,
    gxa_sample_bytes,
    ig_peak_bytes,
    micro_batches,
    train_sample_bytes,
)


def ig_sample_peak_bytes(config, seq_len: int, prompt_len: int, alphas: list[float], weights: list[float], *,
                         layers: list[int] | None = None, completeness: bool = True, memory_mb: float = 2048.0,
                         max_rows: int = 256, dtype="float32", attn: str = "sdpa", include_weights: bool = True) -> dict:
    """Predicted peak bytes of exact IG on one sample of ``seq_len`` tokens (``prompt_len`` of prompt; objective
    ``logprob``, ``positions=all``, with reuse) as the engine runs it: the clean run (a forward + backward of one row
    through every layer, recording block outputs and activations), then the (layer, alpha) rows packed top layer
    first into micro-batches the way ``Attributor._chunk_len`` packs them (:func:`engine_row_bytes` against the rows'
    share of ``memory_mb``), each micro-batch's peak by :func:`ig_peak_bytes` with every row at its own depth. Returns
    ``{"total", "clean", "micro_batch", "rows", "batches"}``: the worst micro-batch's peak and row count, and every
    micro-batch as ``(rows, with_gradient)`` in the engine's order."""
    s = _shape(config)
    L = s.n_layers
    S, n = int(seq_len) - 1, int(seq_len) - int(prompt_len)
    scored = list(range(L)) if layers is None else sorted(set(layers))
    b = budgets(memory_mb)
    w_one = sum(w for a, w in zip(alphas, weights) if a == 1.0)
    grad_rows, fwd_rows = [], []
    for l in sorted(scored, reverse=True):
        for a, w in zip(alphas, weights):
            if not (w_one and a == 1.0):
                (grad_rows if w else fwd_rows).append(l)
        if completeness and 0.0 not in alphas:
            fwd_rows.append(l)
    fwd_rows = sorted(fwd_rows + [scored[len(scored) // 2]], reverse=True)  # + the reuse guard
    base = ig_peak_bytes(s, 1, S, 0, dtype, n_scored=n, scored_layers=len(scored), attn=attn,
                         include_weights=include_weights, memory_mb=memory_mb)
    fixed = base["weights"] + base["sample_state"]
    e = _elem(dtype)
    # the clean run: one row through all layers with a backward when alpha = 1 is a point, its activations recorded
    clean = fixed + gxa_sample_bytes(s, S, dtype, bool(w_one), attn) + _head_bytes(s, n, dtype, b.head, bool(w_one))
    worst, worst_rows, batches = 0, 0, []
    for rows, grad in ((grad_rows, True), (fwd_rows, False)):
        i = 0
        while i < len(rows):
            r, total = 0, 0
            while i + r < len(rows) and r < max_rows:
                c = engine_row_bytes(s, S, n, dtype, L - rows[i + r], 0, grad)
                if r > 0 and total + c > b.rows:
                    break
                total, r = total + c, r + 1
            chunk = rows[i : i + r]
            batches.append((r, grad))
            if grad:
                t = ig_peak_bytes(s, r, S, 0, dtype, n_scored=n, depth=[L - l for l in chunk],
                                  scaled_layers=len(set(chunk)), scored_layers=len(scored), attn=attn,
                                  include_weights=include_weights, memory_mb=memory_mb)["total"]
            else:  # forward only: the rows' KV cache and one layer's transients, the head without a backward
                t = fixed + sum(2 * s.n_kv_heads * s.head_dim * (L - l) * S * e for l in chunk) \
                    + r * S * (4 * s.d_model + 3 * s.d_mlp) * e + _head_bytes(s, r * n, dtype, b.head, False)
            if t > worst:
                worst, worst_rows = t, r
            i += r
    return {"total": max(clean, worst), "clean": clean, "micro_batch": worst, "rows": worst_rows, "batches": batches}


def gxa_run_peak_bytes(config, seq_lens: list[int], prompt_lens: list[int], *, batch_size: int = 8,
                       memory_mb: float = 2048.0, grad: bool = True, dtype="float32", attn: str = "sdpa",
                       include_weights: bool = True) -> dict:
    """Predicted peak bytes of grad x act (``grad``) or activation over samples in the given order, batched the way
    ``Attributor._gxa_len`` batches them (at most ``batch_size``, padded to the longest, within the rows' share of
    ``memory_mb``). Returns ``{"total", "batch", "batches"}``: the worst batch's peak and size, and every batch's size."""
    s = _shape(config)
    groups = batches(seq_lens, batch_size, lambda t: gxa_sample_bytes(s, t, dtype, grad, attn), budgets(memory_mb).rows)
    worst, worst_b = 0, 0
    for g in groups:
        t = gxa_peak_bytes(s, len(g), max(seq_lens[j] for j in g), sum(seq_lens[j] - prompt_lens[j] for j in g), dtype,
                           grad=grad, attn=attn, memory_mb=memory_mb, include_weights=include_weights)["total"]
        if t > worst:
            worst, worst_b = t, len(g)
    return {"total": worst, "batch": worst_b, "batches": [len(g) for g in groups]}


def eval_run_peak_bytes(config, seq_lens: list[int], prompt_lens: list[int], *, batch_size: int = 8,
                        memory_mb: float = 2048.0, dtype="float32", attn: str = "sdpa",
                        include_weights: bool = True) -> dict:
    """Predicted peak bytes of evaluation NLL (:func:`caploc.measure.nll_sums`: eval, intervene, faithfulness) over
    samples batched as it batches them: longest first, at most ``batch_size``, within the rows' share of
    ``memory_mb`` by :func:`.formula.eval_sample_bytes`; each batch's peak adds the LM head's chunk without a backward.
    Returns ``{"total", "batch", "batches"}``."""
    s = _shape(config)
    b = budgets(memory_mb)
    per = lambda t: eval_sample_bytes(s, t, dtype, attn)  # noqa: E731
    groups = batches(seq_lens, batch_size, per, b.rows, longest_first=True)
    w = s.n_params * _elem(dtype) if include_weights else 0
    worst, worst_b = 0, 0
    for g in groups:
        t = w + len(g) * per(max(seq_lens[j] for j in g)) \
            + _head_bytes(s, sum(seq_lens[j] - prompt_lens[j] for j in g), dtype, b.head, False)
        if t > worst:
            worst, worst_b = t, len(g)
    return {"total": worst, "batch": worst_b, "batches": [len(g) for g in groups]}


def train_step_peak_bytes(config, seq_lens: list[int], prompt_lens: list[int], trainable: int, *,
                          memory_mb: float = 2048.0, dtype="float32", attn: str = "sdpa",
                          include_weights: bool = True) -> dict:
    """Predicted peak bytes of one fine-tuning step on a batch of samples (``seq_lens``, ``prompt_lens``) with
    ``trainable`` parameters: the weights, the trainable parameters' gradients and AdamW's two moments (fp32 when the
    parameters are), and the worst micro-batch (:func:`.formula.micro_batches`: the whole batch when it fits the
    rows' share of ``memory_mb``, else longest first) by :func:`.formula.train_sample_bytes` plus the
    LM head's chunk with its backward. Returns ``{"total", "optimizer", "micro_batch", "micro_batches"}``."""
    s = _shape(config)
    b = budgets(memory_mb)
    e = _elem(dtype)
    per = lambda t: train_sample_bytes(s, t, dtype, attn)  # noqa: E731
    groups = micro_batches(seq_lens, b.rows, per)
    optimizer = trainable * 3 * e  # gradient + exp_avg + exp_avg_sq
    micro = max(len(g) * per(max(seq_lens[j] for j in g))
                + _head_bytes(s, sum(seq_lens[j] - prompt_lens[j] for j in g), dtype, b.head, True) for g in groups)
    total = (s.n_params * e if include_weights else 0) + optimizer + micro
    return {"total": total, "optimizer": optimizer, "micro_batch": micro, "micro_batches": [len(g) for g in groups]}


__all__ = ["ig_sample_peak_bytes", "gxa_run_peak_bytes", "eval_run_peak_bytes", "train_step_peak_bytes"]
