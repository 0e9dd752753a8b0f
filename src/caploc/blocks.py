"""Running a model's blocks for a batch of rows that enter at different layers.

Used by the attribution engine (a row that scales layer l enters at l) and by causal tracing (a row that restores
layer l enters at l): blocks below a row's layer would only recompute what a recorded run already computed. Block
``j`` computes the first ``n_at[j]`` rows (rows sorted by their entering layer); entering rows are concatenated from
the recorded output of the block below; a block no row has reached returns its recorded output. Only the blocks'
``forward`` is shadowed (an instance attribute, put back afterwards -- also accelerate's device-moving wrapper), so
every architecture whose decoder layers take the hidden state as their first argument (or ``hidden_states=``) works.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import types
from collections.abc import Callable

import torch

from .models.layouts import Site


def hidden_of(out) -> torch.Tensor:
    """The hidden-state tensor of a block's output (a tensor, or a tuple whose first item it is)."""
    return out if torch.is_tensor(out) else out[0]


def get_hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def replace_hidden(args, kwargs, new):
    if args:
        return (new, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = new
    return args, kwargs


def rows_of(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo..hi-1`` of a per-row tensor, or of a batch-1 tensor shared by every row (a broadcast view)."""
    return t[lo:hi] if t.shape[0] > 1 else t.expand(hi - lo, *t.shape[1:])


def _enter_rows(forward, n: int, prev: int, src, entry, *args, **kwargs):
    """Block forward over the first ``n`` rows: the ``prev`` rows already running plus rows ``prev..n-1`` entering here
    from ``src``, this block's recorded input. With ``prev == 0`` the incoming hidden state is that input itself, or
    ``entry`` (per-row inputs of the first block) when given."""
    h = get_hidden(args, kwargs)
    if prev == 0:
        x = rows_of(entry if entry is not None else h, 0, n)
    elif n > prev:
        x = torch.cat([h, rows_of(src, prev, n)])
    else:
        x = h
    args, kwargs = replace_hidden(args, kwargs, x)
    return forward(*args, **kwargs)


@contextlib.contextmanager
def staggered_blocks(site: Site, output: Callable[[int], object], n_at: list[int], entry: torch.Tensor | None = None):
    """Block ``j`` computes only the first ``n_at[j]`` rows (non-decreasing in j); rows enter at the first block that
    computes them, from the recorded output of the block below (``output(j - 1)``, batch 1 = shared by all rows, or
    one entry per row; ``entry``: the first block's per-row input, else the model's own); a block no row has reached
    returns ``output(j)`` without computing. ``output`` is only called for the blocks that need it."""
    patched = []  # (block, its previous instance ``forward`` or None)
    try:
        prev = 0
        for j, blk in enumerate(site.blocks):
            n = n_at[j]
            # an instance attribute shadows the class method; a dispatched model (accelerate device map) already has
            # one -- its device-moving wrapper -- which must be called, and put back afterwards, not deleted
            inst = blk.__dict__.get("forward")
            patched.append((blk, inst))
            if n == 0:
                blk.forward = (lambda *a, _o=output(j), **k: _o)
            elif n == prev:
                continue  # no row enters: the block's own forward
            else:
                fwd = inst if inst is not None else types.MethodType(type(blk).forward, blk)
                src = hidden_of(output(j - 1)) if j > 0 and prev > 0 else None
                blk.forward = functools.partial(_enter_rows, fwd, n, prev, src, entry if j == 0 else None)
            prev = n
        yield
    finally:
        for blk, inst in reversed(patched):
            if inst is None:
                blk.__dict__.pop("forward", None)
            else:
                blk.forward = inst


def rows_cache(cache, n_at: list[int], index: torch.Tensor | None = None):
    """A copy of a KV cache (the original is left untouched) whose layer ``j`` holds ``n_at[j]`` rows, the rows block j
    computes: rows ``index[:n_at[j]]`` of the cache, or, with ``index`` None, its single row repeated (a broadcast
    view, no copy: a layer's update concatenates new keys/values into a fresh tensor). Layers no row reaches are left
    as they are."""
    c = copy.copy(cache)
    c.layers = [copy.copy(layer) for layer in cache.layers]
    for layer, n in zip(c.layers, n_at):
        if n == 0:
            continue
        if index is not None:
            layer.batch_select_indices(index[:n])
        elif n > 1:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if torch.is_tensor(k) and torch.is_tensor(v) and k.dim() == 4 and k.shape[0] == 1 and v.shape[0] == 1:
                layer.keys, layer.values = k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)
            else:
                layer.batch_repeat_interleave(n)
    return c
