"""Target-token log-probabilities from final hidden states, without the ``[batch, tokens, vocab]`` logits.

Scoring a token needs one log-probability, ``log softmax(logits)[target]``, but ``model(...).logits`` materializes
``vocab`` floats for every position (and its log-softmax and their gradients): 4 bytes x 262k per position for
Gemma 3. Here only the *scored* positions are gathered from the final hidden states, and the LM head + log-softmax run
over chunks of them, each chunk sized from a memory budget and the vocabulary (:func:`chunk_tokens`), so at most one
chunk of logits exists at a time -- in the forward and, with gradients, in the backward too.

The head after the last hidden state, for every architecture caploc supports (``models/tiny.py``'s 11): the final
norm is inside the base model (``model.base_model(...).last_hidden_state`` is already normalised), then the output
embeddings (``model.get_output_embeddings()``: tied or not, with a bias for GPT-J), called *as a module* (so
accelerate's device hooks and the model's dtype apply), then the model's own logit post-processing, read from its
config: ``logit_scale`` (Cohere: multiplied), ``logits_scaling`` (Granite: divided), ``final_logit_softcapping``
(Gemma 2 / 3: ``cap * tanh(z / cap)``). :func:`resolve_head` checks this once per model against the model's own
forward on a short probe; a model whose head it cannot reproduce (or that has no separate base model, such as a
hand-written toy) is scored through its own logits, restricted to the scored positions where they are the last ones
(``logits_to_keep``) -- the path every caller had before.

Gradients: each chunk runs under ``torch.utils.checkpoint`` (non-reentrant). The forward keeps only each chunk's
input hidden states; the backward recomputes one chunk's logits at a time, so it does not hold all chunks' logits
either. Chosen over a hand-written autograd function because the head is called as a module: tied weights, the
bias, weight gradients (fine-tuning), device hooks and the post-processing's derivative all come from autograd. The
price is one extra LM-head matmul per chunk in the backward.

Numbers: the same operations in the same order and dtype as the model's forward followed by
``log_softmax(logits.float())`` and a gather, so values match the plain computation to float rounding (the
chunked matmul may round differently from the full one; tests: <= 1e-6 relative, values and gradients, on all 11
tiny architectures).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

MiB = 2**20
#: LM-head budget when none is given: the logits of one chunk (forward and backward) stay under this many bytes
DEFAULT_BUDGET = 128 * MiB
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Head:
    """A causal LM's output head: the output-embedding module and the logit post-processing of its forward."""

    module: nn.Module  # model.get_output_embeddings()
    vocab: int
    multiplier: float | None = None  # config.logit_scale (Cohere)
    divisor: float | None = None  # config.logits_scaling (Granite)
    softcap: float | None = None  # config.final_logit_softcapping (Gemma 2 / 3)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., d] -> [..., vocab]`` exactly as the model's forward computes its logits from final hidden states."""
        z = self.module(h)
        if self.multiplier is not None:
            z = z * self.multiplier
        if self.divisor is not None:
            z = z / self.divisor
        if self.softcap is not None:
            z = z / self.softcap
            z = torch.tanh(z)
            z = z * self.softcap
        return z

    @property
    def dtype(self) -> torch.dtype:
        w = getattr(self.module, "weight", None)
        return w.dtype if torch.is_tensor(w) else torch.float32


def unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside a PEFT wrapper (its adapter layers are injected in place, so its forward includes them);
    any other model as it is."""
    get = getattr(model, "get_base_model", None)
    inner = get() if callable(get) else None
    return inner if isinstance(inner, nn.Module) else model


def head_of(model: nn.Module) -> Head | None:
    """The :class:`Head` of a Hugging Face causal LM, or None if it has no separate base model / output embeddings."""
    base = getattr(model, "base_model", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if base is None or base is model or get_out is None:
        return None
    module = get_out()
    weight = getattr(module, "weight", None)
    if module is None or not torch.is_tensor(weight) or weight.dim() != 2:
        return None
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def num(name):
        v = getattr(cfg, name, None)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v else None

    return Head(module, int(weight.shape[0]), num("logit_scale"), num("logits_scaling"),
                num("final_logit_softcapping"))


_VERIFIED: weakref.WeakKeyDictionary[nn.Module, Head | None] = weakref.WeakKeyDictionary()


def verify_head(model: nn.Module, head: Head, tol: float = 1e-4) -> bool:
    """True if ``head`` applied to the base model's last hidden state gives the model's own logits (a 4-token probe)."""
    dev = model.get_input_embeddings().weight.device
    ids = torch.arange(4, device=dev)[None] % head.vocab
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        hidden = getattr(model.base_model(input_ids=ids), "last_hidden_state", None)
        if hidden is None:  # a wrapper whose "base model" is not the transformer body
            return False
        got = head.logits(hidden).float()
    if got.shape != want.shape:
        return False
    scale = tol * (1.0 + float(want.abs().max()))
    return bool((got.to(want.device) - want).abs().max() <= scale)


def resolve_head(model: nn.Module) -> Head | None:
    """:func:`head_of`, checked once per model by :func:`verify_head` (None: score through the model's own logits)."""
    try:
        return _VERIFIED[model]
    except (KeyError, TypeError):
        pass
    head = head_of(model)
    if head is not None and not verify_head(model, head):
        log.warning("%s: the LM head after the last hidden state is not the output embeddings plus a known logit "
                    "post-processing; scoring through the model's full logits (more memory)", type(model).__name__)
        head = None
    try:
        _VERIFIED[model] = head
    except TypeError:  # pragma: no cover - a model that cannot be weakly referenced: not cached
        pass
    return head


# --------------------------------------------------------------------------------------------------------------------
# memory: bytes per logit, chunk sizes
# --------------------------------------------------------------------------------------------------------------------
def bytes_per_logit(dtype: torch.dtype = torch.float32, grad: bool = True, softcap: bool = False) -> int:
    """Bytes one chunk holds per (position, vocabulary entry) at its peak: the logits in the head's dtype (and the
    soft-cap's two intermediates), their fp32 copy and log-softmax; with a backward also the log-softmax's gradient,
    the fp32 logits' gradient and its cast back to the head's dtype."""
    e = torch.empty((), dtype=dtype).element_size()
    fwd = e * (3 if softcap else 1) + (4 if e < 4 else 0) + 4
    return fwd + (8 + (e if e < 4 else 0) if grad else 0)


#: fewest positions per chunk, whatever the budget: below this the head's matmul reads the whole ``[vocab, d]`` weight
#: for a few rows and becomes memory-bound (CPU, 262k x 576 head, 256 positions forward + backward: 33 s in chunks of
#: 8, 15 s of 32, 12 s of 128). It costs ``32 V b`` bytes: 134 MB for a 262k vocabulary in fp32.
MIN_CHUNK = 32


def chunk_tokens(vocab: int, budget_bytes: float = DEFAULT_BUDGET, dtype: torch.dtype = torch.float32,
                 grad: bool = True, softcap: bool = False) -> int:
    """Scored positions per LM-head chunk under ``budget_bytes``, at least :data:`MIN_CHUNK`."""
    return max(MIN_CHUNK, 1, int(budget_bytes // (vocab * bytes_per_logit(dtype, grad, softcap))))


def head_peak_bytes(vocab: int, n_tokens: int, budget_bytes: float = DEFAULT_BUDGET,
                    dtype: torch.dtype = torch.float32, grad: bool = True, softcap: bool = False) -> int:
    """Peak bytes of the chunked head for ``n_tokens`` scored positions: one chunk's logits (the rest is O(tokens))."""
    k = min(max(1, n_tokens), chunk_tokens(vocab, budget_bytes, dtype, grad, softcap))
    return k * vocab * bytes_per_logit(dtype, grad, softcap)


# --------------------------------------------------------------------------------------------------------------------
# the primitive
# --------------------------------------------------------------------------------------------------------------------
def _chunk_logprobs(head: Head, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # one contiguous [positions, d] matrix: a strided [rows, cols, d] slice makes the matmul fall back to one
    # matrix-vector product per row, each reading the whole [vocab, d] weight (12x slower on a 262k head)
    z = head.logits(h.reshape(-1, h.shape[-1])).float()
    lp = torch.log_softmax(z, dim=-1).gather(-1, t.reshape(-1, 1).to(z.device))
    return lp.reshape(t.shape)


def _tiled(head: Head, h: torch.Tensor, t: torch.Tensor, k: int, grad: bool) -> torch.Tensor:
    """``h [B, n, d]``, ``t [B, n]`` -> ``[B, n]`` in tiles of at most ``k`` positions (rows first kept whole)."""
    B, n = t.shape
    rb = min(B, k)
    c = max(1, k // rb)
    rows = []
    for r0 in range(0, B, rb):
        cols = []
        for c0 in range(0, n, c):
            hc, tc = h[r0 : r0 + rb, c0 : c0 + c], t[r0 : r0 + rb, c0 : c0 + c]
            if grad:
                cols.append(checkpoint(_chunk_logprobs, head, hc, tc, use_reentrant=False, preserve_rng_state=False))
            else:
                cols.append(_chunk_logprobs(head, hc, tc))
        rows.append(cols[0] if len(cols) == 1 else torch.cat(cols, 1))
    return rows[0] if len(rows) == 1 else torch.cat(rows, 0)


def _gather(hidden: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        return hidden
    positions = positions.to(hidden.device)
    if positions.dim() == 1:
        return hidden[:, positions]
    return torch.take_along_dim(hidden, positions[:, :, None], dim=1)


def head_logprobs(head: Head, hidden: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None, *,
                  budget_bytes: float | None = None, chunk: int | None = None,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Log-probabilities ``[B, n]`` (float32) of ``targets`` predicted from final hidden states ``hidden [B, T, d]``.

    ``positions``: None (``n == T``: ``targets[b, t]`` is predicted at position ``t``), ``[n]`` (the same positions
    in every row) or ``[B, n]`` (per row). ``targets``: ``[B, n]``, or ``[n]`` shared by the rows; entries equal to
    ``ignore_index`` give 0 (each row's scored entries are packed first, so they cost little). Chunks hold at most ``chunk`` positions, default as many as fit
    ``budget_bytes`` (default :data:`DEFAULT_BUDGET`) for this vocabulary. Differentiable w.r.t. ``hidden`` (and the
    head's weights if they require grad), one chunk of logits at a time.
    """
    h = _gather(hidden, positions)
    B, n = h.shape[0], h.shape[1]
    t = targets.to(h.device)
    t = t[None].expand(B, n) if t.dim() == 1 else t
    if tuple(t.shape) != (B, n):
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match {n} scored positions of {B} rows")
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.module.parameters()))
    k = chunk or chunk_tokens(head.vocab, DEFAULT_BUDGET if budget_bytes is None else budget_bytes, head.dtype, grad,
                              head.softcap is not None)
    keep = t != ignore_index
    if bool(keep.all()):
        return _tiled(head, h, t, k, grad)
    # each row's scored entries packed to the left (rows stay rows), the rest cut off or masked
    n_keep = int(keep.sum(1).max())
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n_keep]
    valid = torch.take_along_dim(keep, idx, dim=1)
    h_c = torch.take_along_dim(h, idx[:, :, None], dim=1)
    t_c = torch.where(valid, torch.take_along_dim(t, idx, dim=1), 0)
    out = torch.zeros(B, n, dtype=torch.float32, device=h.device)
    if n_keep:
        lp = _tiled(head, h_c, t_c, k, grad).to(out.device)
        out = out.scatter(1, idx.to(out.device), torch.where(valid.to(out.device), lp, 0.0))
    return out


def keep_arg(positions: torch.Tensor, seq_len: int):
    """``logits_to_keep`` for scored ``positions [n]`` of a ``seq_len``-token input: the integer n when they are the
    last n positions in order (no index tensor that would have to follow the hidden states onto the last device of a
    split model), else the index tensor itself."""
    n = int(positions.numel())
    if n and int(positions[0]) == seq_len - n and bool(
            (positions == torch.arange(seq_len - n, seq_len, device=positions.device)).all()):
        return n
    return positions


def model_logprobs(model: nn.Module, targets: torch.Tensor, positions: torch.Tensor | None = None, *,
                   budget_bytes: float | None = None, chunk: int | None = None, ignore_index: int = IGNORE_INDEX,
                   **inputs) -> torch.Tensor:
    """Run ``model(**inputs)`` and return the log-probabilities ``[B, n]`` of ``targets`` at ``positions`` (as in
    :func:`head_logprobs`), through the base model and the chunked head when :func:`resolve_head` knows the model's
    head, else through the model's own logits (``logits_to_keep`` = the scored positions when they are shared)."""
    model = unwrap(model)
    head = resolve_head(model)
    if head is not None:
        hidden = model.base_model(**inputs).last_hidden_state
        return head_logprobs(head, hidden, targets, positions, budget_bytes=budget_bytes, chunk=chunk,
                             ignore_index=ignore_index)
    ids = inputs.get("input_ids")
    if positions is not None and positions.dim() == 1 and ids is not None:
        logits = model(**inputs, logits_to_keep=keep_arg(positions, ids.shape[1])).logits
        positions = None
    else:
        logits = model(**inputs).logits
    lp_all = torch.log_softmax(_gather(logits, positions).float(), dim=-1)
    B, n = lp_all.shape[:2]
    t = targets.to(lp_all.device)
    t = t[None].expand(B, n) if t.dim() == 1 else t
    keep = t != ignore_index
    lp = lp_all.gather(-1, torch.where(keep, t, 0)[..., None]).squeeze(-1)
    return torch.where(keep, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))


def first_target_prob(logprobs: torch.Tensor) -> torch.Tensor:
    """KN-mode objective: the probability of the first scored target token of each row, ``[B, n] -> [B]``."""
    return logprobs[:, 0].exp()


# --------------------------------------------------------------------------------------------------------------------
# one function per use: evaluation NLL, the fine-tuning loss, next-token probabilities (audit, tracing)
# --------------------------------------------------------------------------------------------------------------------
def target_logprobs(model: nn.Module, input_ids: torch.Tensor, target_mask: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, *, budget_bytes: float | None = None,
                    **inputs) -> torch.Tensor:
    """Teacher-forced log-probabilities ``[B, T - 1]`` (float32): entry ``t`` is ``log p(input_ids[:, t + 1])``
    predicted at position ``t`` where ``target_mask[:, t + 1]`` (and ``attention_mask[:, t + 1]``) is set, else 0.
    The model runs once on ``input_ids`` (with ``attention_mask`` and ``inputs``); only the target positions go
    through the LM head, a chunk at a time."""
    ids = input_ids
    keep = target_mask[:, 1:].bool()
    if attention_mask is not None:
        keep = keep & attention_mask[:, 1:].to(keep.device).bool()
    keep = keep.to(ids.device)
    # targets aligned with the positions that predict them; the last position predicts nothing
    tgt = torch.full_like(ids, IGNORE_INDEX)
    tgt[:, :-1] = torch.where(keep, ids[:, 1:], IGNORE_INDEX)
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    lp = model_logprobs(model, tgt, None, budget_bytes=budget_bytes, input_ids=ids, **inputs)
    return lp[:, :-1]


def row_nll(model: nn.Module, input_ids: torch.Tensor, target_mask: torch.Tensor,
            attention_mask: torch.Tensor | None = None, *, budget_bytes: float | None = None,
            **inputs) -> torch.Tensor:
    """Summed target NLL of each row, ``[B]`` float64 (float32 log-probabilities summed in float64): evaluation."""
    return -target_logprobs(model, input_ids, target_mask, attention_mask, budget_bytes=budget_bytes,
                            **inputs).double().sum(1)


def batch_nll(model: nn.Module, batch, *, budget_bytes: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-tuning loss terms of a collated batch (``input_ids``, ``attention_mask``, ``target_mask`` [B, T]): the
    summed NLL (float32 scalar, differentiable w.r.t. every parameter that requires grad, the LM head's included)
    and the number of target tokens -- what ``cross_entropy(logits[:, :-1][mask], labels[mask], reduction="sum")``
    gives, without the ``[B, T, V]`` logits."""
    lp = target_logprobs(model, batch["input_ids"], batch["target_mask"], batch["attention_mask"],
                         budget_bytes=budget_bytes, use_cache=False)
    n = (batch["target_mask"][:, 1:].bool() & batch["attention_mask"][:, 1:].bool()).sum()
    return -lp.sum(), n


def position_logits(model: nn.Module, positions: torch.Tensor | None = None, **inputs) -> torch.Tensor:
    """Full-vocabulary logits ``[B, V]`` (float32) at one position per row (``positions [B]``; None: the last one):
    the LM head runs on those ``B`` hidden states only (for ranks over the vocabulary)."""
    model = unwrap(model)
    head = resolve_head(model)
    if head is not None:
        h = model.base_model(**inputs).last_hidden_state
        if positions is None:
            h = h[:, -1]
        else:
            h = h[torch.arange(h.shape[0], device=h.device), positions.to(h.device)]
        return head.logits(h).float()
    if positions is None:
        return model(**inputs, logits_to_keep=1).logits[:, -1].float()
    logits = model(**inputs).logits
    return logits[torch.arange(logits.shape[0], device=logits.device), positions.to(logits.device)].float()


def position_probs(model: nn.Module, targets: torch.Tensor | int, positions: torch.Tensor | None = None, *,
                   budget_bytes: float | None = None, **inputs) -> torch.Tensor:
    """Next-token probabilities ``[B]`` (float32) of ``targets`` (``[B]``, or one id for every row) at one position
    per row (``positions [B]``; None: the last position of every row): audit and causal tracing."""
    B = next(v for k, v in inputs.items() if k in ("input_ids", "inputs_embeds")).shape[0]
    t = torch.as_tensor(targets, dtype=torch.long)
    t = t.reshape(1).expand(B) if t.dim() == 0 else t
    if positions is None:
        T = inputs["input_ids"].shape[1] if "input_ids" in inputs else inputs["inputs_embeds"].shape[1]
        pos = torch.tensor([T - 1])
    else:
        pos = positions.reshape(B, 1)
    return model_logprobs(model, t[:, None], pos, budget_bytes=budget_bytes, **inputs)[:, 0].exp()


__all__ = ["Head", "head_of", "verify_head", "resolve_head", "bytes_per_logit", "chunk_tokens", "head_peak_bytes",
           "head_logprobs", "model_logprobs", "keep_arg", "first_target_prob",
           "target_logprobs", "row_nll", "batch_nll", "position_logits", "position_probs", "DEFAULT_BUDGET", "IGNORE_INDEX", "MIN_CHUNK"]
