"""Neuron attribution: exact per-layer KN-style integrated gradients, gradient×activation, and activation.

Integrated gradients (Dai et al. 2022, "Knowledge Neurons"), per layer and exact: for layer ``l`` the neuron vector
``a`` at the *scaled positions* is replaced by ``alpha * a`` (all other layers run normally) and

    Attr(l, i) = sum_{p in scaled} a[p, i] * sum_k w_k * d f / d x[p, i] |_{x = alpha_k a}

with Riemann points ``alpha_k`` and weights ``w_k`` (``right``: alpha = k/m, w = 1/m — the default, DESIGN.md §1;
``linspace``: alpha = linspace(0, 1, m), w = 1/m — what the knowledge-neurons package does; ``midpoint``:
alpha = (k - 1/2)/m). The completeness gap ``sum_i Attr(l, i) - (f(a) - f(0))`` is reported per layer.

Objective ``f``: ``logprob`` = sum of the target tokens' log-probabilities, teacher-forced; ``prob`` (KN-compatible
mode) = probability of the first target token at the last prompt position.

What makes it fast while giving the same numbers as the plain loop (each is checked in the tests against a slow
reference written there):

* **Causal reuse.** Positions before the first scaled position never see the scaling, so their keys/values are
  computed once (the model's own KV cache) and every IG row runs only the suffix that starts at the first scaled
  position (KN mode: one token).
* **Layer skipping, row by row.** A row that scales layer ``l`` computes layers ``< l`` exactly as the clean run did;
  those block outputs are recorded once. Inside a micro-batch the rows are ordered by layer and block ``j`` runs only
  the rows whose layer is ``<= j``; a row *enters* the batch at its own layer from the recorded clean input of that
  block. So a row only runs layers ``l..L-1``, its backward stops at ``l``, and no row recomputes a layer it shares
  with the clean run -- while rows of all layers still share one forward/backward (large matmuls).
* **(layer, step) batching.** Rows (one per layer and IG step) are sorted by layer from the top and packed into
  micro-batches under a memory budget; each row scales its own layer inside one shared forward/backward.
* **The alpha = 1 point is the clean run.** Its gradient at every layer comes from one backward of the clean forward
  (as in grad x activation) instead of one row per layer; rows with weight 0 (the alpha = 0 completeness rows) run
  forward only, without a backward.
* **LM head only where scored, in chunks** (``caploc.lmhead``): the final hidden states of the scored positions go
  through the LM head and log-softmax a chunk of positions at a time (checkpointed, so the backward too holds one
  chunk's logits), the chunk sized from ``memory_mb`` and the vocabulary; parameters frozen (no weight gradients).

Every sample is guarded: one forward-only alpha = 1 row entering at a middle layer must reproduce the clean objective;
if not (an architecture whose blocks do not behave as assumed), the sample is recomputed without reuse and a warning is
logged.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field, replace

import torch

from ..blocks import rows_cache, staggered_blocks
from ..config import check, setting
from ..data import collate, pad_id
from ..errors import CaplocError, DataError
from ..hooks import frozen, neuron_hooks
from ..lmhead import IGNORE_INDEX, first_target_prob, model_logprobs
from ..memory import ModelShape, engine_row_bytes, fit_count, gxa_sample_bytes, model_budgets
from ..models.layouts import Site

log = logging.getLogger(__name__)

METHODS = ("ig", "grad_x_act", "activation")
ALPHAS = ("right", "linspace", "midpoint")
OBJECTIVES = ("logprob", "prob")
POSITIONS = ("all", "target", "last")


@dataclass
class AttributionConfig:
    """How to score neurons. Validated on construction (bad values raise a one-line CaplocError)."""

    method: str = setting("grad_x_act", choices=METHODS, help="ig (exact per-layer integrated gradients, the paper's; "
                          "about steps x layers forward+backward passes per sample) | grad_x_act (one pass per sample, "
                          "the CPU default) | activation.")
    steps: int = setting(20, min=1, help="IG Riemann steps m (paper: 20).")
    alphas: str = setting("right", choices=ALPHAS, help="IG points: right (k/m) | linspace (knowledge-neurons) | "
                          "midpoint.")
    objective: str = setting("logprob", choices=OBJECTIVES, help="logprob (sum of target log-probs) | prob (KN: "
                             "p(first target token)).")
    positions: str = setting("all", choices=POSITIONS, help="Scaled / scored positions: all | target | last (last "
                             "prompt token).")
    layers: list[int] | None = setting(None, item=int, min=0, help="Layers to score (default all).")
    completeness: bool = setting(True, help="Also run alpha = 0 rows and report IG's completeness gap.")
    reuse: bool = setting(True, help="Causal reuse + layer skipping (False: plain full-sequence rows, for reference).")
    memory_mb: float | None = setting(None, min=0, min_exclusive=True, help="Budget of one forward/backward beyond the "
                                      "weights, MB (IG rows, grad x act samples, LM-head chunks); default: from free "
                                      "memory (on a CPU at most 512 MB).")
    max_rows: int = setting(256, min=1, help="At most this many IG rows in one micro-batch.")
    batch_size: int = setting(8, min=1, help="Samples per batch for grad_x_act / activation.")

    def __post_init__(self):
        if self.layers is not None:
            self.layers = list(self.layers)
        check(self)
        if self.alphas == "linspace" and self.steps < 2:
            raise CaplocError("linspace IG points need steps >= 2")

    def alpha_points(self) -> tuple[list[float], list[float]]:
        m = self.steps
        if self.alphas == "right":
            a = [k / m for k in range(1, m + 1)]
        elif self.alphas == "midpoint":
            a = [(k - 0.5) / m for k in range(1, m + 1)]
        else:
            a = torch.linspace(0, 1, m).tolist()
        return a, [1.0 / m] * m

    def to_dict(self) -> dict:
        return asdict(self)

    #: knobs that only decide how rows are grouped into forward passes (scores agree to float rounding), so a run may
    #: resume under another memory budget -- e.g. on a different GPU after an out-of-memory error
    MEMORY_KNOBS = ("memory_mb", "max_rows", "batch_size")

    def identity(self) -> dict:
        """What decides the scores: :meth:`to_dict` without :attr:`MEMORY_KNOBS` (the resume key of a score store)."""
        return {k: v for k, v in asdict(self).items() if k not in self.MEMORY_KNOBS}


@dataclass
class SampleScores:
    """Attribution of one sample: ``scores[layer, neuron]`` plus diagnostics."""

    scores: torch.Tensor  # [n_layers, d_mlp] float32 (layers not scored are 0)
    f: float  # objective of the untouched model
    f_zero: torch.Tensor | None = None  # [n_layers] objective with the layer's scaled neurons at 0 (IG only)
    gap: torch.Tensor | None = None  # [n_layers] completeness gap sum_i Attr - (f - f_zero)
    n_tokens: int = 0
    fallback: bool = False  # True if reuse was abandoned for this sample
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# sequence bookkeeping
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    input_ids: torch.Tensor  # [T] tokens fed to the model
    start: int  # first scaled position (prefix [0, start) is reusable)
    scaled: torch.Tensor  # [T] bool, positions whose activations are scaled / scored
    pred_pos: torch.Tensor  # [n] positions whose next-token prediction is scored
    labels: torch.Tensor  # [n] the target tokens


def _plan(ids: list[int], prompt_len: int, cfg: AttributionConfig) -> _Plan:
    ids_t = torch.tensor(ids, dtype=torch.long)
    if prompt_len < 1 or prompt_len >= len(ids):
        raise DataError(f"a sample needs >= 1 prompt token and >= 1 target token (got {prompt_len} of {len(ids)})")
    P = prompt_len
    if cfg.objective == "prob":  # KN mode: next-token probability at the last prompt position
        inp = ids_t[:P]
        pred = torch.tensor([P - 1])
        labels = ids_t[P : P + 1]
    else:
        inp = ids_t[:-1]
        pred = torch.arange(P - 1, len(ids) - 1)
        labels = ids_t[P:]
    T = len(inp)
    scaled = torch.zeros(T, dtype=torch.bool)
    if cfg.positions == "all":
        scaled[:] = True
    elif cfg.positions == "target":
        scaled[P - 1 :] = True
    else:  # last prompt token
        scaled[P - 1] = True
    start = int(scaled.nonzero()[0]) if cfg.reuse else 0
    return _Plan(inp, start, scaled, pred, labels)


def _objective(lp: torch.Tensor, kind: str) -> torch.Tensor:
    """Target log-probabilities [R, n] (0 where a row has fewer targets) -> f [R]."""
    if kind == "prob":
        return first_target_prob(lp)
    return lp.sum(-1)


# --------------------------------------------------------------------------------------------------------------------
# recorded clean run
# --------------------------------------------------------------------------------------------------------------------
def _detach(obj):
    if torch.is_tensor(obj):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(o) for o in obj)
    return obj


@contextlib.contextmanager
def _record_blocks(site: Site, store: dict[int, object]):
    handles = []
    try:
        for j, blk in enumerate(site.blocks):
            handles.append(blk.register_forward_hook(lambda m, a, o, _j=j: store.__setitem__(_j, _detach(o))))
        yield
    finally:
        for h in handles:
            h.remove()


def _prefix_cache(model, ids: torch.Tensor):
    """Run the unscaled prefix once; returns its KV cache (batch 1)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=ids[None], cache=cache, use_cache=True)
    return cache


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# --------------------------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------------------------
class Attributor:
    """Scores the neurons of ``site.model`` for samples given as (token ids, prompt length)."""

    def __init__(self, site: Site, cfg: AttributionConfig):
        self.site, self.cfg = site, cfg
        self.model = site.model
        layers = list(range(site.n_layers)) if cfg.layers is None else sorted(set(int(l) for l in cfg.layers))
        for l in layers:
            if not 0 <= l < site.n_layers:
                raise CaplocError(f"layer {l} is out of range: the model has layers 0..{site.n_layers - 1}")
        self.layers = layers
        self._row_cap: int | None = None  # learnt from OOM back-off
        self.stats = {"rows": 0, "grad_rows": 0, "forward_only_rows": 0, "forwards": 0, "fallbacks": 0,
                      "oom_backoffs": 0}
        self._gxa_cap: int | None = None  # samples per grad_x_act batch learnt from an out-of-memory error
        self.budgets = model_budgets(self.model, cfg.memory_mb)  # rows / samples, and the LM head's chunk
        self._shape: ModelShape | None = None

    @property
    def shape(self) -> ModelShape:
        """The model's dimensions for the memory estimates (parameters are not counted: not needed here)."""
        if self._shape is None:
            cfg = self.model.config
            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            try:  # a transformers config: its kv heads, head size, gating and soft-cap
                shape = ModelShape.from_config(cfg, n_params=0)
            except (CaplocError, AttributeError):  # a hand-written model: what the site knows
                heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 8)
                shape = ModelShape(self.site.n_layers, self.site.d_model, self.site.d_mlp, heads, heads,
                                   self.site.d_model // heads, vocab, 0)
            self._shape = replace(shape, n_layers=self.site.n_layers, d_model=self.site.d_model,
                                  d_mlp=self.site.d_mlp, vocab=vocab)
        return self._shape

    def _logprobs(self, targets, positions, **inputs) -> torch.Tensor:
        """Target log-probabilities [rows, n] through the chunked LM head (``caploc.lmhead``), chunks from the budget."""
        return model_logprobs(self.model, targets, positions, budget_bytes=self.budgets.head, **inputs)

    # ---- public -------------------------------------------------------------------------------------------------
    def score(self, ids: list[int], prompt_len: int) -> SampleScores:
        """Scores of one sample."""
        if self.cfg.method != "ig":
            return self.score_batch([(ids, prompt_len)])[0]
        with frozen(self.model):
            return self._ig(ids, prompt_len, self.cfg.reuse)

    def score_batch(self, items: list[tuple[list[int], int]]) -> list[SampleScores]:
        if self.cfg.method == "ig":
            return [self.score(i, p) for i, p in items]
        with frozen(self.model):
            return self._gxa(items)

    # ---- integrated gradients -----------------------------------------------------------------------------------
    def _ig(self, ids, prompt_len, reuse: bool) -> SampleScores:
        cfg, site, model = self.cfg, self.site, self.model
        plan = _plan(ids, prompt_len, cfg if reuse else _no_reuse(cfg))
        self._replay = reuse
        self._prefix_len = plan.start
        dev = site.input_device()
        inp = plan.input_ids.to(dev)
        s = plan.start
        suffix = inp[s:]
        S = len(suffix)
        mask = plan.scaled[s:]  # [S]
        pred = (plan.pred_pos - s).to(dev)
        labels = plan.labels
        L = site.n_layers
        alphas, weights = cfg.alpha_points()
        # with reuse, the alpha = 1 rows are the clean run itself: their gradients come from its backward
        w_one = sum(w for a, w in zip(alphas, weights) if a == 1.0) if reuse else 0.0

        # clean run: prefix cache, suffix with block outputs and activations recorded (and alpha = 1 gradients)
        recorded: dict[int, object] = {}
        xs = {}  # layer -> its recorded neuron activations (the leaf of the alpha = 1 gradients)

        def keep(j, x):
            if w_one and not x.requires_grad:
                x = x.detach().requires_grad_(True)  # the lowest scored layer; layers above depend on it
            xs[j] = x
            return x if w_one else None

        with torch.no_grad():
            cache = _prefix_cache(model, inp[:s]) if s > 0 else None
        with torch.enable_grad() if w_one else torch.no_grad(), _record_blocks(site, recorded), neuron_hooks(
            site, {l: keep for l in self.layers}
        ):
            lp = self._logprobs(
                labels, pred, input_ids=suffix[None], cache=rows_cache(cache, [1] * L) if cache is not None else None,
                position_ids=torch.arange(s, s + S, device=dev)[None], use_cache=cache is not None,
            )
            f0 = _objective(lp, cfg.objective)[0]
            grads = torch.autograd.grad(f0, [xs[l] for l in self.layers]) if w_one else None
        f_clean = float(f0.detach())
        # clean activations at the scaled positions (0 elsewhere), [S, d_mlp]: Attr = sum_pos act * w * grad
        m = mask.to(torch.float32)[:, None]
        acts = {l: xs[l][0].detach().float().cpu() * m for l in self.layers}
        del lp
        xs.clear()  # free the recorded activations (the closure keeps the dict itself)
        scores = torch.zeros(site.n_layers, site.d_mlp, dtype=torch.float32)
        if grads is not None:
            for l, g in zip(self.layers, grads):
                scores[l] += w_one * (acts[l] * g[0].float().cpu()).sum(0)
            del grads

        # rows (layer, alpha, weight): with a gradient (weight > 0) or forward only (completeness alpha = 0, guard)
        grad_rows: list[tuple[int, float, float]] = []
        fwd_rows: list[tuple[int, float, float]] = []
        for l in sorted(self.layers, reverse=True):
            for a, w in zip(alphas, weights):
                if not (w_one and a == 1.0):
                    (grad_rows if w else fwd_rows).append((l, a, w))
            if cfg.completeness and 0.0 not in alphas:
                fwd_rows.append((l, 0.0, 0.0))
        guard = self.layers[len(self.layers) // 2]
        if reuse:  # a forward-only alpha = 1 row entering at a middle layer checks the reuse on this architecture
            fwd_rows.append((guard, 1.0, 0.0))
            fwd_rows.sort(key=lambda r: -r[0])

        f_rows: dict[tuple[int, float], float] = {}
        for rows, grad in ((grad_rows, True), (fwd_rows, False)):
            i = 0
            while i < len(rows):
                n = self._chunk_len(rows, i, S, len(pred), grad)
                chunk = rows[i : i + n]
                try:
                    self._ig_chunk(chunk, suffix, s, mask, pred, labels, cache, recorded, acts, scores, f_rows, grad)
                except RuntimeError as e:  # includes torch.OutOfMemoryError
                    self._row_cap = self._back_off(e, n, "rows per micro-batch")
                    continue
                i += n

        # guard: alpha = 1 rows must reproduce the clean objective
        ones = [v for (l, a), v in f_rows.items() if a == 1.0]
        tol = 1e-3 * (1 + abs(f_clean)) if _is_low_precision(model) is False else 5e-2 * (1 + abs(f_clean))
        if reuse and ones and max(abs(v - f_clean) for v in ones) > tol:
            log.warning(
                "attribution reuse mismatch on this architecture (f=%.6g vs %.6g); recomputing the sample without reuse",
                max(ones, key=lambda v: abs(v - f_clean)), f_clean,
            )
            self.stats["fallbacks"] += 1
            res = self._ig(ids, prompt_len, reuse=False)
            res.fallback = True
            return res

        f_zero = gap = None
        if cfg.completeness:
            f_zero = torch.full((site.n_layers,), float("nan"))
            for l in self.layers:
                f_zero[l] = f_rows[(l, 0.0)]
            f_one = torch.full((site.n_layers,), float("nan"))
            for l in self.layers:
                f_one[l] = f_rows.get((l, 1.0), f_clean)
            gap = scores.sum(1) - (f_one - f_zero)
        return SampleScores(scores, f_clean, f_zero, gap, n_tokens=len(plan.input_ids))

    def _back_off(self, e: RuntimeError, n: int, unit: str) -> int:
        """After ``e`` raised by a batch of ``n``: re-raise unless it is an out-of-memory error that a smaller batch
        can avoid; else count it, free the cache and return the halved batch size to keep from now on."""
        if not _is_oom(e) or n == 1:
            raise e
        cap = max(1, n // 2)
        self.stats["oom_backoffs"] += 1
        log.warning("out of memory with %d %s; retrying with %d", n, unit, cap)
        _empty_cache()
        return cap

    def _chunk_len(self, rows, i, S, n_pred, grad: bool = True) -> int:
        """How many rows from ``i`` fit the rows' share of the budget (rows are sorted by layer, top first). A row costs
        what its own layers keep (``caploc.memory.engine_row_bytes``): rows enter the micro-batch at their layer, so
        no row pays for a lower one. The LM head's chunk is budgeted apart: a row's scored logits are not charged."""
        cap = min(self.cfg.max_rows, self._row_cap or self.cfg.max_rows)
        dtype = next(self.model.parameters()).dtype
        L = self.site.n_layers
        n, total = 0, 0
        while i + n < len(rows) and n < cap:
            depth = L - rows[i + n][0] if self._replay else L
            row = engine_row_bytes(self.shape, S, n_pred, dtype, depth, self._prefix_len, grad)
            if n > 0 and total + row > self.budgets.rows:
                break
            total += row
            n += 1
        return max(n, 1)

    def _ig_chunk(self, chunk, suffix, s, mask, pred, labels, cache, recorded, acts, scores, f_rows, grad=True):
        site, cfg = self.site, self.cfg
        chunk = sorted(chunk, key=lambda c: c[0])  # by layer, bottom first: block j runs the rows of layers <= j
        R, S, L = len(chunk), len(suffix), site.n_layers
        dev = suffix.device
        row_layer = torch.tensor([c[0] for c in chunk])
        row_alpha = torch.tensor([c[1] for c in chunk], dtype=torch.float32)
        n_at = [int((row_layer <= j).sum()) for j in range(L)] if self._replay else [R] * L
        xs: dict[int, torch.Tensor] = {}

        def make_hook(j):
            def fn(_l, x):  # x [n_at[j], S, d_mlp]
                k = x.shape[0]
                coef = torch.where(row_layer[:k] == j, row_alpha[:k], torch.ones(k)).to(device=x.device, dtype=x.dtype)
                scale = torch.where(mask.to(x.device)[None, :], coef[:, None], torch.ones((), dtype=x.dtype, device=x.device))
                xn = x * scale[:, :, None]
                if grad and not xn.requires_grad:
                    xn.requires_grad_(True)
                xs[j] = xn
                return xn

            return fn

        layers_here = sorted(set(row_layer.tolist()))
        # without reuse: plain full rows (the reference path), no block is touched
        B = 1 if self._replay else R
        stagger = staggered_blocks(site, recorded.__getitem__, n_at) if self._replay else contextlib.nullcontext()
        with torch.enable_grad() if grad else torch.no_grad(), stagger, neuron_hooks(
            site, {j: make_hook(j) for j in layers_here}
        ):
            lp = self._logprobs(
                labels, pred, input_ids=suffix[None].expand(B, S),
                cache=rows_cache(cache, n_at) if cache is not None else None,
                position_ids=torch.arange(s, s + S, device=dev)[None].expand(B, S),
                use_cache=cache is not None,
            )
            f = _objective(lp, cfg.objective)  # [R]
            grads = torch.autograd.grad(f.sum(), [xs[j] for j in layers_here]) if grad else None
        self.stats["rows"] += R
        self.stats["grad_rows" if grad else "forward_only_rows"] += R
        self.stats["forwards"] += 1
        fl = f.detach().float().cpu()
        for r, (l, a, w) in enumerate(chunk):
            f_rows[(l, a)] = float(fl[r])
        if grads is None:
            return
        g_by_layer = dict(zip(layers_here, grads))
        for r, (l, a, w) in enumerate(chunk):
            if w:
                g = g_by_layer[l][r].float().cpu()  # [S, d_mlp]
                scores[l] += w * (acts[l] * g).sum(0)

    # ---- gradient x activation, activation ----------------------------------------------------------------------
    def _gxa(self, items) -> list[SampleScores]:
        cfg = self.cfg
        out: list[SampleScores] = []
        b = 0
        while b < len(items):
            n = self._gxa_len(items, b, min(cfg.batch_size, self._gxa_cap or cfg.batch_size))
            try:
                out += self._gxa_batch(items[b : b + n])
            except RuntimeError as e:  # includes torch.OutOfMemoryError
                self._gxa_cap = self._back_off(e, n, "samples per batch")
                continue
            b += n
        return out

    def _gxa_len(self, items, b: int, cap: int) -> int:
        """Samples from ``b`` (at most ``cap``) whose batch, padded to its longest, fits the budget's rows share."""
        dtype = next(self.model.parameters()).dtype
        attn = "eager" if getattr(self.model.config, "_attn_implementation", None) == "eager" else "sdpa"
        grad = self.cfg.method == "grad_x_act"
        return fit_count([len(it[0]) for it in items], b, cap,
                         lambda T: gxa_sample_bytes(self.shape, T, dtype, grad, attn), self.budgets.rows)

    def _gxa_batch(self, batch) -> list[SampleScores]:
        cfg, site, model = self.cfg, self.site, self.model
        out: list[SampleScores] = []
        plans = [_plan(i, p, _no_reuse(cfg)) for i, p in batch]
        T = max(len(p.input_ids) for p in plans)
        B = len(plans)
        dev = site.input_device()
        ids, att = collate([p.input_ids.tolist() for p in plans], pad_id(None, model.config), width=T)
        pmask = torch.zeros(B, T, dtype=torch.bool)
        for k, p in enumerate(plans):
            pmask[k, : len(p.input_ids)] = p.scaled
        xs: dict[int, torch.Tensor] = {}
        need_grad = cfg.method == "grad_x_act"

        def fn(j, x):
            if need_grad and not x.requires_grad:
                x = x.detach().requires_grad_(True)
            xs[j] = x
            return x if need_grad else None

        # scored positions and targets per row, padded with IGNORE_INDEX (no LM-head work, log-prob 0)
        n_max = max(len(p.pred_pos) for p in plans)
        pos = torch.zeros(B, n_max, dtype=torch.long)
        tgt = torch.full((B, n_max), IGNORE_INDEX, dtype=torch.long)
        for k, p in enumerate(plans):
            pos[k, : len(p.pred_pos)] = p.pred_pos
            tgt[k, : len(p.labels)] = p.labels
        ctx = torch.enable_grad() if need_grad else torch.no_grad()
        with ctx, neuron_hooks(site, {j: fn for j in self.layers}):
            lp = self._logprobs(tgt, pos, input_ids=ids.to(dev), attention_mask=att.to(dev))
            f = _objective(lp, cfg.objective)
            if need_grad:
                grads = torch.autograd.grad(f.sum(), [xs[j] for j in self.layers])
        self.stats["forwards"] += 1
        for k, p in enumerate(plans):
            sc = torch.zeros(site.n_layers, site.d_mlp, dtype=torch.float32)
            m = pmask[k].to(torch.float32)
            for n_j, j in enumerate(self.layers):
                a = xs[j][k].detach().float().cpu()
                if need_grad:
                    sc[j] = (a * grads[n_j][k].float().cpu() * m[:, None]).sum(0)
                else:
                    sc[j] = (a.abs() * m[:, None]).sum(0) / m.sum().clamp(min=1)
            out.append(SampleScores(sc, float(f[k].detach()), n_tokens=len(p.input_ids)))
        return out


def _no_reuse(cfg: AttributionConfig) -> AttributionConfig:
    if not cfg.reuse:
        return cfg
    d = cfg.to_dict()
    d["reuse"] = False
    return AttributionConfig(**d)


def _is_low_precision(model) -> bool:
    return next(model.parameters()).dtype in (torch.float16, torch.bfloat16)


def _empty_cache():
    try:
        if torch.accelerator.is_available():
            torch.accelerator.empty_cache() if hasattr(torch.accelerator, "empty_cache") else None
    except Exception:  # pragma: no cover - best effort
        pass


def attribute(site: Site, encoded, cfg: AttributionConfig) -> list[SampleScores]:
    """Score a list of encoded samples (objects with ``input_ids`` and ``prompt_len``)."""
    att = Attributor(site, cfg)
    return att.score_batch([(e.input_ids, e.prompt_len) for e in encoded])


def ig_points_check(cfg: AttributionConfig) -> float:
    """Sum of Riemann weights (1 for every scheme); used by tests."""
    return math.fsum(cfg.alpha_points()[1])
