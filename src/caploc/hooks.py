"""Neuron hooks, only as context managers that remove every hook in ``finally``.

All hooks are ``forward_pre_hook``s on the MLP output projection of a layer, so they see (and may replace) the neuron
vector ``x`` of shape ``[batch, pos, d_mlp]``. No weight is ever modified here: interventions change activations only,
so the model's weights are bit-identical after every context.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from .models.layouts import Site

# fn(layer, x) -> replacement x (or None to keep x); x: [batch, pos, d_mlp]
NeuronFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def neuron_hooks(site: Site, fns: Mapping[int, NeuronFn]) -> Iterator[None]:
    """Install ``fns[layer]`` on the neuron input of each given layer; removed on exit, also after an exception."""
    handles = []
    try:
        for layer, fn in fns.items():
            if not 0 <= layer < site.n_layers:
                raise IndexError(f"layer {layer} out of range 0..{site.n_layers - 1}")

            def pre(module, args, kwargs, _fn=fn, _layer=layer):
                new = _fn(_layer, args[0])
                if new is None:
                    return None
                return (new, *args[1:]), kwargs

            handles.append(site.out_projs[layer].register_forward_pre_hook(pre, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture(site: Site, layers=None, detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Record each layer's neuron activations ``[batch, pos, d_mlp]`` into the yielded dict."""
    store: dict[int, torch.Tensor] = {}
    layers = range(site.n_layers) if layers is None else layers

    def fn(layer, x):
        store[layer] = x.detach() if detach else x
        return None

    with neuron_hooks(site, {l: fn for l in layers}):
        yield store


def _layer_index(neurons) -> dict[int, torch.Tensor]:
    """Accept {layer: indices} or an [n, 2] array of (layer, index) pairs."""
    if isinstance(neurons, Mapping):
        return {int(l): torch.as_tensor(list(ix) if not torch.is_tensor(ix) else ix, dtype=torch.long) for l, ix in neurons.items()}
    pairs = torch.as_tensor(neurons, dtype=torch.long).reshape(-1, 2)
    out: dict[int, list[int]] = {}
    for l, i in pairs.tolist():
        out.setdefault(l, []).append(i)
    return {l: torch.tensor(ix, dtype=torch.long) for l, ix in out.items()}


@contextlib.contextmanager
def scale_neurons(site: Site, neurons, factor: float | Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Multiply the given neurons' activations by ``factor`` (enhance: k > 1; erase: 0) at every position.

    ``neurons``: {layer: indices} or (layer, index) pairs. ``factor``: a number, or per layer a tensor of one gain per
    selected neuron (same order as the indices).
    """
    by_layer = _layer_index(neurons)
    for l, ix in by_layer.items():
        if len(ix) and (int(ix.min()) < 0 or int(ix.max()) >= site.d_mlp):
            raise IndexError(f"neuron index out of range 0..{site.d_mlp - 1} in layer {l}")

    def make(layer, ix):
        def fn(_l, x):
            g = factor[layer] if isinstance(factor, Mapping) else factor
            gain = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
            gain[ix.to(x.device)] = torch.as_tensor(g, dtype=x.dtype, device=x.device)
            return x * gain
        return fn

    with neuron_hooks(site, {l: make(l, ix) for l, ix in by_layer.items() if len(ix)}):
        yield


def erase_neurons(site: Site, neurons):
    """Set the given neurons' activations to zero (``scale_neurons`` with factor 0)."""
    return scale_neurons(site, neurons, 0.0)


def count_hooks(model: nn.Module) -> int:
    """Number of forward / pre-forward / backward hooks on all modules (tests assert none is left behind)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter for the duration (restores the previous flags)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
