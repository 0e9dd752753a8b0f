"""Knowledge circuits by edge attribution patching (EAP), audited for fidelity and reliability (paper §3).

Graph. Nodes are the embedding (``emb``: the input of the first block), every attention head of every layer
(``L{l}.H{h}``), every MLP (``L{l}.MLP``) and the logits (``logits``). There is an edge ``u -> v`` whenever ``v``
reads the residual stream after ``u`` has written to it: the embedding feeds everything; a head of layer ``l`` feeds
heads and MLPs of later layers, the MLP of its own layer when the block is sequential (Llama, GPT-2: the MLP reads
``x + attn(x)``) but not when it is parallel (GPT-J, NeoX with ``use_parallel_residual``: both read ``x``), and the
logits; an MLP feeds every later head/MLP and the logits. Whether a block is parallel is *measured* on a probe
forward (does the MLP's input depend on the attention output?), not looked up by model name.

Per-head outputs. The input ``z`` of the attention output projection (``o_proj`` / ``c_proj`` / ``dense`` /
``out_proj``) is split by heads; head ``h`` writes ``z[..., h] @ W_O[:, h]^T`` to the residual stream (the output
bias belongs to no head and never changes, so it has no edge). The attention module is the block child whose class
name contains ``Attention``; its output projection is the ``Linear``/``Conv1D`` child with ``in = n_heads * head_dim``
and ``out = d_model`` whose output is the attention output (checked on the probe forward when several qualify).
Architectures whose residual stream is not the sum of these node outputs (Gemma-2/3 normalise sublayer outputs before
adding them) are refused with a one-line error.

EAP (Syed et al. 2023; Hanna et al. 2024). ``score(u -> v) = sum_pos (a_u^corrupt - a_u^clean) . dm/d(in_v)``, the
first-order estimate of how much the metric ``m`` changes when only the edge ``u -> v`` carries ``u``'s corrupted
output. ``dm/d(in_v)`` is the gradient with respect to the residual stream *as read by v alone*: for a head, the
vector-Jacobian product of the attention output-projection input, restricted to that head's slice, back to the block
input (through the attention norm and that head's q/k/v); for an MLP, the VJP of its output back to the input of the
norm that feeds it; for the logits, the gradient at the last block's output. One clean forward with gradients, one
corrupted forward without, one backward, and one batched VJP per layer.

Corruption (ours; the paper's text is not available): ``noise`` (default, ROME's causal-tracing corruption) adds
Gaussian noise with sd ``noise_scale * sigma`` to the embedding-node output at the subject tokens, ``sigma`` = the sd
of the clean embedding-node outputs at subject tokens over all audited phrasings, seeded per phrasing; ``swap``
replaces the subject by another subject of the data set (different attribute) that tokenizes to the same number of
tokens with identical surrounding tokens, falling back to ``noise`` when none exists (recorded per phrasing).

Metric: ``logprob`` (default) = log P(first target token | prompt); ``logit`` = its raw logit (with a model whose
nodes are linear this makes EAP exact; used by the tests); ``target_logprob`` = the summed log-probability of all
target tokens, teacher-forced.

Circuit: the ``top_k`` edges by ``|score|``. Fidelity: IoU of the edge sets of a fact's phrasings (the prompt and its
paraphrases), next to the exact IoU of two random edge sets of the same size, next to phrasings of *different* facts
(same relation / other relation). Size: share of edges, of nodes, and of parameters (the parameters the touched nodes
own: per head its q and o slices and the k/v slices of its key-value group; per MLP all its weights; embeddings and
unembedding are not counted); parameter-weighted IoU between paraphrases (:func:`param_sets` exports the parameter
sets for a common metric across audit methods).

Reliability (node-level; edge-level ablation is not implemented): run the phrasing with every head and MLP that the
circuit does not touch mean-ablated (its output replaced by its mean over the reference set = all audited clean
phrasings, averaged over positions), and report ``P_circuit / P_full`` of the first target token. Baselines: random
node sets with the same number of heads and MLPs (``random_draws`` per phrasing) and the empty circuit (everything
ablated). By default position 0 (the attention-sink / first token) is never ablated and not used for the means
(``keep_first_position``).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..blocks import get_hidden, replace_hidden
from ..errors import ArchitectureError, CaplocError, DataError
from ..hooks import frozen
from ..results import atomic_save_tensors, atomic_write_json

log = logging.getLogger(__name__)

METRICS = ("logprob", "logit", "target_logprob")
CORRUPTIONS = ("noise", "swap")
# fused q/k/v projections whose rows are interleaved per head ([h: q, k, v]) rather than stacked ([q | k | v]);
# only used to attribute parameters to heads for the size / parameter-IoU numbers
_FUSED_QKV_INTERLEAVED = {"gpt_neox"}


# ---------------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class CircuitConfig:
    """How to build and audit knowledge circuits. Validated on construction."""

    top_k: int = 200  # edges per circuit (by |EAP score|)
    metric: str = "logprob"  # logprob (log P first target token) | logit | target_logprob
    corrupt: str = "noise"  # noise (ROME-style Gaussian noise on subject embeddings) | swap (another subject)
    noise_scale: float = 3.0  # noise sd = noise_scale * sd of clean subject embeddings (ROME: 3)
    max_phrasings: int = 4  # per fact: the prompt + up to max_phrasings - 1 paraphrases
    min_phrasings: int = 2  # facts with fewer usable phrasings are skipped
    random_draws: int = 10  # random node sets per phrasing (reliability baseline)
    fidelity_draws: int = 200  # random edge-set pairs for the parameter-IoU baseline
    keep_first_position: bool = True  # never ablate position 0; means over positions >= 1
    chat: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.metric not in METRICS:
            raise CaplocError(f"unknown circuit metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.corrupt not in CORRUPTIONS:
            raise CaplocError(f"unknown corruption {self.corrupt!r}; choose one of {', '.join(CORRUPTIONS)}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise CaplocError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.min_phrasings < 2 or self.max_phrasings < self.min_phrasings:
            raise CaplocError("need 2 <= min_phrasings <= max_phrasings (fidelity compares a fact's phrasings)")
        if self.noise_scale <= 0 or self.random_draws < 1 or self.fidelity_draws < 1:
            raise CaplocError("noise_scale, random_draws and fidelity_draws must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# the node graph of one model
# ---------------------------------------------------------------------------------------------------------------------
def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _io(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or HF Conv1D (weight [in, out])."""
    w = m.weight
    return (int(w.shape[0]), int(w.shape[1])) if type(m).__name__ == "Conv1D" else (int(w.shape[1]), int(w.shape[0]))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _cfg_int(cfg, *names) -> int | None:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class NodeGraph:
    """Nodes, edges and hook points of one model (built from the model's modules and one probe forward).

    ``nodes``: ``emb``, then per layer its heads and its MLP, then ``logits`` (this order is topological).
    ``edges``: [E, 2] int64 (u, v) node indices of every valid edge, u-major.
    """

    def __init__(self, model: nn.Module, site):
        self.model, self.site = model, site
        cfg = model.config
        self.model_type = getattr(cfg, "model_type", None) or "custom"
        self.n_layers, self.d_model = site.n_layers, site.d_model
        H = _cfg_int(cfg, "num_attention_heads", "n_head", "num_heads")
        if H is None:
            raise ArchitectureError(f"cannot read the number of attention heads from the {self.model_type} config "
                                    "(num_attention_heads / n_head); knowledge circuits need it")
        self.n_heads = H
        self.head_dim = _cfg_int(cfg, "head_dim") or self.d_model // H
        self.n_kv_heads = _cfg_int(cfg, "num_key_value_heads", "n_kv_heads") or H
        self.attn: list[nn.Module] = []
        cands: list[list[nn.Module]] = []
        for l, blk in enumerate(site.blocks):
            att = [c for c in blk.children() if "Attention" in type(c).__name__]
            if len(att) != 1:
                raise ArchitectureError(f"block {l} of {self.model_type} has {len(att)} children whose class name "
                                        "contains 'Attention' (need exactly 1); knowledge circuits cannot find the heads")
            self.attn.append(att[0])
            c = [m for m in att[0].children() if _is_linear(m) and _io(m) == (H * self.head_dim, self.d_model)]
            if not c:
                raise ArchitectureError(f"no output projection (Linear/Conv1D {H * self.head_dim}->{self.d_model}) in "
                                        f"{type(att[0]).__name__}; knowledge circuits cannot split it by heads")
            cands.append(c)
        self.norms = [[c for c in blk.children() if "Norm" in type(c).__name__] for blk in site.blocks]
        self._probe(cands)
        self._build_nodes()

    # ---- probe -----------------------------------------------------------------------------------------------------
    def _probe(self, cands):
        """One small forward to find the output projections, the norm feeding each MLP, parallel blocks, and to
        check that the residual stream is the sum of the node outputs."""
        model, site, L = self.model, self.site, self.n_layers
        rec: dict[str, Any] = {}
        handles = []
        try:
            def keep(key):
                def fn(m, args, kwargs, out):
                    rec[key] = (args[0] if args else next(iter(kwargs.values())), _first(out))
                return fn

            for l in range(L):
                handles.append(site.blocks[l].register_forward_hook(keep(f"blk{l}"), with_kwargs=True))
                handles.append(self.attn[l].register_forward_hook(keep(f"att{l}"), with_kwargs=True))
                handles.append(site.mlps[l].register_forward_hook(keep(f"mlp{l}"), with_kwargs=True))
                for j, c in enumerate(cands[l]):
                    handles.append(c.register_forward_hook(keep(f"cand{l}.{j}"), with_kwargs=True))
                for j, c in enumerate(self.norms[l]):
                    handles.append(c.register_forward_hook(keep(f"norm{l}.{j}"), with_kwargs=True))

            def leaf(m, args, kwargs):
                return replace_hidden(args, kwargs, get_hidden(args, kwargs).detach().requires_grad_(True))

            handles.append(site.blocks[0].register_forward_pre_hook(leaf, with_kwargs=True))
            vocab = model.get_input_embeddings().weight.shape[0]
            ids = (torch.arange(5) * 7 + 3) % vocab
            with frozen(model), torch.enable_grad():
                model(input_ids=ids[None].to(site.input_device()), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self.out_proj: list[nn.Module] = []
        self.mlp_norm: list[nn.Module | None] = []
        self.parallel: list[bool] = []
        for l in range(L):
            att_out = rec[f"att{l}"][1]
            hit = [c for j, c in enumerate(cands[l]) if _same(rec[f"cand{l}.{j}"][1], att_out)]
            if len(hit) != 1:
                raise ArchitectureError(f"cannot tell which projection of {type(self.attn[l]).__name__} writes the "
                                        f"attention output ({len(hit)} candidates match); knowledge circuits need it")
            self.out_proj.append(hit[0])
            mlp_in = rec[f"mlp{l}"][0]
            norm = [c for j, c in enumerate(self.norms[l]) if _same(rec[f"norm{l}.{j}"][1], mlp_in)]
            self.mlp_norm.append(norm[0] if norm else None)
            read = rec[f"norm{l}.{self.norms[l].index(norm[0])}"][0] if norm else mlp_in
            g = torch.autograd.grad(read.sum(), att_out, allow_unused=True, retain_graph=True)[0] \
                if read.requires_grad else None
            self.parallel.append(g is None or not bool(g.abs().sum() > 0))
            x_in, x_out = rec[f"blk{l}"]
            mlp_out = rec[f"mlp{l}"][1]
            diff = (x_out - x_in - att_out - mlp_out).detach().abs().max()
            scale = x_out.detach().abs().max().clamp(min=1e-6)
            if float(diff) > 1e-3 * float(scale):
                raise ArchitectureError(
                    f"{self.model_type}: block {l} output is not input + attention + MLP (max deviation "
                    f"{float(diff):.3g}; e.g. normalised sublayer outputs); EAP needs an additive residual stream")
        self.conv1d = [type(o).__name__ == "Conv1D" for o in self.out_proj]

    # ---- nodes and edges -------------------------------------------------------------------------------------------
    def _build_nodes(self):
        L, H = self.n_layers, self.n_heads
        names, kind, layer, head = ["emb"], ["emb"], [-1], [-1]
        for l in range(L):
            for h in range(H):
                names.append(f"L{l}.H{h}"); kind.append("head"); layer.append(l); head.append(h)
            names.append(f"L{l}.MLP"); kind.append("mlp"); layer.append(l); head.append(-1)
        names.append("logits"); kind.append("logits"); layer.append(L); head.append(-1)
        self.nodes, self.kind = names, kind
        self.layer, self.head = np.array(layer), np.array(head)
        n = len(names)
        valid = np.zeros((n, n), dtype=bool)
        for u in range(n - 1):
            for v in range(1, n):
                valid[u, v] = self._feeds(u, v)
        self.valid = valid
        self.edges = np.argwhere(valid).astype(np.int64)  # u-major
        self.edge_id = -np.ones((n, n), dtype=np.int64)
        self.edge_id[self.edges[:, 0], self.edges[:, 1]] = np.arange(len(self.edges))

    def _feeds(self, u: int, v: int) -> bool:
        ku, kv = self.kind[u], self.kind[v]
        if ku == "logits" or kv == "emb" or u == v:
            return False
        if ku == "emb" or kv == "logits":
            return True
        lu, lv = self.layer[u], self.layer[v]
        if lv > lu:
            return True
        if lv < lu:
            return False
        return ku == "head" and kv == "mlp" and not self.parallel[lu]  # same layer

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def head_node(self, l: int, h: int) -> int:
        return 1 + l * (self.n_heads + 1) + h

    def mlp_node(self, l: int) -> int:
        return 1 + l * (self.n_heads + 1) + self.n_heads

    # ---- per-head outputs ------------------------------------------------------------------------------------------
    def head_outputs(self, l: int, z: torch.Tensor) -> torch.Tensor:
        """z [T, H*hd] (input of the output projection) -> per-head residual contributions [H, T, d]."""
        H, hd = self.n_heads, self.head_dim
        w = self.out_proj[l].weight
        zz = z.reshape(z.shape[0], H, hd).to(w.dtype)
        if self.conv1d[l]:  # weight [H*hd, d]
            return torch.einsum("thk,hkd->htd", zz, w.reshape(H, hd, -1))
        return torch.einsum("thk,dhk->htd", zz, w.reshape(w.shape[0], H, hd))

    # ---- parameters owned by nodes ---------------------------------------------------------------------------------
    def param_units(self) -> tuple[list[str], np.ndarray, list[list[int]], dict]:
        """Disjoint parameter units (name, n_params), which units each node owns, and unit -> parameter ranges.

        Units: ``L{l}.q{h}``, ``L{l}.o{h}``, ``L{l}.k{g}``, ``L{l}.v{g}`` (g = key-value group), ``L{l}.mlp``.
        Returns (unit names, unit sizes, per node the unit indices, {unit: [(param name, dim, start, stop), ...]}).
        Biases of q/k/v slices are included; the output-projection bias, q/k norms and the embeddings are not.
        """
        pname = {id(p): n for n, p in self.model.named_parameters()}
        params = dict(self.model.named_parameters())
        units, sizes, ranges = [], [], {}
        node_units: list[list[int]] = [[] for _ in self.nodes]
        H, KV, hd, d = self.n_heads, self.n_kv_heads, self.head_dim, self.d_model
        group = max(1, H // KV)

        def add(name, rngs):
            units.append(name)
            ranges[name] = rngs
            sizes.append(sum(_range_size(params, r) for r in rngs))
            return len(units) - 1

        for l in range(self.n_layers):
            att, op = self.attn[l], self.out_proj[l]
            qkv = [(n, m) for n, m in att.named_children() if _is_linear(m) and m is not op and _io(m)[0] == d]
            o_dim = 0 if self.conv1d[l] else 1
            parts = _qkv_ranges(qkv, pname, H, KV, hd, self.model_type)
            kv_units = {}
            for g in range(KV):
                kv_units[g] = [add(f"L{l}.k{g}", parts["k"](g)), add(f"L{l}.v{g}", parts["v"](g))]
            for h in range(H):
                uq = add(f"L{l}.q{h}", parts["q"](h))
                uo = add(f"L{l}.o{h}", [(pname[id(op.weight)], o_dim, h * hd, (h + 1) * hd)])
                node_units[self.head_node(l, h)] = [uq, uo, *kv_units[min(h // group, KV - 1)]]
            mlp_params = [(pname[id(p)], -1, 0, 0) for p in self.site.mlps[l].parameters()]
            node_units[self.mlp_node(l)] = [add(f"L{l}.mlp", mlp_params)]
        return units, np.asarray(sizes, dtype=np.int64), node_units, ranges

    def describe(self) -> dict:
        return {"model_type": self.model_type, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "d_model": self.d_model,
                "n_nodes": self.n_nodes, "n_edges": self.n_edges, "parallel_blocks": sum(self.parallel),
                "out_proj": type(self.out_proj[0]).__name__}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a.detach(), b.detach())))


def _range_size(params: dict, r) -> int:
    name, dim, start, stop = r
    p = params[name]
    if dim < 0:
        return p.numel()
    if p.dim() == 1:
        return stop - start
    return (stop - start) * (p.numel() // p.shape[dim])


def _qkv_ranges(qkv, pname, H, KV, hd, model_type):
    """Functions head -> parameter ranges of its q / k / v slices (separate or fused projections)."""
    def rows(m, start, stop):
        conv = type(m).__name__ == "Conv1D"
        out = [(pname[id(m.weight)], 1 if conv else 0, start, stop)]
        if getattr(m, "bias", None) is not None:
            out.append((pname[id(m.bias)], 0, start, stop))
        return out

    if len(qkv) == 1:
        m = qkv[0][1]
        if model_type in _FUSED_QKV_INTERLEAVED:  # [h: q, k, v] blocks of hd rows
            return {"q": lambda h: rows(m, 3 * h * hd, (3 * h + 1) * hd),
                    "k": lambda g: rows(m, (3 * g + 1) * hd, (3 * g + 2) * hd),
                    "v": lambda g: rows(m, (3 * g + 2) * hd, (3 * g + 3) * hd)}
        return {"q": lambda h: rows(m, h * hd, (h + 1) * hd),
                "k": lambda g: rows(m, H * hd + g * hd, H * hd + (g + 1) * hd),
                "v": lambda g: rows(m, (H + KV) * hd + g * hd, (H + KV) * hd + (g + 1) * hd)}
    by = {}
    for n, m in qkv:
        low = n.lower()
        for key, pats in (("q", ("q_proj", "query", "q")), ("k", ("k_proj", "key", "k")), ("v", ("v_proj", "value", "v"))):
            if low in pats or low.startswith(pats[0]) or low.startswith(pats[1]):
                by[key] = m
    if set(by) != {"q", "k", "v"}:
        log.warning("cannot identify q/k/v projections (%s); head parameters count only the output slice",
                    [n for n, _ in qkv])
        return {"q": lambda h: [], "k": lambda g: [], "v": lambda g: []}
    return {"q": lambda h: rows(by["q"], h * hd, (h + 1) * hd), "k": lambda g: rows(by["k"], g * hd, (g + 1) * hd),
            "v": lambda g: rows(by["v"], g * hd, (g + 1) * hd)}


# ---------------------------------------------------------------------------------------------------------------------
# hooks: record node activations, replace the embedding-node output, mean-ablate nodes
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Ablation:
    """Mean ablation: ``keep_head [L, H]`` / ``keep_mlp [L]`` (False = replaced by the mean) at positions
    ``>= first_pos``; with a leading batch dimension (``[R, L, H]`` / ``[R, L]``) row r of the batch gets pattern r."""

    keep_head: torch.Tensor  # [L, H] or [R, L, H] bool
    keep_mlp: torch.Tensor  # [L] or [R, L] bool
    mean_z: torch.Tensor  # [L, H*hd] mean input of the output projection
    mean_mlp: torch.Tensor  # [L, d] mean MLP output
    first_pos: int = 1  # ablate positions >= first_pos


@contextlib.contextmanager
def tap(graph: NodeGraph, rec: dict | None = None, emb: torch.Tensor | None = None, leaf: bool = False,
        ablation: Ablation | None = None):
    """Hooks for one forward: record ``blk_in{l}``, ``z{l}``, ``mlp_out{l}``, ``mlp_read{l}`` (residual read by the MLP)
    and ``final`` into ``rec``; replace the embedding-node output (block-0 input) by ``emb`` [1, T, d]; make it a
    leaf requiring grad (``leaf``); apply a mean ``ablation``. All hooks are removed on exit."""
    site, L, hd = graph.site, graph.n_layers, graph.head_dim
    handles = []
    put = (lambda k, v: rec.__setitem__(k, v)) if rec is not None else (lambda k, v: None)
    try:
        def blk_pre(l):
            def fn(m, args, kwargs):
                x = get_hidden(args, kwargs)
                new = None
                if l == 0 and emb is not None:
                    new = emb.to(device=x.device, dtype=x.dtype).expand_as(x)
                if l == 0 and leaf:
                    new = (new if new is not None else x).detach().requires_grad_(True)
                if new is not None:
                    put(f"blk_in{l}", new)
                    return replace_hidden(args, kwargs, new)
                put(f"blk_in{l}", x)
                return None
            return fn

        def z_pre(l):
            def fn(m, args):
                z = args[0]
                kh = None if ablation is None else ablation.keep_head[..., l, :]  # [H] or [R, H]
                if kh is not None and not bool(kh.all()):
                    mask = (~kh).repeat_interleave(hd, dim=-1).to(z.device)  # [H*hd] or [R, H*hd]
                    if mask.dim() == 2:
                        mask = mask[:, None, :]  # [R, 1, H*hd]
                    z = z.clone()
                    sl = z[:, ablation.first_pos:]
                    z[:, ablation.first_pos:] = torch.where(mask, ablation.mean_z[l].to(z.device, z.dtype), sl)
                put(f"z{l}", z)
                return (z, *args[1:]) if z is not args[0] else None
            return fn

        def mlp_post(l):
            def fn(m, args, out):
                o = _first(out)
                km = None if ablation is None else ablation.keep_mlp[..., l]  # [] or [R]
                if km is not None and not bool(km.all()):
                    o = o.clone()
                    rows = (~km).reshape(-1).to(o.device)
                    if rows.numel() == 1:
                        rows = rows.expand(o.shape[0])
                    o[rows, ablation.first_pos:] = ablation.mean_mlp[l].to(o.device, o.dtype)
                    put(f"mlp_out{l}", o)
                    return (o, *out[1:]) if isinstance(out, tuple) else o
                put(f"mlp_out{l}", o)
                return None
            return fn

        def norm_post(l):
            def fn(m, args, out):
                put(f"mlp_read{l}", args[0])
            return fn

        def mlp_pre(l):
            def fn(m, args, kwargs):
                put(f"mlp_read{l}", get_hidden(args, kwargs) if args or "hidden_states" in kwargs
                    else next(iter(kwargs.values())))
            return fn

        for l in range(L):
            handles.append(site.blocks[l].register_forward_pre_hook(blk_pre(l), with_kwargs=True))
            handles.append(graph.out_proj[l].register_forward_pre_hook(z_pre(l)))
            handles.append(site.mlps[l].register_forward_hook(mlp_post(l)))
            if graph.mlp_norm[l] is not None:
                handles.append(graph.mlp_norm[l].register_forward_hook(norm_post(l)))
            else:
                handles.append(site.mlps[l].register_forward_pre_hook(mlp_pre(l), with_kwargs=True))
        handles.append(site.blocks[L - 1].register_forward_hook(lambda m, a, o: put("final", _first(o))))
        yield rec
    finally:
        for h in handles:
            h.remove()


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def metric_value(logits: torch.Tensor, target_ids: list[int], prompt_len: int, kind: str) -> torch.Tensor:
    """logits [1, T, V] -> scalar metric (see module docstring)."""
    if kind == "target_logprob":
        logp = torch.log_softmax(_up(logits[0]), -1)
        pos = torch.arange(prompt_len - 1, prompt_len - 1 + len(target_ids), device=logits.device)
        return logp[pos, torch.tensor(target_ids, device=logits.device)].sum()
    row = _up(logits[0, prompt_len - 1])
    if kind == "logit":
        return row[target_ids[0]]
    return torch.log_softmax(row, -1)[target_ids[0]]


def _logits(model, ids: torch.Tensor, target_ids: list[int], kind: str) -> tuple[torch.Tensor, int]:
    """Forward returning logits of the scored positions only where the model supports ``logits_to_keep``; returns
    (logits [B, T', V], offset) with absolute position p at index p - offset."""
    T = ids.shape[1]
    keep = len(target_ids) if kind == "target_logprob" else 1
    try:
        out = model(input_ids=ids, use_cache=False, logits_to_keep=keep)
    except TypeError:
        out = model(input_ids=ids, use_cache=False)
    logits = out.logits
    return logits, T - logits.shape[1]


def _inputs(ids: list[int], target_ids: list[int], prompt_len: int, kind: str) -> list[int]:
    return ids[:prompt_len] + (target_ids[:-1] if kind == "target_logprob" else [])


# ---------------------------------------------------------------------------------------------------------------------
# edge attribution patching for one phrasing
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EdgeAttribution:
    """EAP of one phrasing: ``scores [E]`` (aligned with ``graph.edges``), metric clean / corrupted, and optionally
    the per-node output differences ``deltas [n_nodes-1, T, d]`` (upstream nodes) and input gradients
    ``grads [n_nodes-1, T, d]`` (downstream nodes, in node order 1..n-1)."""

    scores: torch.Tensor
    m_clean: float
    m_corrupt: float
    deltas: torch.Tensor | None = None
    grads: torch.Tensor | None = None


def clean_embedding(graph: NodeGraph, input_ids: list[int]) -> torch.Tensor:
    """The embedding-node output (block-0 input) of a sequence: [1, T, d]."""
    rec: dict = {}
    dev = graph.site.input_device()
    with torch.no_grad(), tap(graph, rec):
        graph.model(input_ids=torch.tensor([input_ids], device=dev), use_cache=False)
    return rec["blk_in0"].detach()


def _upstream_outputs(graph: NodeGraph, rec: dict) -> torch.Tensor:
    """Outputs of nodes 0..n-2 (emb, heads, MLPs) [n-1, T, d] from a record of one forward (batch 1)."""
    outs = [rec["blk_in0"][0].detach()]
    for l in range(graph.n_layers):
        outs.extend(graph.head_outputs(l, rec[f"z{l}"][0].detach()))
        outs.append(rec[f"mlp_out{l}"][0].detach())
    return torch.stack([_up(o) for o in outs])


def edge_attribution(graph: NodeGraph, input_ids: list[int], prompt_len: int, target_ids: list[int],
                     corrupt_emb: torch.Tensor, metric: str = "logprob", keep: bool = False) -> EdgeAttribution:
    """EAP scores of every edge for one sequence; ``corrupt_emb`` [1, T, d] is the embedding-node output of the
    corrupted run (``input_ids`` already include teacher-forced target tokens when ``metric='target_logprob'``)."""
    model, site, L, H, hd = graph.model, graph.site, graph.n_layers, graph.n_heads, graph.head_dim
    dev = site.input_device()
    ids = torch.tensor([input_ids], device=dev)
    with frozen(model):
        rc: dict = {}
        with torch.no_grad(), tap(graph, rc, emb=corrupt_emb):
            logits, off = _logits(model, ids, target_ids, metric)
            m_cor = float(metric_value(logits, target_ids, prompt_len - off, metric))
        a_cor = _upstream_outputs(graph, rc)
        del rc
        rec: dict = {}
        with torch.enable_grad():
            with tap(graph, rec, leaf=True):
                logits, off = _logits(model, ids, target_ids, metric)
            m = metric_value(logits, target_ids, prompt_len - off, metric)
            zs = [rec[f"z{l}"] for l in range(L)]
            mo = [rec[f"mlp_out{l}"] for l in range(L)]
            g_all = torch.autograd.grad(m, zs + mo + [rec["final"]], retain_graph=True, allow_unused=True)
            g_z, g_mo, g_final = g_all[:L], g_all[L:2 * L], g_all[2 * L]
            grads = []
            for l in range(L):
                x_in = rec[f"blk_in{l}"]
                gz = g_z[l] if g_z[l] is not None else torch.zeros_like(zs[l])
                cot = torch.zeros((H, *zs[l].shape), dtype=zs[l].dtype, device=zs[l].device)
                for h in range(H):
                    cot[h, ..., h * hd:(h + 1) * hd] = gz[..., h * hd:(h + 1) * hd]
                grads.extend(_up(g[0]) for g in _batched_vjp(zs[l], x_in, cot))
                gm = g_mo[l] if g_mo[l] is not None else torch.zeros_like(mo[l])
                gr = torch.autograd.grad(mo[l], rec[f"mlp_read{l}"], gm, retain_graph=True, allow_unused=True)[0]
                grads.append(_up((gr if gr is not None else torch.zeros_like(x_in))[0]))
            grads.append(_up(g_final[0]))
        a_clean = _upstream_outputs(graph, rec)
        del rec
    delta = a_cor - a_clean  # [n-1, T, d] upstream nodes 0..n-2
    G = torch.stack(grads).detach()  # [n-1, T, d] downstream nodes 1..n-1
    S = delta.flatten(1).double() @ G.flatten(1).double().T  # [n-1, n-1]: S[u, v-1]
    e = torch.as_tensor(graph.edges)
    scores = S[e[:, 0], e[:, 1] - 1]
    return EdgeAttribution(scores.cpu(), float(m.detach()), m_cor,
                           delta.cpu() if keep else None, G.cpu() if keep else None)


def _batched_vjp(out: torch.Tensor, inp: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
    """VJPs of ``out`` w.r.t. ``inp`` for a batch of cotangents cot [R, *out.shape] -> [R, *inp.shape]."""
    try:
        g = torch.autograd.grad(out, inp, cot, retain_graph=True, is_grads_batched=True, allow_unused=True)[0]
    except RuntimeError as e:  # an op without a batching rule: loop
        log.debug("batched VJP failed (%s); looping", str(e).splitlines()[0])
        parts = [torch.autograd.grad(out, inp, c, retain_graph=True, allow_unused=True)[0] for c in cot]
        g = None if any(x is None for x in parts) else torch.stack(parts)
    if g is None:
        return torch.zeros((cot.shape[0], *inp.shape), dtype=inp.dtype, device=inp.device)
    return g


# ---------------------------------------------------------------------------------------------------------------------
# mean ablation
# ---------------------------------------------------------------------------------------------------------------------
def node_means(graph: NodeGraph, sequences: list[list[int]], first_pos: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean output-projection input ``[L, H*hd]`` and mean MLP output ``[L, d]`` over all positions >= first_pos of
    the reference sequences (each position weighs the same)."""
    L = graph.n_layers
    sz = sm = None
    n = 0
    dev = graph.site.input_device()
    with torch.no_grad():
        for ids in sequences:
            if len(ids) <= first_pos:
                continue
            rec: dict = {}
            with tap(graph, rec):
                graph.model(input_ids=torch.tensor([ids], device=dev), use_cache=False)
            z = torch.stack([rec[f"z{l}"][0, first_pos:].double().sum(0) for l in range(L)]).cpu()
            mo = torch.stack([rec[f"mlp_out{l}"][0, first_pos:].double().sum(0) for l in range(L)]).cpu()
            sz = z if sz is None else sz + z
            sm = mo if sm is None else sm + mo
            n += len(ids) - first_pos
    if n == 0:
        raise DataError("no reference positions for mean ablation: every reference sequence is too short")
    return (sz / n).float(), (sm / n).float()


def ablated_metric(graph: NodeGraph, input_ids: list[int], prompt_len: int, target_ids: list[int], ablation: Ablation,
                   metric: str = "logprob") -> float | np.ndarray:
    """The metric with the ablated nodes' outputs replaced by their means (one value, or one per row of a batched
    ablation)."""
    dev = graph.site.input_device()
    batched = ablation.keep_head.dim() == 3
    R = ablation.keep_head.shape[0] if batched else 1
    ids = torch.tensor([input_ids], device=dev).expand(R, -1)
    with torch.no_grad(), tap(graph, None, ablation=ablation):
        logits, off = _logits(graph.model, ids, target_ids, metric)
    vals = [float(metric_value(logits[r:r + 1], target_ids, prompt_len - off, metric)) for r in range(R)]
    return np.asarray(vals) if batched else vals[0]


def stack_ablations(abls: list[Ablation]) -> Ablation:
    """One batched ablation (row r = abls[r]); all must share means and first_pos."""
    return Ablation(torch.stack([a.keep_head for a in abls]), torch.stack([a.keep_mlp for a in abls]),
                    abls[0].mean_z, abls[0].mean_mlp, abls[0].first_pos)


def circuit_nodes(graph: NodeGraph, edge_idx) -> np.ndarray:
    """bool [n_nodes]: nodes touched by the given edges."""
    keep = np.zeros(graph.n_nodes, dtype=bool)
    e = graph.edges[np.asarray(edge_idx, dtype=np.int64)]
    keep[e[:, 0]] = True
    keep[e[:, 1]] = True
    return keep


def make_ablation(graph: NodeGraph, keep_nodes: np.ndarray, mean_z, mean_mlp, first_pos: int) -> Ablation:
    L, H = graph.n_layers, graph.n_heads
    kh = torch.zeros(L, H, dtype=torch.bool)
    km = torch.zeros(L, dtype=torch.bool)
    for l in range(L):
        for h in range(H):
            kh[l, h] = bool(keep_nodes[graph.head_node(l, h)])
        km[l] = bool(keep_nodes[graph.mlp_node(l)])
    return Ablation(kh, km, mean_z, mean_mlp, first_pos)


# ---------------------------------------------------------------------------------------------------------------------
# phrasings of facts
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Phrasing:
    fact: int  # index of the fact in the audit
    text: str
    ids: list[int]  # prompt ids
    prompt_len: int
    target_ids: list[int]
    subject_span: tuple[int, int]  # token positions [start, stop)
    slot: int = 0  # index of this phrasing among the fact's phrasings (0 = the prompt)


def subject_span(tokenizer, ids: list[int], text: str, subject: str) -> tuple[int, int] | None:
    """Token positions [start, stop) covering ``subject`` in the prompt (via decoded prefix lengths)."""
    ends, prev = [], 0
    for k in range(len(ids)):
        prev = len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True))
        ends.append(prev)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    at = full.find(subject)
    if at < 0:
        at = full.find(subject.strip())
        if at < 0:
            return None
        subject = subject.strip()
    s, e = at, at + len(subject)
    starts = [0] + ends[:-1]
    toks = [k for k in range(len(ids)) if ends[k] > s and starts[k] < e and ends[k] > starts[k]]
    if not toks:
        return None
    return toks[0], toks[-1] + 1


def fact_rows(facts) -> list[dict]:
    """Facts as dicts {id, phrasings, target, subject, attribute, relation}: from a caploc Dataset (``meta['subject']``,
    ``meta['paraphrases']``) or from a sequence of objects with ``phrasings``/``target``/``subject`` (``audit.common.Fact``)."""
    rows = []
    for s in facts:
        if hasattr(s, "phrasings"):
            meta = dict(getattr(s, "meta", None) or {})
            rows.append({"id": str(s.id), "phrasings": list(s.phrasings), "target": s.target, "subject": s.subject,
                         "attribute": meta.get("attribute", s.target.strip()),
                         "relation": getattr(s, "relation", None) or meta.get("relation_id")})
        else:
            meta = dict(s.meta or {})
            rows.append({"id": str(s.id), "phrasings": [s.prompt, *list(meta.get("paraphrases") or [])],
                         "target": s.target, "subject": meta.get("subject"),
                         "attribute": meta.get("attribute", s.target.strip()),
                         "relation": meta.get("relation_id", s.group)})
    return rows


def _phrasings(tokenizer, rows: list[dict], cfg: CircuitConfig) -> tuple[list[Phrasing], list[int]]:
    from ..data.encode import encode_prompt

    out: list[Phrasing] = []
    used: list[int] = []
    for i, f in enumerate(rows):
        subject = f["subject"]
        if not subject:
            raise DataError(f"fact '{f['id']}' has no subject; knowledge circuits corrupt the subject tokens "
                            "(use the facts data set or give meta['subject'])")
        target = f["target"][1:] if cfg.chat and f["target"].startswith(" ") else f["target"]
        tids = [int(t) for t in tokenizer.encode(target, add_special_tokens=False)]
        if not tids:
            continue
        cand = []
        for slot, text in enumerate(f["phrasings"]):
            if len(cand) >= cfg.max_phrasings:
                break
            ids = encode_prompt(tokenizer, text, chat=cfg.chat)
            span = subject_span(tokenizer, ids, text, subject)
            if span is None:
                log.debug("subject %r not found in the tokens of %r; phrasing skipped", subject, text)
                continue
            cand.append(Phrasing(len(used), text, ids, len(ids), tids, span, slot))
        if len(cand) >= cfg.min_phrasings:
            out.extend(cand)
            used.append(i)
    return out, used


def _swap_embedding(graph, tokenizer, ph: Phrasing, subject: str, attribute: str, pool: list[tuple[str, str]],
                    rng: np.random.Generator, chat: bool) -> torch.Tensor | None:
    from ..data.encode import encode_prompt

    a, b = ph.subject_span
    order = rng.permutation(len(pool))
    for j in order:
        other, attr = pool[j]
        if other == subject or attr == attribute or subject not in ph.text:
            continue
        ids2 = encode_prompt(tokenizer, ph.text.replace(subject, other, 1), chat=chat)
        if len(ids2) == len(ph.ids) and ids2[:a] == ph.ids[:a] and ids2[b:] == ph.ids[b:] and ids2[a:b] != ph.ids[a:b]:
            return clean_embedding(graph, ids2 + ph.ids[len(ids2):])
    return None


# ---------------------------------------------------------------------------------------------------------------------
# the audit result
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class CircuitAudit:
    """Per-phrasing circuits of a set of facts with fidelity, reliability and size numbers.

    Tensors: ``top_edges [P, k]`` (indices into ``edges``, by decreasing |score|), ``top_scores [P, k]``,
    ``edges [E, 2]`` node indices, ``m_clean``/``m_corrupt``/``m_empty`` [P], ``ratio_circuit [P]``,
    ``ratio_random [P, R]`` (P_ablated / P_full of the first target token), ``unit_sizes [U]``.
    JSON: nodes, per node its parameter units, per phrasing its fact, text and corruption, the facts, config, meta.
    """

    nodes: list[str]
    edges: np.ndarray
    node_units: list[list[int]]
    unit_names: list[str]
    unit_sizes: np.ndarray
    unit_ranges: dict
    phrasing_fact: np.ndarray  # [P] index into ``facts`` (the audited facts)
    phrasing_slot: np.ndarray  # [P] index of the phrasing among its fact's phrasings
    phrasing_text: list[str]
    phrasing_corruption: list[str]
    facts: list[dict]  # audited facts: id, subject, attribute, relation_id, input_index, n_phrasings
    top_edges: np.ndarray
    top_scores: np.ndarray
    m_clean: np.ndarray
    m_corrupt: np.ndarray
    m_empty: np.ndarray
    ratio_circuit: np.ndarray
    ratio_random: np.ndarray
    total_params: int
    config: dict
    meta: dict = field(default_factory=dict)
    n_input_facts: int | None = None  # facts passed in (some may have been skipped)

    # ---- derived sets --------------------------------------------------------------------------------------------
    @property
    def n_phrasings(self) -> int:
        return len(self.phrasing_text)

    def edge_sets(self) -> list[np.ndarray]:
        return [np.sort(r) for r in self.top_edges]

    def node_sets(self) -> list[np.ndarray]:
        out = []
        for r in self.top_edges:
            e = self.edges[r]
            out.append(np.unique(np.concatenate([e[:, 0], e[:, 1]])))
        return out

    def unit_sets(self, node_sets: list[np.ndarray] | None = None) -> list[np.ndarray]:
        ns = self.node_sets() if node_sets is None else node_sets
        return [np.unique(np.asarray([u for n in s for u in self.node_units[int(n)]], dtype=np.int64)) for s in ns]

    @property
    def universe(self) -> dict[str, int]:
        """{parameter unit: parameter count} of every head / MLP unit (for random-set baselines)."""
        return {n: int(w) for n, w in zip(self.unit_names, self.unit_sizes)}

    @property
    def param_sets(self) -> list[list[dict[str, int] | None]]:
        """Per INPUT fact, per phrasing: the circuit's parameter units {unit: parameter count} (None where a fact or
        phrasing was not audited). See :func:`param_sets`."""
        return param_sets(self)

    def param_share(self) -> np.ndarray:
        return np.array([self.unit_sizes[u].sum() / self.total_params for u in self.unit_sets()])

    # ---- fidelity ------------------------------------------------------------------------------------------------
    def _pairs(self):
        f = self.phrasing_fact
        same, rel, other = [], [], []
        rels = [self.facts[int(i)]["relation_id"] for i in f]
        for i, j in itertools.combinations(range(self.n_phrasings), 2):
            if f[i] == f[j]:
                same.append((i, j))
            elif rels[i] == rels[j]:
                rel.append((i, j))
            else:
                other.append((i, j))
        return same, rel, other

    def fidelity(self, seed: int = 0, n_draws: int | None = None) -> dict:
        """Pairwise IoU of edge / node / parameter sets: paraphrases of one fact (per fact mean, then mean over
        facts with a bootstrap CI) vs phrasings of different facts (same relation, other relations) vs random sets
        of the same size (edges: exact expectation; nodes / parameters: random edge sets of the same size)."""
        from ..stats import bootstrap_ci, expected_random_agreement

        es, ns = self.edge_sets(), self.node_sets()
        us = self.unit_sets(ns)
        w = self.unit_sizes.astype(np.float64)
        fns = {"edge_iou": lambda i, j: _iou(es[i], es[j]), "node_iou": lambda i, j: _iou(ns[i], ns[j]),
               "param_iou": lambda i, j: _wiou(us[i], us[j], w)}
        same, rel, other = self._pairs()
        rng = np.random.default_rng(seed)
        if len(rel) > 2000:
            rel = [rel[k] for k in rng.choice(len(rel), 2000, replace=False)]
        if len(other) > 2000:
            other = [other[k] for k in rng.choice(len(other), 2000, replace=False)]
        out: dict[str, Any] = {"n_facts": len(self.facts), "n_phrasings": self.n_phrasings,
                               "n_pairs": {"paraphrase": len(same), "same_relation": len(rel), "other_relation": len(other)}}
        E, k = len(self.edges), self.top_edges.shape[1]
        n_draws = n_draws or int(self.config.get("fidelity_draws", 200))
        rnd_nodes, rnd_params = [], []
        for _ in range(n_draws):
            a, b = rng.choice(E, k, replace=False), rng.choice(E, k, replace=False)
            na, nb = self._nodes_of(a), self._nodes_of(b)
            rnd_nodes.append(_iou(na, nb))
            ua, ub = self.unit_sets([na, nb])
            rnd_params.append(_wiou(ua, ub, w))
        chance = {"edge_iou": expected_random_agreement([k], [k], E)["iou"], "node_iou": float(np.mean(rnd_nodes)),
                  "param_iou": float(np.mean(rnd_params))}
        for name, fn in fns.items():
            per_fact: dict[int, list[float]] = {}
            for i, j in same:
                per_fact.setdefault(int(self.phrasing_fact[i]), []).append(fn(i, j))
            vals = np.array([np.mean(v) for v in per_fact.values()])
            est, lo, hi = bootstrap_ci(vals, seed=seed) if len(vals) else (float("nan"),) * 3
            rel_v = np.array([fn(i, j) for i, j in rel]) if rel else np.array([])
            oth_v = np.array([fn(i, j) for i, j in other]) if other else np.array([])
            out[name] = {
                "paraphrase": est, "ci": [lo, hi], "per_fact": vals.tolist(),
                "same_relation_other_fact": float(rel_v.mean()) if rel_v.size else float("nan"),
                "other_relation": float(oth_v.mean()) if oth_v.size else float("nan"),
                "random_same_size": chance[name],
            }
        return out

    def _nodes_of(self, edge_idx) -> np.ndarray:
        e = self.edges[edge_idx]
        return np.unique(np.concatenate([e[:, 0], e[:, 1]]))

    # ---- reliability ---------------------------------------------------------------------------------------------
    def reliability(self, threshold: float = 0.5, seed: int = 0) -> dict:
        from ..stats import bootstrap_ci

        rc = self.ratio_circuit
        rr = self.ratio_random
        re = np.exp(self.m_empty - self.m_clean) if self.config.get("metric") != "logit" else np.full_like(rc, np.nan)
        out = {"threshold": threshold, "n_phrasings": int(len(rc))}
        for name, v in (("circuit", rc), ("random", rr.mean(1)), ("empty", re)):
            est, lo, hi = bootstrap_ci(v, seed=seed)
            out[name] = {"mean_ratio": est, "ci": [lo, hi], "median_ratio": float(np.nanmedian(v))}
        for name, v in (("circuit", rc[:, None]), ("random", rr), ("empty", re[:, None])):
            share = (v >= threshold).mean(1)
            est, lo, hi = bootstrap_ci(share, seed=seed)
            out[name]["share_keeps"] = est
            out[name]["share_keeps_ci"] = [lo, hi]
        return out

    # ---- size ----------------------------------------------------------------------------------------------------
    def size(self) -> dict:
        ns = self.node_sets()
        n_nodes = len(self.nodes) - 2  # heads + MLPs (emb / logits are always there)
        inner = [int(np.sum((s > 0) & (s < len(self.nodes) - 1))) for s in ns]
        ps = self.param_share()
        return {"top_k_edges": int(self.top_edges.shape[1]), "n_edges": int(len(self.edges)),
                "edge_share": self.top_edges.shape[1] / len(self.edges),
                "nodes_mean": float(np.mean(inner)), "node_share_mean": float(np.mean(inner)) / n_nodes,
                "param_share_mean": float(ps.mean()), "param_share_min": float(ps.min()), "param_share_max": float(ps.max())}

    # ---- report ----------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"fidelity": self.fidelity(seed=int(self.config.get("seed", 0))), "reliability": self.reliability(),
                "size": self.size(), "m_clean_mean": float(self.m_clean.mean()),
                "m_corrupt_mean": float(self.m_corrupt.mean()),
                "corruptions": {c: self.phrasing_corruption.count(c) for c in sorted(set(self.phrasing_corruption))}}

    def report(self, out_dir: Path | str | None = None) -> dict:
        """The report.json contract dict; figures are written into ``out_dir`` when given."""
        s = self.summary()
        fid, rel, size = s["fidelity"], s["reliability"], s["size"]
        k = size["top_k_edges"]
        rows = []
        for name in ("edge_iou", "node_iou", "param_iou"):
            f = fid[name]
            rows.append([name, _r(f["paraphrase"]), f"[{_r(f['ci'][0])}, {_r(f['ci'][1])}]",
                         _r(f["same_relation_other_fact"]), _r(f["other_relation"]), _r(f["random_same_size"])])
        rel_rows = [[name, _r(rel[name]["mean_ratio"]), f"[{_r(rel[name]['ci'][0])}, {_r(rel[name]['ci'][1])}]",
                     _r(rel[name]["median_ratio"]), _r(rel[name]["share_keeps"]),
                     f"[{_r(rel[name]['share_keeps_ci'][0])}, {_r(rel[name]['share_keeps_ci'][1])}]"]
                    for name in ("circuit", "random", "empty")]
        figures = []
        if out_dir is not None:
            figures = self._figures(Path(out_dir), fid, rel)
        m = self.meta
        text = [
            f"Knowledge circuits by edge attribution patching on {m.get('model_id', '?')}: {fid['n_facts']} facts, "
            f"{fid['n_phrasings']} phrasings, circuit = top {k} of {size['n_edges']} edges by |EAP score| "
            f"({100 * size['edge_share']:.2f}% of edges, {size['nodes_mean']:.0f} nodes on average = "
            f"{100 * size['node_share_mean']:.1f}% of heads+MLPs, {100 * size['param_share_mean']:.1f}% of parameters).",
            f"Corruption: {self.config.get('corrupt')} (used: {s['corruptions']}); metric {self.config.get('metric')}: "
            f"clean {s['m_clean_mean']:.3f}, corrupted {s['m_corrupt_mean']:.3f} (means over phrasings).",
            "Fidelity: do a fact's paraphrases get the same circuit? Compare the paraphrase IoU with phrasings of "
            "different facts (if they are as similar, the circuit follows the prompt type, not the fact) and with "
            "random sets of the same size.",
            "Reliability (node-level mean ablation; edges are not ablated individually): P(first target token) with "
            "every head/MLP outside the circuit replaced by its mean, relative to the full model; random = node sets "
            "with the same numbers of heads and MLPs; empty = every head and MLP ablated.",
        ]
        claims = {
            "circuit_edge_iou": {"value": fid["edge_iou"]["paraphrase"], "ci": fid["edge_iou"]["ci"],
                                 "chance": fid["edge_iou"]["random_same_size"]},
            "circuit_param_iou": {"value": fid["param_iou"]["paraphrase"], "ci": fid["param_iou"]["ci"],
                                  "chance": fid["param_iou"]["random_same_size"]},
            "circuit_reliability_share": {"value": rel["circuit"]["share_keeps"], "ci": rel["circuit"]["share_keeps_ci"],
                                          "chance": rel["random"]["share_keeps"]},
            "circuit_param_share": {"value": size["param_share_mean"]},
        }
        return {
            "kind": "audit_circuits", "title": "Individual-knowledge audit: knowledge circuits (EAP)", "text": text,
            "tables": [
                {"title": "Circuit fidelity between phrasings (IoU)",
                 "columns": ["set", "paraphrases (same fact)", "95% CI", "same relation, other fact",
                             "other relation", "random same size"], "rows": rows,
                 "note": f"bootstrap over facts ({fid['n_facts']}); pairs: {fid['n_pairs']}"},
                {"title": f"Circuit reliability: P_circuit / P_full (share keeping >= {rel['threshold']:.0%})",
                 "columns": ["circuit", "mean ratio", "95% CI", "median", "share keeps", "95% CI"], "rows": rel_rows,
                 "note": f"{rel['n_phrasings']} phrasings; random: {self.ratio_random.shape[1]} draws per phrasing"},
                {"title": "Circuit size", "columns": list(size), "rows": [[_r(v) for v in size.values()]]},
            ],
            "figures": figures, "claims": claims,
        }

    def _figures(self, out_dir: Path, fid: dict, rel: dict) -> list[dict]:
        from ..report.figures import bars_with_ci

        figs = []
        try:
            labels, vals, lo, hi = [], [], [], []
            for name in ("edge_iou", "param_iou"):
                f = fid[name]
                labels += [f"{name}: paraphrase", f"{name}: same rel.", f"{name}: random"]
                vals += [f["paraphrase"], f["same_relation_other_fact"], f["random_same_size"]]
                lo += [f["ci"][0], f["same_relation_other_fact"], f["random_same_size"]]
                hi += [f["ci"][1], f["same_relation_other_fact"], f["random_same_size"]]
            bars_with_ci(labels, vals, lo, hi, out_dir / "fig_circuit_fidelity.png", title="Circuit IoU between phrasings",
                         ylabel="IoU")
            figs.append({"title": "Circuit fidelity", "file": "fig_circuit_fidelity.png",
                         "caption": "IoU of circuits between paraphrases of one fact (95% bootstrap CI over facts), "
                                    "between phrasings of different facts of the same relation, and of random sets."})
            labels = ["circuit", "random nodes", "empty"]
            bars_with_ci(labels, [rel[n]["share_keeps"] for n in ("circuit", "random", "empty")],
                         [rel[n]["share_keeps_ci"][0] for n in ("circuit", "random", "empty")],
                         [rel[n]["share_keeps_ci"][1] for n in ("circuit", "random", "empty")],
                         out_dir / "fig_circuit_reliability.png", ylabel=f"share with P ratio >= {rel['threshold']}",
                         title="Circuit alone keeps the answer")
            figs.append({"title": "Circuit reliability", "file": "fig_circuit_reliability.png",
                         "caption": "Share of phrasings whose P(target) keeps at least half its full-model value with "
                                    "only the circuit's nodes intact (others mean-ablated)."})
        except Exception as e:  # a figure never sinks the result
            log.warning("circuit figures not written: %s", str(e).splitlines()[0])
        return figs

    # ---- save / load -----------------------------------------------------------------------------------------------
    def save(self, out_dir: Path | str, report: bool = True) -> Path:
        """Write ``circuits.safetensors`` + ``circuits.json`` (+ ``report.json`` and figures) atomically."""
        out_dir = Path(out_dir)
        t = {
            "edges": torch.from_numpy(np.ascontiguousarray(self.edges, dtype=np.int64)),
            "top_edges": torch.from_numpy(np.ascontiguousarray(self.top_edges, dtype=np.int64)),
            "top_scores": torch.from_numpy(np.ascontiguousarray(self.top_scores, dtype=np.float32)),
            "phrasing_fact": torch.from_numpy(np.ascontiguousarray(self.phrasing_fact, dtype=np.int64)),
            "phrasing_slot": torch.from_numpy(np.ascontiguousarray(self.phrasing_slot, dtype=np.int64)),
            "unit_sizes": torch.from_numpy(np.ascontiguousarray(self.unit_sizes, dtype=np.int64)),
        }
        for k in ("m_clean", "m_corrupt", "m_empty", "ratio_circuit", "ratio_random"):
            t[k] = torch.from_numpy(np.ascontiguousarray(getattr(self, k), dtype=np.float64))
        atomic_save_tensors(out_dir / "circuits.safetensors", t)
        js = {"kind": "circuit_audit", "caploc_version": __version__, "nodes": self.nodes, "node_units": self.node_units,
              "unit_names": self.unit_names, "unit_ranges": self.unit_ranges, "phrasing_text": self.phrasing_text,
              "phrasing_corruption": self.phrasing_corruption, "facts": self.facts, "total_params": self.total_params, "n_input_facts": self.n_input_facts,
              "config": self.config, "meta": self.meta}
        atomic_write_json(out_dir / "circuits.json", js)
        if report:
            atomic_write_json(out_dir / "report.json", self.report(out_dir))
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> "CircuitAudit":
        from ..results import read_result

        js, t = read_result(out_dir, "circuits.json", "circuit_audit", "circuit audit", "circuits.safetensors")
        t = {k: v.numpy() for k, v in t.items()}
        return cls(nodes=js["nodes"], edges=t["edges"], node_units=js["node_units"], unit_names=js["unit_names"],
                   unit_sizes=t["unit_sizes"], unit_ranges={k: [tuple(r) for r in v] for k, v in js["unit_ranges"].items()},
                   phrasing_fact=t["phrasing_fact"], phrasing_slot=t["phrasing_slot"], phrasing_text=js["phrasing_text"],
                   phrasing_corruption=js["phrasing_corruption"], facts=js["facts"], top_edges=t["top_edges"],
                   top_scores=t["top_scores"], m_clean=t["m_clean"], m_corrupt=t["m_corrupt"], m_empty=t["m_empty"],
                   ratio_circuit=t["ratio_circuit"], ratio_random=t["ratio_random"],
                   total_params=int(js["total_params"]), config=js["config"], meta=js["meta"],
                   n_input_facts=js.get("n_input_facts"))


def _iou(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.size + b.size == 0:
        return float("nan")
    x = np.intersect1d(a, b).size
    return x / (a.size + b.size - x)


def _wiou(a, b, w: np.ndarray) -> float:
    """Weighted IoU of two sets of unit indices with unit weights ``w``."""
    inter = np.intersect1d(a, b)
    union = np.union1d(a, b)
    den = float(w[union].sum())
    return float(w[inter].sum()) / den if den > 0 else float("nan")


def _r(v, nd: int = 4):
    if isinstance(v, (float, np.floating)):
        return round(float(v), nd) if math.isfinite(v) else None
    return v


# ---------------------------------------------------------------------------------------------------------------------
# parameter sets for the common audit metric
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ParamSet:
    """A set of parameter entries: per parameter name a list of ``(dim, start, stop)`` slices (``dim = -1``: the whole
    tensor). ``shapes`` gives each named parameter's shape so sets from different methods can be intersected."""

    ranges: dict[str, list[tuple[int, int, int]]]
    shapes: dict[str, tuple[int, ...]]

    def masks(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, rs in self.ranges.items():
            m = torch.zeros(self.shapes[name], dtype=torch.bool)
            for dim, a, b in rs:
                if dim < 0:
                    m[...] = True
                else:
                    m.narrow(dim, a, b - a).fill_(True)
            out[name] = m
        return out

    def n_params(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks().values()))

    def iou(self, other: "ParamSet") -> float:
        """Element-level IoU (parameters counted once each)."""
        a, b = self.masks(), other.masks()
        inter = union = 0
        for name in set(a) | set(b):
            ma, mb = a.get(name), b.get(name)
            if ma is None:
                union += int(mb.sum())
            elif mb is None:
                union += int(ma.sum())
            else:
                inter += int((ma & mb).sum())
                union += int((ma | mb).sum())
        return inter / union if union else float("nan")


def param_sets(audit: CircuitAudit) -> list[list[dict[str, int] | None]]:
    """The common-metric localization of every phrasing: per INPUT fact (in the order given to
    :func:`audit_circuits`), per phrasing, the parameter units its circuit's nodes own as {unit: parameter count}
    (None for facts / phrasings that were not audited). Units are disjoint, so the parameter-weighted IoU of two such
    dicts is the element-level IoU of the parameter sets (``audit.common.weighted_iou``)."""
    n_in = audit.n_input_facts if audit.n_input_facts is not None else len(audit.facts)
    out: list[list[dict[str, int] | None] | None] = [None] * n_in
    for f in audit.facts:
        out[int(f.get("input_index", audit.facts.index(f)))] = [None] * int(f.get("n_phrasings", 0) or 0)
    for i, us in enumerate(audit.unit_sets()):
        f = audit.facts[int(audit.phrasing_fact[i])]
        row = out[int(f.get("input_index", audit.phrasing_fact[i]))]
        slot = int(audit.phrasing_slot[i])
        while len(row) <= slot:
            row.append(None)
        row[slot] = {audit.unit_names[int(u)]: int(audit.unit_sizes[int(u)]) for u in us}
    return [r if r is not None else [] for r in out]


def param_ranges(audit: CircuitAudit, shapes: dict[str, tuple[int, ...]] | None = None) -> list[ParamSet]:
    """Per audited phrasing (aligned with ``audit.phrasing_text``) the circuit's parameters as slices of named
    parameter tensors, for element-level comparison with other localizations. ``shapes`` defaults to the shapes
    recorded in the audit (``meta['param_shapes']``)."""
    shapes = shapes or {k: tuple(v) for k, v in audit.meta.get("param_shapes", {}).items()}
    out = []
    for us in audit.unit_sets():
        ranges: dict[str, list[tuple[int, int, int]]] = {}
        for u in us:
            for name, dim, a, b in audit.unit_ranges[audit.unit_names[int(u)]]:
                ranges.setdefault(name, []).append((int(dim), int(a), int(b)))
        missing = [n for n in ranges if n not in shapes]
        if missing:
            raise CaplocError(f"parameter shapes unknown for {missing[:3]}; pass shapes from model.named_parameters()")
        out.append(ParamSet(ranges, {n: shapes[n] for n in ranges}))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the audit
# ---------------------------------------------------------------------------------------------------------------------
def audit_circuits(lm, facts, cfg: CircuitConfig | None = None, progress: bool | None = None) -> CircuitAudit:
    """Build a circuit for every phrasing of every fact (prompt + paraphrases) and measure fidelity, reliability and
    size. ``lm``: a LoadedModel; ``facts``: a Dataset with ``meta['subject']`` and ``meta['paraphrases']``, or a
    sequence of ``audit.common.Fact`` (phrasings, target, subject, relation). Facts with fewer than
    ``cfg.min_phrasings`` phrasings in which the subject is found are skipped; at most ``cfg.max_phrasings`` per fact."""
    from tqdm.auto import tqdm

    cfg = cfg or CircuitConfig()
    t0 = time.time()
    model, tok = lm.model, lm.tokenizer
    graph = NodeGraph(model, lm.site)
    rows = fact_rows(facts)
    phr, used = _phrasings(tok, rows, cfg)
    if not used:
        raise DataError(f"no fact of '{getattr(facts, 'name', '?')}' has {cfg.min_phrasings} usable phrasings "
                        "(prompt + meta['paraphrases'] with the subject found in the tokens); use the facts data set")
    if cfg.top_k > graph.n_edges:
        raise CaplocError(f"top_k={cfg.top_k} exceeds the {graph.n_edges} edges of this model; lower --top-k")
    log.info("circuits: %d facts, %d phrasings, %d nodes, %d edges", len(used), len(phr), graph.n_nodes, graph.n_edges)
    first = 1 if cfg.keep_first_position else 0
    kind = cfg.metric
    seqs = [_inputs(p.ids, p.target_ids, p.prompt_len, kind) for p in phr]

    # clean embeddings; noise sd from the subject tokens of all phrasings
    embs = [clean_embedding(graph, s) for s in seqs]
    subj = torch.cat([e[0, p.subject_span[0]:p.subject_span[1]].float().flatten() for e, p in zip(embs, phr)])
    sigma = float(subj.std())
    pool = [(f["subject"], f["attribute"]) for f in rows]
    mean_z, mean_mlp = node_means(graph, seqs, first)
    L, H = graph.n_layers, graph.n_heads
    empty = make_ablation(graph, np.zeros(graph.n_nodes, dtype=bool), mean_z, mean_mlp, first)
    rng = np.random.default_rng(cfg.seed)
    head_nodes = np.array([graph.head_node(l, h) for l in range(L) for h in range(H)])
    mlp_nodes = np.array([graph.mlp_node(l) for l in range(L)])

    k = cfg.top_k
    P = len(phr)
    top_e = np.zeros((P, k), dtype=np.int64)
    top_s = np.zeros((P, k), dtype=np.float32)
    m_clean, m_cor, m_emp = np.zeros(P), np.zeros(P), np.zeros(P)
    r_circ, r_rand = np.zeros(P), np.zeros((P, cfg.random_draws))
    corr_used = []
    bar = tqdm(total=P, desc="circuits (EAP)", unit="phrasing", leave=False,
               disable=progress is False if progress is not None else None)
    for i, (p, seq, emb) in enumerate(zip(phr, seqs, embs)):
        cemb = None
        if cfg.corrupt == "swap":
            f = rows[used[p.fact]]
            cemb = _swap_embedding(graph, tok, p, f["subject"], f["attribute"], pool,
                                   np.random.default_rng([cfg.seed, i]), cfg.chat)
        if cemb is None:
            g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + i)
            noise = torch.randn(emb.shape, generator=g, dtype=torch.float32) * (cfg.noise_scale * sigma)
            mask = torch.zeros(emb.shape[1], 1)
            mask[p.subject_span[0]:p.subject_span[1]] = 1.0
            cemb = emb + (noise * mask).to(emb.device, emb.dtype)
            corr_used.append("noise")
        else:
            corr_used.append("swap")
        ea = edge_attribution(graph, seq, p.prompt_len, p.target_ids, cemb, kind)
        order = torch.argsort(ea.scores.abs(), descending=True)[:k]
        top_e[i], top_s[i] = order.numpy(), ea.scores[order].numpy()
        m_clean[i], m_cor[i] = ea.m_clean, ea.m_corrupt
        keep = circuit_nodes(graph, top_e[i])
        nh, nm = int(keep[head_nodes].sum()), int(keep[mlp_nodes].sum())
        abls = [make_ablation(graph, keep, mean_z, mean_mlp, first), empty]
        for r in range(cfg.random_draws):
            rk = np.zeros(graph.n_nodes, dtype=bool)
            rk[rng.choice(head_nodes, nh, replace=False)] = True
            rk[rng.choice(mlp_nodes, nm, replace=False)] = True
            abls.append(make_ablation(graph, rk, mean_z, mean_mlp, first))
        vals = np.concatenate([ablated_metric(graph, seq, p.prompt_len, p.target_ids, stack_ablations(abls[b:b + 16]), kind)
                               for b in range(0, len(abls), 16)])
        r_circ[i] = _ratio(vals[0], ea.m_clean, kind)
        m_emp[i] = vals[1]
        r_rand[i] = [_ratio(v, ea.m_clean, kind) for v in vals[2:]]
        bar.update(1)
    bar.close()

    units, sizes, node_units, ranges = graph.param_units()
    audited = [{"id": rows[i]["id"], "subject": rows[i]["subject"], "attribute": rows[i]["attribute"],
                "relation_id": rows[i]["relation"], "target": rows[i]["target"], "input_index": i,
                "n_phrasings": len(rows[i]["phrasings"])} for i in used]
    meta = {
        "model_id": lm.info.get("model_id"), "model_fingerprint": lm.info.get("fingerprint"),
        "graph": graph.describe(), "dataset": getattr(facts, "name", None),
        "dataset_fingerprint": facts.fingerprint() if hasattr(facts, "fingerprint") else None,
        "dataset_source": getattr(facts, "source", None), "noise_sigma": sigma, "seconds": round(time.time() - t0, 1),
        "param_shapes": {n: list(p.shape) for n, p in model.named_parameters()},
        "ablation": "node-level mean ablation" + (" (position 0 kept)" if first else ""),
    }
    res = CircuitAudit(
        nodes=graph.nodes, edges=graph.edges, node_units=node_units, unit_names=units, unit_sizes=sizes,
        unit_ranges=ranges, phrasing_fact=np.array([p.fact for p in phr], dtype=np.int64),
        phrasing_slot=np.array([p.slot for p in phr], dtype=np.int64),
        phrasing_text=[p.text for p in phr], phrasing_corruption=corr_used, facts=audited, top_edges=top_e,
        top_scores=top_s, m_clean=m_clean, m_corrupt=m_cor, m_empty=m_emp, ratio_circuit=r_circ, ratio_random=r_rand,
        total_params=int(sum(p.numel() for p in model.parameters())), config=cfg.to_dict(), meta=meta,
        n_input_facts=len(rows),
    )
    log.info("circuits done in %.1f s", time.time() - t0)
    return res


def _ratio(m_abl: float, m_full: float, kind: str) -> float:
    """P_ablated / P_full for log-prob metrics; for the raw logit metric the difference of logits is returned."""
    if kind == "logit":
        return m_abl - m_full
    return float(math.exp(m_abl - m_full))


__all__ = [
    "CircuitConfig", "NodeGraph", "EdgeAttribution", "edge_attribution", "Ablation", "node_means", "ablated_metric",
    "make_ablation", "stack_ablations", "circuit_nodes", "tap", "metric_value", "CircuitAudit", "ParamSet", "param_sets", "param_ranges", "fact_rows",
    "audit_circuits", "subject_span", "clean_embedding",
]
