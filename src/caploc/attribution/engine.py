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
* **Layer skipping.** Rows that scale layer ``l`` compute layers ``< l`` exactly as the clean run did; those block
  outputs are recorded once and replayed, so a row only runs layers ``l..L-1`` and the backward stops at ``l``.
* **(layer, step) batching.** Rows (one per layer and IG step) are sorted by layer from the top and packed into
  micro-batches under a memory budget; each row scales its own layer inside one shared forward/backward.
* **LM head only where scored** (``logits_to_keep``), parameters frozen (no weight gradients).

Every sample is guarded: the alpha = 1 rows must reproduce the clean objective; if not (an architecture whose blocks
do not behave as assumed), the sample is recomputed without reuse and a warning is logged.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import asdict, dataclass, field

import torch

from ..errors import CaplocError, DataError
from ..hooks import frozen
from ..models.layouts import Site

log = logging.getLogger(__name__)

METHODS = ("ig", "grad_x_act", "activation")
ALPHAS = ("right", "linspace", "midpoint")
OBJECTIVES = ("logprob", "prob")
POSITIONS = ("all", "target", "last")


@dataclass
class AttributionConfig:
    """How to score neurons. Validated on construction (bad values raise a one-line CaplocError)."""

    method: str = "ig"  # ig | grad_x_act | activation
    steps: int = 20  # m, IG Riemann steps
    alphas: str = "right"  # right | linspace | midpoint
    objective: str = "logprob"  # logprob (sum of target log-probs) | prob (KN mode: p(first target token))
    positions: str = "all"  # which positions are scaled / scored: all | target | last (last prompt token)
    layers: list[int] | None = None  # None = all layers
    completeness: bool = True  # also run alpha = 0 rows and report the completeness gap
    reuse: bool = True  # causal reuse + layer skipping (False: plain full-sequence rows, for reference)
    memory_mb: float = 2048.0  # micro-batch budget for one forward/backward
    max_rows: int = 256  # at most this many IG rows in one micro-batch
    batch_size: int = 8  # samples per batch for grad_x_act / activation

    def __post_init__(self):
        def bad(msg):
            raise CaplocError(msg)

        if self.method not in METHODS:
            bad(f"unknown attribution method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.alphas not in ALPHAS:
            bad(f"unknown IG points {self.alphas!r}; choose one of {', '.join(ALPHAS)}")
        if self.objective not in OBJECTIVES:
            bad(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.positions not in POSITIONS:
            bad(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            bad(f"steps must be a positive integer, got {self.steps!r}")
        if self.alphas == "linspace" and self.steps < 2:
            bad("linspace IG points need steps >= 2")
        if self.memory_mb <= 0 or self.max_rows < 1 or self.batch_size < 1:
            bad("memory_mb, max_rows and batch_size must be positive")

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


def _objective(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """logits [R, n, V], labels [n] -> f [R]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(-1, labels.to(logits.device)[None, :, None].expand(logits.shape[0], -1, 1)).squeeze(-1)
    if kind == "prob":
        return lp[:, 0].exp()
    return lp.sum(-1)


# --------------------------------------------------------------------------------------------------------------------
# replaying recorded block outputs (layer skipping)
# --------------------------------------------------------------------------------------------------------------------
def _expand_like(obj, R: int):
    if torch.is_tensor(obj):
        return obj.expand(R, *obj.shape[1:]) if obj.dim() > 0 and obj.shape[0] == 1 else obj
    if isinstance(obj, tuple):
        return tuple(_expand_like(o, R) for o in obj)
    return obj


@contextlib.contextmanager
def _replay_blocks(site: Site, recorded: dict[int, object], below: int, R: int):
    """Blocks ``< below`` return their recorded clean outputs (expanded to R rows) instead of computing."""
    patched = []  # (block, its previous instance ``forward`` or None)
    try:
        for j in range(below):
            blk = site.blocks[j]
            out = _expand_like(recorded[j], R)
            # an instance attribute shadows the class method; a dispatched model (accelerate device map) already has
            # one -- its device-moving wrapper -- which must be put back afterwards, not deleted
            patched.append((blk, blk.__dict__.get("forward")))
            blk.forward = (lambda *a, _o=out, **k: _o)
        yield
    finally:
        for blk, prev in reversed(patched):
            if prev is None:
                del blk.forward
            else:
                blk.forward = prev


@contextlib.contextmanager
def _record_blocks(site: Site, store: dict[int, object]):
    handles = []
    try:
        for j, blk in enumerate(site.blocks):
            handles.append(blk.register_forward_hook(lambda m, a, o, _j=j: store.__setitem__(_j, o)))
        yield
    finally:
        for h in handles:
            h.remove()


def _keep(pred: torch.Tensor, S: int):
    """``logits_to_keep`` for scored positions ``pred`` of an S-token input: the integer n when they are the last n
    positions in order (always, for prompt+target plans) -- no index tensor that would have to follow the hidden states
    onto the last device of a model split over GPUs -- else the index tensor itself."""
    n = int(pred.numel())
    if n and int(pred[0]) == S - n and bool((pred == torch.arange(S - n, S, device=pred.device)).all()):
        return n
    return pred


def _prefix_cache(model, ids: torch.Tensor):
    """Run the unscaled prefix once; returns its KV cache (batch 1)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=ids[None], cache=cache, use_cache=True)
    return cache


def _cache_for_rows(cache, R: int):
    c = copy.copy(cache)
    c.layers = [copy.copy(layer) for layer in cache.layers]
    if R > 1:
        c.batch_repeat_interleave(R)
    return c


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
        self.stats = {"rows": 0, "forwards": 0, "fallbacks": 0, "oom_backoffs": 0}
        self._gxa_cap: int | None = None  # samples per grad_x_act batch learnt from an out-of-memory error
        self._small_batch: int | None = None  # see _batch_tokens

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

        # clean run: prefix cache, suffix with block outputs and activations recorded
        recorded: dict[int, object] = {}
        acts: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            cache = _prefix_cache(model, inp[:s]) if s > 0 else None
            from ..hooks import capture

            with _record_blocks(site, recorded), capture(site) as cap:
                out = model(
                    input_ids=suffix[None], cache=_cache_for_rows(cache, 1) if cache is not None else None,
                    position_ids=torch.arange(s, s + S, device=dev)[None], use_cache=cache is not None,
                    logits_to_keep=_keep(pred, S),
                )
            acts = {l: cap[l][0].float() for l in self.layers}  # [S, d_mlp]
            f_clean = float(_objective(out.logits, labels, cfg.objective)[0])

        alphas, weights = cfg.alpha_points()
        rows: list[tuple[int, float, float]] = []  # (layer, alpha, weight)
        for l in sorted(self.layers, reverse=True):
            rows += [(l, a, w) for a, w in zip(alphas, weights)]
            if cfg.completeness and 0.0 not in alphas:
                rows.append((l, 0.0, 0.0))

        scores = torch.zeros(site.n_layers, site.d_mlp, dtype=torch.float32)
        f_rows: dict[tuple[int, float], float] = {}
        i = 0
        while i < len(rows):
            n = self._chunk_len(rows, i, S, len(pred))
            chunk = rows[i : i + n]
            try:
                self._ig_chunk(chunk, suffix, s, mask, pred, labels, cache, recorded, acts, scores, f_rows)
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

    def _batch_tokens(self) -> int:
        """Below this many row-tokens a micro-batch is so small that merging in lower layers (rows then recompute
        blocks they share with the clean run) pays for itself: an accelerator is launch-bound there, a CPU much less."""
        if self._small_batch is None:
            self._small_batch = 48 if self.site.input_device().type == "cpu" else 512
        return self._small_batch

    def _chunk_len(self, rows, i, S, n_pred) -> int:
        """How many rows from ``i`` fit the memory budget (rows are sorted by layer, top first)."""
        site, cfg = self.site, self.cfg
        cap = min(cfg.max_rows, self._row_cap or cfg.max_rows)
        el = 2 if _is_low_precision(self.model) else 4
        vocab = self.model.get_output_embeddings().weight.shape[0]
        L = site.n_layers
        heads = int(getattr(self.model.config, "num_attention_heads", None) or getattr(self.model.config, "n_head", 8))
        prefix = self._prefix_len
        n = 0
        needed = 0  # layer-passes the rows in the chunk need: sum_r (L - l_r)
        while i + n < len(rows) and n < cap:
            l_min = rows[i + n][0]
            depth = L - l_min
            # per row: saved activations ~ (12 d_model + 4 d_mlp) per token per layer, attention scores
            # (heads x S x (prefix + S) per layer), the row's copy of the prefix KV cache, and the scored logits
            per_row = (S * depth * (12 * site.d_model + 4 * site.d_mlp + 2 * heads * (prefix + S))
                       + 2 * prefix * site.d_model * L + 3 * n_pred * vocab) * el
            if n > 0 and (n + 1) * per_row > cfg.memory_mb * 2**20:
                break
            # every row of a chunk runs from the chunk's lowest layer: only take a lower layer in while the rows are
            # small (batching pays) or the wasted layer passes stay under 25 %
            if n > 0 and l_min != rows[i + n - 1][0]:
                nxt_needed = needed + sum(L - r[0] for r in rows[i + n :] if r[0] == l_min)
                n_nxt = n + sum(1 for r in rows[i + n :] if r[0] == l_min)
                if (n_nxt * S > self._batch_tokens()) and n_nxt * depth > 1.25 * nxt_needed:
                    break
            needed += depth
            n += 1
        return max(n, 1)

    def _ig_chunk(self, chunk, suffix, s, mask, pred, labels, cache, recorded, acts, scores, f_rows):
        site, model, cfg = self.site, self.model, self.cfg
        R, S = len(chunk), len(suffix)
        dev = suffix.device
        row_layer = torch.tensor([c[0] for c in chunk])
        row_alpha = torch.tensor([c[1] for c in chunk], dtype=torch.float32)
        l_min = int(row_layer.min())
        xs: dict[int, torch.Tensor] = {}

        def make_hook(j):
            sel = row_layer == j

            def fn(_l, x):  # x [R, S, d_mlp]
                coef = torch.where(sel, row_alpha, torch.ones_like(row_alpha)).to(device=x.device, dtype=x.dtype)
                m = mask.to(x.device)
                scale = torch.where(m[None, :], coef[:, None], torch.ones((), dtype=x.dtype, device=x.device))
                xn = x * scale[:, :, None]
                if not xn.requires_grad:
                    xn.requires_grad_(True)
                xs[j] = xn
                return xn

            return fn

        from ..hooks import neuron_hooks

        layers_here = sorted(set(row_layer.tolist()))
        with torch.enable_grad(), _replay_blocks(site, recorded, l_min if self._replay else 0, R), neuron_hooks(
            site, {j: make_hook(j) for j in layers_here}
        ):
            out = model(
                input_ids=suffix[None].expand(R, S),
                cache=_cache_for_rows(cache, R) if cache is not None else None,
                position_ids=torch.arange(s, s + S, device=dev)[None].expand(R, S),
                use_cache=cache is not None,
                logits_to_keep=_keep(pred, S),
            )
            f = _objective(out.logits, labels, cfg.objective)  # [R]
            grads = torch.autograd.grad(f.sum(), [xs[j] for j in layers_here])
        self.stats["rows"] += R
        self.stats["forwards"] += 1
        g_by_layer = dict(zip(layers_here, grads))
        fl = f.detach().float().cpu()
        m = mask.to(torch.float32)
        for r, (l, a, w) in enumerate(chunk):
            f_rows[(l, a)] = float(fl[r])
            if w:
                g = g_by_layer[l][r].float().cpu()  # [S, d_mlp]
                scores[l] += w * (acts[l].cpu() * g * m[:, None]).sum(0)

    # ---- gradient x activation, activation ----------------------------------------------------------------------
    def _gxa(self, items) -> list[SampleScores]:
        cfg, site, model = self.cfg, self.site, self.model
        out: list[SampleScores] = []
        b = 0
        while b < len(items):
            n = max(1, min(cfg.batch_size, self._gxa_cap or cfg.batch_size))
            try:
                out += self._gxa_batch(items[b : b + n])
            except RuntimeError as e:  # includes torch.OutOfMemoryError
                self._gxa_cap = self._back_off(e, n, "samples per batch")
                continue
            b += n
        return out

    def _gxa_batch(self, batch) -> list[SampleScores]:
        cfg, site, model = self.cfg, self.site, self.model
        out: list[SampleScores] = []
        plans = [_plan(i, p, _no_reuse(cfg)) for i, p in batch]
        T = max(len(p.input_ids) for p in plans)
        B = len(plans)
        dev = site.input_device()
        pad = getattr(model.config, "pad_token_id", None) or 0
        ids = torch.full((B, T), int(pad), dtype=torch.long)
        att = torch.zeros(B, T, dtype=torch.long)
        pmask = torch.zeros(B, T, dtype=torch.bool)
        for k, p in enumerate(plans):
            ids[k, : len(p.input_ids)] = p.input_ids
            att[k, : len(p.input_ids)] = 1
            pmask[k, : len(p.input_ids)] = p.scaled
        xs: dict[int, torch.Tensor] = {}
        need_grad = cfg.method == "grad_x_act"

        def fn(j, x):
            if need_grad and not x.requires_grad:
                x = x.detach().requires_grad_(True)
            xs[j] = x
            return x if need_grad else None

        from ..hooks import neuron_hooks

        ctx = torch.enable_grad() if need_grad else torch.no_grad()
        with ctx, neuron_hooks(site, {j: fn for j in self.layers}):
            res = model(input_ids=ids.to(dev), attention_mask=att.to(dev))
            logits = res.logits
            fs = []
            for k, p in enumerate(plans):
                fs.append(_objective(logits[k : k + 1, p.pred_pos.to(logits.device)], p.labels, cfg.objective)[0])
            f = torch.stack(fs)
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
