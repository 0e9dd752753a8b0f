"""The causal tracer (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME), per phrasing.

Three runs of the same prompt:

* **clean**: the prompt as is; every block output ("hidden"), MLP output ("mlp") and self-attention output ("attn")
  at every layer and position is recorded; ``p_clean`` = P(first target token) at the last prompt position.
* **corrupted**: Gaussian noise is added to the input embeddings of the subject tokens, ``n_noise`` independent samples
  (one batch row each, seeded). The noise sd is ``noise_mult`` (3, as in ROME) times the standard deviation of the
  entries of the embedding matrix *as the model reads it* (the output of the input-embedding module over the whole
  vocabulary, so the sqrt(d) scale of Gemma-style embeddings is included; for other models this is ``weight.std()``).
  ROME itself measured the sd of the subject tokens' embeddings over its fact set; ours is the whole-matrix variant.
  ``p_corrupt`` = the mean over the noise samples.
* **restored**: the corrupted run in which ONE state, (kind, layer, token), is overwritten by its clean value;
  ``p_restored`` = the mean over the same noise samples. With ``window > 1`` an mlp/attn restoration at layer l
  overwrites layers ``max(0, l - window//2) .. min(L, l + ceil(window/2)) - 1`` at that token, as ROME's figures
  (window 10); hidden states always use one layer.

Indirect effect ``IE = p_restored - p_corrupt``; normalised ``IE / (p_clean - p_corrupt)`` (1 = full recovery).

Restoration uses forward hooks on the modules of ``Site``: ``site.blocks[l]`` (hidden), ``site.mlps[l]`` (mlp) and
the self-attention child of each block, found generically as the child module whose class name contains
"Attention" (:func:`find_attention`; no model-name branching). Hooks live in context managers and are removed in
``finally``.

Restored positions: ``tokens="subject"`` = every subject token plus the last prompt token (default);
``tokens="key"`` = the last subject token and the last token only (cheaper; every number reported at those two
positions is identical to the ``subject`` mode's, the noise being seeded per phrasing); ``tokens="all"`` = every
position. Token classes: ``last`` (the last prompt token), ``last_subject`` (the last
subject token, when it is not the last token), ``other`` (anything else, e.g. the first subject tokens).

Speed (same numbers as the plain loop, checked in the tests): a restoration at (layer l, position t) leaves blocks
< l and positions < t exactly as in the corrupted run, so (1) a row *enters* the forward at its lowest restored layer
from the recorded corrupted output of the block below (blocks no row has reached return their recorded outputs; the
same mechanism as the attribution engine's), so rows of all layers share one forward without recomputing any block
below their own, and (2) positions < t come from a KV cache of the corrupted prefix (one per restored position and
noise sample), so a row runs only positions t..T-1 (one token for the last token). Rows that share a position are
batched. Each phrasing checks, for every restored position, that unrestored rows entering at a middle layer reproduce
the corrupted run, and otherwise recomputes without reuse (warning).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from ...blocks import get_hidden, rows_cache, staggered_blocks
from ...errors import ArchitectureError, CaplocError, DataError
from ...models.layouts import Site
from .config import TRACE_KINDS, TracingConfig

log = logging.getLogger(__name__)

KINDS = TRACE_KINDS
TOKEN_CLASSES = ("last_subject", "last", "other")


# ---------------------------------------------------------------------------------------------------------------------
# model plumbing
# ---------------------------------------------------------------------------------------------------------------------
def find_attention(block: nn.Module) -> nn.Module:
    """The self-attention submodule of a transformer block: the direct child whose class name contains "Attention"
    (cross-attention children, by name, are skipped; if several remain, one named like ``self*`` wins)."""
    cands = [(n, c) for n, c in block.named_children()
             if "attention" in type(c).__name__.lower() and "cross" not in n.lower()]
    if not cands:
        raise ArchitectureError(
            f"no child of {type(block).__name__} has a class name containing 'Attention' "
            f"(children: {', '.join(n for n, _ in block.named_children())}); causal tracing of attn needs one: "
            "trace only hidden,mlp (--trace-kinds hidden,mlp)")
    if len(cands) > 1:
        named_self = [c for n, c in cands if n.lower().startswith("self")]
        if named_self:
            return named_self[0]
    return cands[0][1]


class TraceSites:
    """Where each kind of state lives: blocks (hidden), MLPs (mlp), self-attention modules (attn)."""

    def __init__(self, site: Site, kinds=KINDS):
        self.site = site
        self.n_layers = site.n_layers
        self.attn = [find_attention(b) for b in site.blocks] if "attn" in kinds else None

    def module(self, kind: str, layer: int) -> nn.Module:
        if kind == "hidden":
            return self.site.blocks[layer]
        if kind == "mlp":
            return self.site.mlps[layer]
        if kind == "attn":
            if self.attn is None:
                self.attn = [find_attention(b) for b in self.site.blocks]
            return self.attn[layer]
        raise CaplocError(f"unknown state kind {kind!r}; choose one of {', '.join(KINDS)}")


def embedding_std(model: nn.Module, chunk: int = 8192) -> float:
    """Population sd of all entries of the input-embedding module's output over the whole vocabulary."""
    emb = model.get_input_embeddings()
    V = int(emb.weight.shape[0])
    dev = emb.weight.device
    s = s2 = 0.0
    n = 0
    with torch.no_grad():
        for a in range(0, V, chunk):
            x = emb(torch.arange(a, min(V, a + chunk), device=dev)).double()
            s += float(x.sum())
            s2 += float((x * x).sum())
            n += x.numel()
    mean = s / n
    return math.sqrt(max(s2 / n - mean * mean, 0.0))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextlib.contextmanager
def _hooks(pairs, pre=()) -> Iterator[None]:
    """pairs: (module, forward_hook), pre: (module, forward_pre_hook with kwargs) -> registered for the duration;
    removed in ``finally``."""
    handles = []
    try:
        for mod, fn in pairs:
            handles.append(mod.register_forward_hook(fn))
        for mod, fn in pre:
            handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------------
# subject positions
# ---------------------------------------------------------------------------------------------------------------------
def subject_positions(tokenizer, prompt: str, prompt_ids: list[int], subject: str) -> list[int]:
    """Positions in ``prompt_ids`` (the encoded prompt, possibly with a leading BOS) of the tokens that overlap the
    first occurrence of ``subject`` in ``prompt`` (character offsets; decoding prefixes for slow tokenizers)."""
    c0 = prompt.find(subject)
    if not subject or c0 < 0:
        raise DataError(f"subject {subject!r} does not occur in the prompt {prompt!r}; causal tracing needs it")
    c1 = c0 + len(subject)
    plain = None
    offsets = None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        plain, offsets = [int(t) for t in enc["input_ids"]], [tuple(o) for o in enc["offset_mapping"]]
    else:  # pragma: no cover - slow tokenizers
        plain = [int(t) for t in tokenizer.encode(prompt, add_special_tokens=False)]
        offsets, prev = [], 0
        for i in range(len(plain)):
            end = len(tokenizer.decode(plain[: i + 1]))
            offsets.append((prev, end))
            prev = end
    k = len(plain)
    if k == 0 or prompt_ids[len(prompt_ids) - k:] != plain:
        raise DataError(f"cannot align the tokens of {prompt!r} with its encoding; use a tokenizer without "
                        "text-dependent special tokens")
    start = len(prompt_ids) - k
    pos = [start + i for i, (a, b) in enumerate(offsets) if a < c1 and b > c0]
    if not pos:
        raise DataError(f"subject {subject!r} maps to no token of {prompt!r}")
    return pos


def token_classes(positions: list[int], subject_pos: list[int], n_tokens: int) -> list[str]:
    """Class of each restored position: last (last prompt token), last_subject, other."""
    out = []
    for t in positions:
        if t == n_tokens - 1:
            out.append("last")
        elif t == subject_pos[-1]:
            out.append("last_subject")
        else:
            out.append("other")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PhrasingTrace:
    """Causal trace of one phrasing. ``p_restored[k, l, r]``: mean P(target) when state ``kinds[k]`` of layer ``l``
    at position ``positions[r]`` is restored (nan for kinds/layers not traced)."""

    p_clean: float
    p_corrupt: float
    p_corrupt_rows: list[float]  # [n_noise]
    p_restored: torch.Tensor  # [K, L, R] float32
    kinds: list[str]
    positions: list[int]
    classes: list[str]
    subject_pos: list[int]
    n_tokens: int
    noise_sd: float
    fallback: bool = False
    extra: dict = field(default_factory=dict)

    def ie(self, normalized: bool = False) -> torch.Tensor:
        """Indirect effect ``p_restored - p_corrupt`` [K, L, R]; normalised by ``p_clean - p_corrupt`` (nan if that
        difference is <= 0, i.e. the corruption did not lower the probability)."""
        ie = self.p_restored - self.p_corrupt
        if not normalized:
            return ie
        d = self.p_clean - self.p_corrupt
        return ie / d if d > 0 else torch.full_like(ie, float("nan"))

    def class_index(self, cls: str) -> int | None:
        return self.classes.index(cls) if cls in self.classes else None

    def peak(self, kind: str | None = None) -> dict:
        """The (kind, layer, position) with the largest indirect effect (over all traced kinds, or one kind)."""
        ie = self.ie()
        ks = range(len(self.kinds)) if kind is None else [self.kinds.index(kind)]
        best = None
        for k in ks:
            v = ie[k]
            if torch.isnan(v).all():
                continue
            flat = int(torch.nan_to_num(v, nan=-math.inf).argmax())
            l, r = divmod(flat, v.shape[1])
            val = float(v[l, r])
            if best is None or val > best["ie"]:
                best = {"kind": self.kinds[k], "layer": l, "position": self.positions[r], "class": self.classes[r],
                        "ie": val}
        return best

    def layer_curve(self, kind: str = "mlp", cls: str = "last_subject") -> torch.Tensor | None:
        """IE over layers [L] of ``kind`` at the position of class ``cls`` (the max over positions if ``cls`` is
        ``other``, since several positions may have that class); None if not traced."""
        if kind not in self.kinds:
            return None
        k = self.kinds.index(kind)
        rs = [r for r, c in enumerate(self.classes) if c == cls]
        if not rs:
            return None
        return self.ie()[k][:, rs].amax(1)

    def peak_layer(self, kind: str = "mlp", cls: str = "last_subject") -> int | None:
        """argmax over layers of :meth:`layer_curve` (ROME: the MLP at the last subject token)."""
        c = self.layer_curve(kind, cls)
        if c is None or torch.isnan(c).all():
            return None
        return int(torch.nan_to_num(c, nan=-math.inf).argmax())

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "p_restored"}
        return d

    @classmethod
    def from_json(cls, d: dict, p_restored: torch.Tensor) -> "PhrasingTrace":
        return cls(p_restored=p_restored, **d)


# ---------------------------------------------------------------------------------------------------------------------
# the tracer
# ---------------------------------------------------------------------------------------------------------------------
class Tracer:
    """Causal tracing of ``site.model`` (see module docstring)."""

    def __init__(self, site: Site, cfg: TracingConfig | None = None):
        self.site = site
        self.cfg = cfg or TracingConfig()
        self.model = site.model
        self.sites = TraceSites(site, self.cfg.kinds)
        self.L = site.n_layers
        self._noise_sd: float | None = None
        self.stats = {"forwards": 0, "rows": 0, "fallbacks": 0}

    @property
    def noise_sd(self) -> float:
        if self._noise_sd is None:
            self._noise_sd = self.cfg.noise_mult * embedding_std(self.model)
        return self._noise_sd

    def make_noise(self, n_subject: int, seed: int) -> torch.Tensor:
        """Seeded noise [n_noise, n_subject, d_model] with sd ``noise_sd`` (CPU generator: same on every device)."""
        g = torch.Generator().manual_seed(int(seed))
        d = int(self.model.get_input_embeddings().weight.shape[1])
        return torch.randn(self.cfg.n_noise, n_subject, d, generator=g) * self.noise_sd

    # ---- one forward with noise, restoration patches and optional replay -------------------------------------------
    def run(self, ids: list[int] | torch.Tensor, target_id: int, subject_pos: list[int], *,
            noise: torch.Tensor | None, row_noise: torch.Tensor | None = None,
            patches: dict[tuple[str, int], list[tuple[int, int]]] | None = None,
            clean: dict[tuple[str, int], torch.Tensor] | None = None,
            recorded: dict[int, object] | None = None, enter: list[int] | None = None,
            record: dict | None = None, n_rows: int | None = None, start: int = 0,
            cache=None) -> torch.Tensor:
        """P(target) at the last position for R rows of the same prompt.

        noise:     [n_noise, S, d] added to the subject embeddings; row r gets ``noise[row_noise[r]]``
                   (``row_noise[r] < 0``: no noise). None: no noise at all (clean rows).
        patches:   {(kind, layer): [(row, position), ...]}: after that module runs, its output at (row, position) is
                   overwritten with ``clean[(kind, layer)][position]``.
        recorded, enter: layer skipping. Rows are ordered by the layer they enter at; block j computes rows
                   ``0..enter[j]-1`` only. A row enters from ``recorded`` (the corrupted run's block outputs, one per
                   noise sample, and its first-block input at key -1) at its sample ``row_noise[r]``; blocks no row
                   has reached return those outputs. The model itself then reads a batch-1 clean input.
        record:    if a dict, filled with {(kind, layer): output first element [R, T, d]} for every kind in
                   ``self.cfg.kinds`` plus "hidden", and {"block", layer: raw block output}.
        start, cache: run only positions ``start..T-1`` on top of ``cache`` (a KV cache of positions < start with
                   R rows, e.g. from :meth:`prefix_cache`); positions in ``patches`` stay absolute.
        """
        site, model = self.site, self.model
        dev = site.input_device()
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=dev)
        R = n_rows if n_rows is not None else (len(row_noise) if row_noise is not None else 1)
        if row_noise is None:
            row_noise = torch.full((R,), -1, dtype=torch.long)
        if start and (record is not None or cache is None):
            raise CaplocError("a suffix run (start > 0) needs a prefix cache and cannot record states")
        sub_cols = [c for c, p in enumerate(subject_pos) if p >= start]
        sp = torch.as_tensor([subject_pos[c] - start for c in sub_cols], dtype=torch.long)
        if noise is not None:
            noise = noise[:, sub_cols]
        hooks, pre = [], []
        if enter is None and noise is not None and len(sub_cols) and bool((row_noise >= 0).any()):
            rows = (row_noise >= 0).nonzero().flatten()

            def emb_hook(mod, args, out, _rows=rows):
                out = out.clone()
                add = noise.to(out.device, out.dtype).index_select(0, row_noise[_rows].to(out.device))  # [r, S, d]
                idx_r = _rows.to(out.device)[:, None]
                out[idx_r, sp.to(out.device)[None, :]] += add
                return out

            hooks.append((model.get_input_embeddings(), emb_hook))
        if patches:
            for (kind, layer), rp in patches.items():
                if not rp:
                    continue
                if min(t for _, t in rp) < start:
                    raise CaplocError(f"cannot restore a position before the suffix start {start}")
                r_idx = torch.tensor([r for r, _ in rp], dtype=torch.long)
                t_idx = torch.tensor([t for _, t in rp], dtype=torch.long)
                src = clean[(kind, layer)]  # [T, d]

                def patch_hook(mod, args, out, _r=r_idx, _t=t_idx, _src=src):
                    x = _first(out).clone()
                    x[_r.to(x.device), (_t - start).to(x.device)] = _src.to(x.device, x.dtype)[_t.to(x.device)]
                    return _replace_first(out, x)

                hooks.append((self.sites.module(kind, layer), patch_hook))
        if record is not None:
            pre.append((site.blocks[0], lambda m, a, k: record.__setitem__(("block_in", 0), get_hidden(a, k))))
            for l in range(self.L):
                hooks.append((site.blocks[l], lambda m, a, o, _l=l: record.__setitem__(("block", _l), o)))
                for kind in set(self.cfg.kinds) | {"hidden"}:
                    mod = self.sites.module(kind, l)
                    hooks.append((mod, lambda m, a, o, _k=kind, _l=l: record.__setitem__((_k, _l), _first(o).detach())))
        inp = ids_t[start:][None].expand(R, -1)
        ctx = contextlib.nullcontext()
        if enter is not None:  # every row's input comes from the corrupted run's recordings: a batch-1 clean input
            if bool((row_noise < 0).any()):
                raise CaplocError("rows that enter at a layer replay the corrupted run: every row needs a noise sample")

            def rows(t):
                return t.index_select(0, row_noise.to(t.device))[:, start:]

            def output(j):  # block j's recorded corrupted output, one per row
                return _replace_first(recorded[j], rows(_first(recorded[j])))

            ctx = staggered_blocks(site, output, enter, rows(recorded[-1]) if enter[0] > 0 else None)
            inp = ids_t[start:][None]
        kw = {"cache": cache, "use_cache": True,
              "position_ids": torch.arange(start, len(ids_t), device=dev)[None]} if cache is not None else {
              "use_cache": False}
        with torch.no_grad(), _hooks(hooks, pre), ctx:
            out = model(input_ids=inp, logits_to_keep=1, **kw)
        self.stats["forwards"] += 1
        self.stats["rows"] += R
        return out.logits[:, -1].float().softmax(-1)[:, int(target_id)].cpu()

    def prefix_cache(self, ids, subject_pos: list[int], noise: torch.Tensor, start: int):
        """KV cache of the corrupted prompt's positions < ``start`` for the ``n_noise`` rows (row z = noise z)."""
        dev = self.site.input_device()
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=dev)[:start]
        cols = [c for c, p in enumerate(subject_pos) if p < start]
        sp = torch.as_tensor([subject_pos[c] for c in cols], dtype=torch.long)
        n = noise.shape[0]
        hooks = []
        if cols:
            def emb_hook(mod, args, out):
                out = out.clone()
                out[:, sp.to(out.device)] += noise[:, cols].to(out.device, out.dtype)
                return out
            hooks.append((self.model.get_input_embeddings(), emb_hook))
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad(), _hooks(hooks):
            self.model(input_ids=ids_t[None].expand(n, -1), cache=cache, use_cache=True, logits_to_keep=1)
        self.stats["forwards"] += 1
        return cache

    def rows_cache(self, cache, row_noise: torch.Tensor, enter: list[int] | None = None):
        """A copy of ``cache`` whose rows are ``cache`` rows ``row_noise`` (the original is left untouched); with
        ``enter``, layer j holds only the first ``enter[j]`` of them (the rows block j computes)."""
        return rows_cache(cache, enter if enter is not None else [len(row_noise)] * self.L, row_noise)

    # ---- full trace of one phrasing ---------------------------------------------------------------------------------
    def restored_layers(self, kind: str, layer: int) -> list[int]:
        w = self.cfg.window if kind != "hidden" else 1
        return list(range(max(0, layer - w // 2), min(self.L, layer + (w - w // 2))))

    def trace(self, prompt_ids: list[int], target_id: int, subject_pos: list[int], seed: int,
              layers: list[int] | None = None) -> PhrasingTrace:
        """Trace one phrasing (prompt token ids, first target token id, subject positions in ``prompt_ids``)."""
        cfg = self.cfg
        T = len(prompt_ids)
        if not subject_pos or min(subject_pos) < 0 or max(subject_pos) >= T:
            raise DataError(f"subject positions {subject_pos} outside a prompt of {T} tokens")
        if cfg.tokens == "subject":
            positions = sorted(set(subject_pos) | {T - 1})
        elif cfg.tokens == "key":
            positions = sorted({subject_pos[-1], T - 1})
        else:
            positions = list(range(T))
        classes = token_classes(positions, subject_pos, T)
        layers = list(range(self.L)) if layers is None else sorted(set(layers))
        noise = self.make_noise(len(subject_pos), seed)
        n = cfg.n_noise

        # clean run, recording every state
        rec: dict = {}
        p_clean = float(self.run(prompt_ids, target_id, subject_pos, noise=None, record=rec, n_rows=1)[0])
        clean = {k: v[0] for k, v in rec.items() if k[0] != "block"}  # [T, d]
        # corrupted run, recording block outputs for replay
        rec_c: dict = {}
        row_noise = torch.arange(n)
        p_rows = self.run(prompt_ids, target_id, subject_pos, noise=noise, row_noise=row_noise, record=rec_c)
        recorded = {l: rec_c[("block", l)] for l in range(self.L)}
        recorded[-1] = rec_c[("block_in", 0)]  # the corrupted input of the first block
        p_corrupt = float(p_rows.mean())

        # restoration rows (entering layer, kind index, layer, position index, noise index), grouped by restored
        # position (positions before it are a cached prefix); a row enters the forward at its lowest restored layer
        kinds = list(cfg.kinds)
        groups: dict[int, list[tuple[int, int, int, int, int]]] = {}
        for ki, kind in enumerate(kinds):
            for l in layers:
                low = self.restored_layers(kind, l)[0]
                for ri, pos in enumerate(positions):
                    for z in range(n):
                        groups.setdefault(pos if cfg.reuse else 0, []).append((low, ki, l, ri, z))
        if cfg.reuse:  # check rows: unrestored rows entering at a middle layer must reproduce the corrupted run
            for rows in groups.values():
                rows += [(self.L // 2, -1, -1, -1, z) for z in range(n)]
        sums = torch.zeros(len(kinds), self.L, len(positions), dtype=torch.float64)
        counts = torch.zeros_like(sums)
        prefix: dict[int, object] = {}
        fallback = False
        for pos in sorted(groups):
            rows = sorted(groups[pos], key=lambda r: r[0])
            if pos > 0 and pos not in prefix:
                prefix[pos] = self.prefix_cache(prompt_ids, subject_pos, noise, pos)
            for c0 in range(0, len(rows), cfg.max_rows):
                chunk = rows[c0 : c0 + cfg.max_rows]
                rn = torch.tensor([z for *_, z in chunk], dtype=torch.long)
                enter = [sum(1 for r in chunk if r[0] <= j) for j in range(self.L)] if cfg.reuse else None
                patches: dict[tuple[str, int], list[tuple[int, int]]] = {}
                for r, (_low, ki, l, ri, _z) in enumerate(chunk):
                    if ki < 0:
                        continue
                    for ll in self.restored_layers(kinds[ki], l):
                        patches.setdefault((kinds[ki], ll), []).append((r, positions[ri]))
                cache = self.rows_cache(prefix[pos], rn, enter) if pos > 0 else None
                p = self.run(prompt_ids, target_id, subject_pos, noise=noise, row_noise=rn, patches=patches,
                             clean=clean, recorded=recorded if enter else None, enter=enter, start=pos, cache=cache)
                for r, (_low, ki, l, ri, z) in enumerate(chunk):
                    if ki < 0:
                        ref = float(p_rows[z])
                        if abs(float(p[r]) - ref) > 1e-4 + 1e-3 * abs(ref):
                            fallback = True
                        continue
                    sums[ki, l, ri] += float(p[r])
                    counts[ki, l, ri] += 1
        if fallback:
            log.warning("causal-tracing replay did not reproduce the corrupted run on this architecture; "
                        "recomputing the phrasing without layer skipping")
            self.stats["fallbacks"] += 1
            saved = cfg.reuse
            try:
                self.cfg.reuse = False
                res = self.trace(prompt_ids, target_id, subject_pos, seed, layers)
            finally:
                self.cfg.reuse = saved
            res.fallback = True
            return res
        p_restored = (sums / counts).float()  # nan where not traced (0/0)
        return PhrasingTrace(p_clean=p_clean, p_corrupt=p_corrupt, p_corrupt_rows=[float(x) for x in p_rows],
                             p_restored=p_restored, kinds=kinds, positions=positions, classes=classes,
                             subject_pos=list(subject_pos), n_tokens=T, noise_sd=self.noise_sd)
