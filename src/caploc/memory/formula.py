"""Peak memory of one IG micro-batch, and a planner for the number of rows that fits a device.

What the engine (``attribution/engine.py``) holds at the peak of one micro-batch of ``R`` rows (one row = one
(layer, alpha) pair of one sample) whose lowest scaled layer is ``l``: it runs ``D = L - l`` layers (the worst case,
``D = L``, is the micro-batch that holds the layer-0 rows) on a suffix of ``S`` positions after a reused prefix of
``P`` positions, scoring ``n`` positions; ``e`` = element size (2 for bf16/fp16, 4 for fp32), ``d`` = d_model,
``m`` = d_mlp, ``H`` heads of size ``hd``, ``kv`` = kv heads x hd, ``V`` = vocab:

======================  =============================================================================================
term                    bytes
======================  =============================================================================================
weights                 ``n_params * e``
sample state (batch 1)  prefix KV cache ``2 L kv P e``; recorded block outputs ``L S d e``; the clean neuron
                        activations of every layer ``L S m e``, plus fp32 copies for the ``k`` scored layers when
                        ``e < 4`` (``k S m 4``)
KV cache x rows         ``R 2 kv D (P + S) e``: each run layer concatenates the prefix (a broadcast view of the
                        batch-1 cache until then) with the rows' suffix keys/values. An upper bound: rows enter the
                        micro-batch at their own layer, so a row of layer ``l' > l`` runs only ``L - l'`` layers.
                        When the attention repeats K/V for grouped-query heads (eager attention always; SDPA when
                        there is a mask, i.e. with a prefix) the repeated copies are saved too:
                        ``R (D-1) 2 H hd (P+S) e``, and SDPA with a mask saves the mask: ``R (D-1) S (P+S) e``
saved for backward      ``R S (D-1) a`` with ``a`` bytes per token per layer (below), the final norm's input
                        ``R S d 4``, and eager attention's probabilities ``R (D-1) H S (P+S) (4 [+ e if e < 4])``
logits                  the chunked LM head (``caploc.lmhead``): one chunk of ``k`` scored positions at a time,
                        ``min(k, R n) V b`` with ``b`` = :func:`caploc.lmhead.bytes_per_logit` (logits in the
                        model's dtype, their fp32 copy, log-softmax and, in the backward, its gradients), plus the
                        gathered hidden states of the scored positions ``R n d e`` (kept for the recomputation);
                        ``k`` fills the LM-head share of the budget (:func:`budgets`), at least
                        :data:`caploc.lmhead.MIN_CHUNK` positions (a matmul-efficiency floor). Before the chunked head this
                        term was ``R n V (12 + e)``: every row's logits at once
backward transients     ``R S (2 d + 3 m) e`` (gradient buffers of one layer) and the returned neuron gradients
                        ``h R S m e`` for the ``h`` layers scaled in the micro-batch
======================  =============================================================================================

The weights are frozen, so the linear layers save nothing (the gradient w.r.t. their input needs only the weight).
Counted tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks`` on SmolLM2 (Llama block: RMSNorm, rotary
attention, gated MLP), per token per run layer, ``a`` =

* the two RMSNorm inputs, kept in fp32 (in fp32 runs they are the residual stream itself): ``2 d 4``;
* the rotated query ``d e``, and for SDPA its output ``d e`` (eager attention keeps the probabilities instead);
* gate output, act(gate) and up output (SiLU and the product save them): ``3 m e``.

The lowest run layer saves nothing before its scaled neurons (its input is a replayed, gradient-free tensor), hence
``D - 1``. GPT-2 / GPT-J / NeoX blocks (LayerNorm, GELU written as several ops, fused QKV) are not counted op by op:
they use ``a = (4 d + 6 m) e + 2 d 4`` as a conservative default.

Budgets. ``memory_mb`` (``AttributionConfig``, ``--memory-mb``) is the budget of one forward/backward beyond the
weights; :func:`budgets` splits it into the LM head's share (1/16, at most 256 MiB: the chunk size, vocabulary-aware)
and the rest, which sets the rows per IG micro-batch (:func:`engine_row_bytes`, the engine's own per-row charge) and
the samples per grad x act / activation batch (:func:`gxa_sample_bytes`). Without a ``memory_mb`` (the engine's
default), :func:`auto_budget_mb` derives one from the free memory of the model's device (on the CPU: at most 512 MB).

Whole runs: :func:`gxa_run_peak_bytes` and :func:`ig_sample_peak_bytes` batch samples / pack IG rows exactly as the
engine does (tested) and take the worst batch's peak by the terms above; :func:`bare_forward_backward_bytes` is the
plain script's peak, for comparison. The terms count tensors; a process's RSS adds the runtime (~250 MB for Python +
torch) and allocator slack. Checked against CPU peak RSS on SmolLM2-135M and random 32k / 262k-vocabulary models of its
shape by ``benchmarks/memory.py`` (docs/memory.md has the table, prediction next to measurement).

The planner reserves ``reserve_gb`` (accelerator context, allocator workspace) and uses ``safety`` of the device
(default 0.9, for allocator fragmentation). GPU peaks are not measured here (no GPU was available).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import CaplocError
from ..lmhead import bytes_per_logit, chunk_tokens, head_peak_bytes

GiB = 2**30
MiB = 2**20

_GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
_SANDWICH = {"gemma2", "gemma3_text", "gemma3"}
_QK_NORM = {"gemma3_text", "gemma3", "qwen3"}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that set the memory of attribution."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    n_params: int
    gated: bool = True
    model_type: str = "llama"
    softcap: bool = False  # final logit soft-capping (Gemma 2 / 3): two more logits-sized intermediates

    @classmethod
    def from_config(cls, config, n_params: int | None = None) -> ModelShape:
        """From a transformers config (no weights: the parameter count comes from a meta-device instance)."""
        g = lambda *names, default=None: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)
        try:
            L = int(g("num_hidden_layers", "n_layer"))
            d = int(g("hidden_size", "n_embd"))
            H = int(g("num_attention_heads", "n_head"))
        except (TypeError, ValueError):
            raise CaplocError(f"config of type {type(config).__name__} lacks layer/width/head counts; "
                              "pass a ModelShape instead") from None
        m = int(g("intermediate_size", "n_inner", default=4 * d))
        kv = int(g("num_key_value_heads", default=H))
        hd = int(g("head_dim", default=d // H))
        mt = getattr(config, "model_type", "custom")
        if n_params is None:
            n_params = count_params(config)
        return cls(L, d, m, H, kv, hd, int(config.vocab_size), int(n_params), mt in _GATED or mt == "custom", mt,
                   bool(getattr(config, "final_logit_softcapping", None)))

    @classmethod
    def from_model(cls, model) -> ModelShape:
        return cls.from_config(model.config, n_params=sum(p.numel() for p in model.parameters()))

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(config) -> int:
    """Parameters of ``AutoModelForCausalLM.from_config(config)``, built on the meta device (no memory, no download)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return int(sum(p.numel() for p in model.parameters()))  # tied weights counted once


def _shape(config) -> ModelShape:
    return config if isinstance(config, ModelShape) else ModelShape.from_config(config)


def _elem(dtype) -> int:
    if isinstance(dtype, str):
        from ..models.loading import parse_dtype

        dtype = parse_dtype(dtype)
    return torch.empty((), dtype=dtype).element_size()


#: the help of every stage's ``memory_mb`` setting (evaluation, interventions, faithfulness, fine-tuning)
MEMORY_HELP = ("Budget of one forward (and backward) beyond the weights, MB: caps the samples per batch and sizes the "
               "LM-head chunks; default: from free memory (on a CPU at most 512 MB).")

#: the LM head's share of a budget, and its cap (larger chunks do not make the head faster)
HEAD_SHARE = 1 / 16
HEAD_CAP = 256 * MiB


@dataclass(frozen=True)
class Budgets:
    """A forward/backward's budget (bytes beyond the weights), split into the LM head's chunk and the rest."""

    total: float
    head: float  # one LM-head chunk (caploc.lmhead budget_bytes)
    rows: float  # IG rows of a micro-batch / samples of a grad x act batch

    @property
    def memory_mb(self) -> float:
        return self.total / MiB


def budgets(memory_mb: float) -> Budgets:
    """Split ``memory_mb`` into the LM head's share (:data:`HEAD_SHARE`, at most :data:`HEAD_CAP`) and the rest."""
    if not memory_mb or memory_mb <= 0:
        raise CaplocError(f"memory_mb must be positive, got {memory_mb!r}")
    total = float(memory_mb) * MiB
    head = min(total * HEAD_SHARE, HEAD_CAP)
    return Budgets(total, head, total - head)

def _mem_available() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


#: on the CPU an automatic budget is at most this: measured on SmolLM2-135M (benchmarks/memory.py, docs/memory.md),
#: exact IG under 512 MB runs as fast as under 2048 MB (a CPU gains nothing from larger micro-batches) and peaks at
#: about 1.5x a bare forward + backward instead of 2.7x
CPU_AUTO_CAP_MB = 512.0


def auto_budget_mb(model, *, reserve_gb: float = 1.0, safety: float = 0.9) -> float:
    """A ``memory_mb`` from free memory: on an accelerator ``safety`` x free - ``reserve_gb`` (the weights are already
    resident), on the CPU half of ``MemAvailable`` up to :data:`CPU_AUTO_CAP_MB`; at least 64 MB."""
    dev = next(model.parameters()).device
    if dev.type not in ("cpu", "meta"):
        free, _total = torch.accelerator.get_memory_info(dev)
        mb = (free * safety - reserve_gb * GiB) / MiB
    else:
        avail = _mem_available()
        mb = CPU_AUTO_CAP_MB if avail is None else min(CPU_AUTO_CAP_MB, avail / 2 / MiB)
    return max(64.0, float(mb))


def model_budgets(model, memory_mb: float | None) -> Budgets:
    """A run's :class:`Budgets` (attribution, evaluation, fine-tuning): from ``memory_mb``, or from
    :func:`auto_budget_mb` when it is None."""
    return budgets(auto_budget_mb(model) if memory_mb is None else memory_mb)


def activation_bytes_per_token_layer(shape: ModelShape, dtype="float32", attn: str = "sdpa") -> int:
    """Bytes saved for backward per row, per token, per run layer above the lowest (``a`` in the module docstring)."""
    e = _elem(dtype)
    d, m = shape.d_model, shape.d_mlp
    # Gemma 2/3 norm after attention and after the MLP too (two more fp32 norm inputs); Gemma 3 and Qwen 3 normalize
    # each query and key head (their fp32 inputs)
    extra = (2 * d * 4 if shape.model_type in _SANDWICH else 0) \
        + ((shape.n_heads + shape.n_kv_heads) * shape.head_dim * 4 if shape.model_type in _QK_NORM else 0)
    if shape.gated:
        return 2 * d * 4 + (2 if attn == "sdpa" else 1) * d * e + 3 * m * e + extra
    return 2 * d * 4 + (4 * d + 6 * m) * e + extra


def ig_peak_bytes(config, rows: int, suffix_len: int, prefix_len: int = 0, dtype="float32", *,
                  n_scored: int | None = None, depth: int | None = None, scaled_layers: int | None = None,
                  scored_layers: int | None = None, attn: str = "sdpa", include_weights: bool = True,
                  memory_mb: float = 2048.0) -> dict:
    """Predicted peak bytes of one IG micro-batch, by term (see the module docstring). ``depth`` = layers run by the
    micro-batch (default all: the worst case), or a list of each row's depth (rows enter at their own layer);
    ``n_scored`` = scored positions (default ``suffix_len``);
    ``scaled_layers`` = distinct layers scaled in the micro-batch (default ``ceil(rows / 20)``, 20 IG steps);
    ``scored_layers`` = layers the sample is scored on (``AttributionConfig.layers``; default all); ``memory_mb``
    = the engine's budget, whose LM-head share sets the head's chunk."""
    s = _shape(config)
    if rows < 1 or suffix_len < 1 or prefix_len < 0:
        raise CaplocError(f"rows and suffix_len must be >= 1 and prefix_len >= 0 (got {rows}, {suffix_len}, {prefix_len})")
    if attn not in ("sdpa", "eager"):
        raise CaplocError(f"attn must be sdpa or eager, got {attn!r}")
    e = _elem(dtype)
    L, d, m, H, hd = s.n_layers, s.d_model, s.d_mlp, s.n_heads, s.head_dim
    kv = s.n_kv_heads * hd
    S, P, R = int(suffix_len), int(prefix_len), int(rows)
    Ds = [max(1, min(int(x), L)) for x in depth] if isinstance(depth, (list, tuple)) else \
        [L if depth is None else max(1, min(int(depth), L))] * R
    if len(Ds) != R:
        raise CaplocError(f"{len(Ds)} row depths for {R} rows")
    RD, RD1 = sum(Ds), sum(x - 1 for x in Ds)  # R D and R (D - 1), summed row by row
    n = S if n_scored is None else int(n_scored)
    h = max(1, math.ceil(R / 20)) if scaled_layers is None else int(scaled_layers)
    k = L if scored_layers is None else max(1, min(int(scored_layers), L))
    K = P + S  # key length
    repeat = s.n_kv_heads < H and (attn == "eager" or P > 0)
    attn_extra = 0
    if repeat:
        attn_extra += RD1 * 2 * H * hd * K * e
    if attn == "sdpa" and P > 0:
        attn_extra += RD1 * S * K * e  # the mask, saved per layer
    if attn == "eager":
        attn_extra += RD1 * H * S * K * (4 + (e if e < 4 else 0))
    terms = {
        "weights": s.n_params * e if include_weights else 0,
        "sample_state": 2 * L * kv * P * e + L * S * d * e + L * S * m * e + (k * S * m * 4 if e < 4 else 0),
        "kv_cache": 2 * kv * RD * (P + S) * e,
        "saved_activations": S * RD1 * activation_bytes_per_token_layer(s, dtype, attn) + R * S * d * 4
        + attn_extra,
        "logits": _head_bytes(s, R * n, dtype, budgets(memory_mb).head, grad=True),
        "backward_transients": R * S * (2 * d + 3 * m) * e + h * R * S * m * e,
    }
    terms["total"] = sum(terms.values())
    return terms


def _head_bytes(s: ModelShape, n_tokens: int, dtype, head_budget: float, grad: bool) -> int:
    """The chunked LM head: one chunk of logits, plus the gathered hidden states and log-probs of every scored token."""
    dt = dtype if isinstance(dtype, torch.dtype) else _dtype(dtype)
    return (head_peak_bytes(s.vocab, n_tokens, head_budget, dt, grad, s.softcap)
            + n_tokens * (s.d_model * _elem(dtype) + 8))


def _dtype(name) -> torch.dtype:
    from ..models.loading import parse_dtype

    return parse_dtype(name)


def engine_row_bytes(shape: ModelShape, suffix_len: int, n_scored: int, dtype="float32", depth: int | None = None,
                     prefix_len: int = 0, grad: bool = True) -> int:
    """What the engine charges one IG row against the rows' share of ``memory_mb`` (:func:`budgets`): per token and
    run layer ``12 d + 4 m`` elements plus the attention over ``prefix + suffix`` keys (forward only: one layer's
    worth), its copy of the prefix's keys/values in those layers, and its scored positions' hidden states for the
    chunked LM head (no longer their logits: the head's chunk is budgeted apart)."""
    e = _elem(dtype)
    D = shape.n_layers if depth is None else depth
    per_layer = 12 * shape.d_model + 4 * shape.d_mlp + 2 * shape.n_heads * (prefix_len + suffix_len)
    return (suffix_len * (D if grad else 1) * per_layer + 2 * prefix_len * shape.d_model * D) * e \
        + n_scored * (shape.d_model * e + 8)


def gxa_sample_bytes(shape: ModelShape, seq_len: int, dtype="float32", grad: bool = True, attn: str = "sdpa") -> int:
    """Bytes one sample of ``seq_len`` tokens costs a grad x act (``grad``) or activation batch, beyond the LM head's
    chunk: what autograd saves in every layer (:func:`activation_bytes_per_token_layer`, the final norm's input),
    the captured neuron activations of every layer, and the returned gradients (one per layer) at the end of the
    backward; grouped-query attention saves its repeated keys/values (SDPA with the padding mask, eager always),
    eager attention also its probabilities. Forward only: one layer's transients and the captures."""
    e = _elem(dtype)
    L, d, m, T = shape.n_layers, shape.d_model, shape.d_mlp, int(seq_len)
    capt = L * T * m * e
    if not grad:
        return capt + T * (4 * d + 3 * m) * e + (shape.n_heads * T * T * 4 if attn == "eager" else 0)
    saved = T * L * activation_bytes_per_token_layer(shape, dtype, attn) + T * d * 4
    if shape.n_kv_heads < shape.n_heads:  # grouped-query K/V repeated for the attention (a padded batch has a mask)
        saved += T * L * 2 * shape.n_heads * shape.head_dim * e
    if attn == "eager":
        saved += L * shape.n_heads * T * T * (4 + (e if e < 4 else 0))
    return saved + 2 * capt + T * (2 * d + 3 * m) * e


def fit_count(lengths, start: int, cap: int, sample_bytes, budget: float) -> int:
    """How many items from ``start`` (at most ``cap``) form one batch: padded to the longest of them, ``n`` samples
    cost ``n * sample_bytes(T)``, which must stay within ``budget`` bytes. At least 1 (an item that does not fit alone
    runs alone). The one batching rule of grad x act / activation, evaluation and fine-tuning micro-batches."""
    n, T = 0, 0
    while start + n < len(lengths) and n < cap:
        T_new = max(T, int(lengths[start + n]))
        if n > 0 and (n + 1) * sample_bytes(T_new) > budget:
            break
        n, T = n + 1, T_new
    return max(n, 1)


def batches(lengths, cap: int, sample_bytes, budget: float, *, longest_first: bool = False) -> list[list[int]]:
    """Indices of ``lengths`` grouped into consecutive batches by :func:`fit_count`, in the given order or longest
    first (stable: equal lengths keep their order; less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if longest_first else list(range(len(lengths)))
    lens = [lengths[i] for i in order]
    out, start = [], 0
    while start < len(order):
        k = fit_count(lens, start, cap, sample_bytes, budget)
        out.append(order[start:start + k])
        start += k
    return out


def micro_batches(lengths, budget: float, sample_bytes) -> list[list[int]]:
    """One training batch's samples (their ``lengths``) grouped into micro-batches that fit ``budget`` bytes: the
    whole batch in its own order when it fits (the same sums as one batch), else :func:`batches` longest first."""
    n = len(lengths)
    if fit_count(lengths, 0, n, sample_bytes, budget) == n:
        return [list(range(n))]
    return batches(lengths, n, sample_bytes, budget, longest_first=True)


def eval_sample_bytes(shape: ModelShape, seq_len: int, dtype="float32", attn: str = "sdpa") -> int:
    """Bytes one sample of ``seq_len`` tokens costs a no-grad forward (evaluation NLL, interventions), beyond the LM
    head's chunk: the residual stream, the block's input / norm output / attention output (``4 d``), one MLP's
    three ``m``-wide intermediates, the keys/values (grouped-query ones repeated for the attention) and the padding
    mask; eager attention its probabilities. No KV cache is kept (``use_cache=False``)."""
    e = _elem(dtype)
    d, m, T = shape.d_model, shape.d_mlp, int(seq_len)
    kv = 2 * shape.n_heads * shape.head_dim
    attn_b = shape.n_heads * T * T * 4 if attn == "eager" else T * T * e
    return T * (4 * d + 3 * m + kv) * e + attn_b


def train_sample_bytes(shape: ModelShape, seq_len: int, dtype="float32", attn: str = "sdpa") -> int:
    """Bytes one sample of ``seq_len`` tokens costs a fine-tuning step's forward + backward, beyond the LM head's
    chunk: what autograd saves when parameters inside every layer train (:func:`activation_bytes_per_token_layer`
    plus the inputs the trained linear maps save: the normed block input, the attention output, the normed MLP
    input and the neurons, ``(3 d + m) e``), grouped-query K/V repeated, eager attention's probabilities, the final
    norm's input, and one layer's gradient buffers in the backward."""
    e = _elem(dtype)
    L, d, m, T = shape.n_layers, shape.d_model, shape.d_mlp, int(seq_len)
    per = activation_bytes_per_token_layer(shape, dtype, attn) + (3 * d + m) * e
    saved = T * L * per + T * d * 4
    if shape.n_kv_heads < shape.n_heads:
        saved += T * L * 2 * shape.n_heads * shape.head_dim * e
    if attn == "eager":
        saved += L * shape.n_heads * T * T * (4 + (e if e < 4 else 0))
    return saved + T * (2 * d + 3 * m) * e


def gxa_peak_bytes(config, batch: int, seq_len: int, n_scored: int | None = None, dtype="float32", *,
                   grad: bool = True, attn: str = "sdpa", memory_mb: float = 2048.0,
                   include_weights: bool = True) -> dict:
    """Predicted peak bytes of one grad x act (or activation) batch of ``batch`` samples padded to ``seq_len``
    tokens with ``n_scored`` scored positions in all (default: every position), by term."""
    s = _shape(config)
    n = batch * seq_len if n_scored is None else int(n_scored)
    terms = {"weights": s.n_params * _elem(dtype) if include_weights else 0,
             "samples": batch * gxa_sample_bytes(s, seq_len, dtype, grad, attn),
             "logits": _head_bytes(s, n, dtype, budgets(memory_mb).head, grad)}
    terms["total"] = sum(terms.values())
    return terms


def bare_forward_backward_bytes(config, seq_len: int, n_scored: int | None = None, dtype="float32", *,
                                attn: str = "sdpa", include_weights: bool = True) -> dict:
    """Peak of the plain script: one sample's forward with the model's full logits, log-softmax, backward to the
    input embeddings (weights frozen): every layer's saved tensors and the ``T x V`` logits, their fp32
    log-softmax and gradients (``T V (12 + e)``)."""
    s = _shape(config)
    e = _elem(dtype)
    T = int(seq_len)
    saved = T * s.n_layers * activation_bytes_per_token_layer(s, dtype, attn) + T * s.d_model * 4
    terms = {"weights": s.n_params * e if include_weights else 0, "saved_activations": saved,
             "logits": T * s.vocab * (12 + e), "backward_transients": T * (2 * s.d_model + 3 * s.d_mlp) * e}
    terms["total"] = sum(terms.values())
    return terms


__all__ = ['ModelShape', 'count_params', 'Budgets', 'budgets', 'auto_budget_mb', 'model_budgets', 'activation_bytes_per_token_layer', 'ig_peak_bytes', 'engine_row_bytes', 'fit_count', 'batches', 'micro_batches', 'gxa_sample_bytes', 'eval_sample_bytes', 'train_sample_bytes', 'gxa_peak_bytes', 'bare_forward_backward_bytes', 'MEMORY_HELP', 'HEAD_SHARE', 'HEAD_CAP', 'CPU_AUTO_CAP_MB', 'GiB', 'MiB', 'chunk_tokens', 'bytes_per_logit']
