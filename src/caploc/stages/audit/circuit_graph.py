"""The node graph of knowledge circuits: nodes, edges, per-head outputs and the parameters each node owns.

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
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from ...blocks import get_hidden, replace_hidden
from ...errors import ArchitectureError
from ...hooks import frozen

log = logging.getLogger(__name__)

# fused q/k/v projections whose rows are interleaved per head ([h: q, k, v]) rather than stacked ([q | k | v]);
# only used to attribute parameters to heads for the size / parameter-IoU numbers
_FUSED_QKV_INTERLEAVED = {"gpt_neox"}


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _io(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or HF Conv1D (weight [in, out])."""
    w = m.weight
    return (int(w.shape[0]), int(w.shape[1])) if type(m).__name__ == "Conv1D" else (int(w.shape[1]), int(w.shape[0]))


def first_output(out):
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
                    rec[key] = (args[0] if args else next(iter(kwargs.values())), first_output(out))
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
        nodes = [("emb", "emb", -1, -1)]
        for l in range(L):
            nodes += [(f"L{l}.H{h}", "head", l, h) for h in range(H)]
            nodes.append((f"L{l}.MLP", "mlp", l, -1))
        nodes.append(("logits", "logits", L, -1))
        names, kind, layer, head = (list(col) for col in zip(*nodes))
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
