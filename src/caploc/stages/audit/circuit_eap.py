"""Edge attribution patching (EAP) and mean ablation on a :class:`~caploc.stages.audit.circuit_graph.NodeGraph`.

EAP (Syed et al. 2023; Hanna et al. 2024). ``score(u -> v) = sum_pos (a_u^corrupt - a_u^clean) . dm/d(in_v)``, the
first-order estimate of how much the metric ``m`` changes when only the edge ``u -> v`` carries ``u``'s corrupted
output. ``dm/d(in_v)`` is the gradient with respect to the residual stream *as read by v alone*: for a head, the
vector-Jacobian product of the attention output-projection input, restricted to that head's slice, back to the block
input (through the attention norm and that head's q/k/v); for an MLP, the VJP of its output back to the input of the
norm that feeds it; for the logits, the gradient at the last block's output. One clean forward with gradients, one
corrupted forward without, one backward, and one batched VJP per layer.

Metric: ``logprob`` (default) = log P(first target token | prompt); ``logit`` = its raw logit (with a model whose
nodes are linear this makes EAP exact; used by the tests); ``target_logprob`` = the summed log-probability of all
target tokens, teacher-forced.

Mean ablation (reliability): a node's output is replaced by its mean over reference sequences at the positions
>= ``first_pos``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ...blocks import get_hidden, replace_hidden
from ...errors import DataError
from ...hooks import frozen
from .circuit_graph import NodeGraph, first_output

log = logging.getLogger(__name__)


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
                o = first_output(out)
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
        handles.append(site.blocks[L - 1].register_forward_hook(lambda m, a, o: put("final", first_output(o))))
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


def metric_inputs(ids: list[int], target_ids: list[int], prompt_len: int, kind: str) -> list[int]:
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
