"""Neuron specifications and the activation-gain intervention on them.

A *neuron spec* is any of: a :class:`~caploc.results.NeuronSet`, ``(layer, index)`` pairs (``[n, 2]``), a
``{layer: indices}`` mapping, or flat indices ``layer * d_mlp + index`` (``[n]``; needs ``d_mlp``). Every verb that
takes neurons goes through :func:`by_layer` / :func:`flat_indices` here (one coercion, not one per stage).

:func:`intervention` multiplies the neurons' activations by a gain at every position through
:func:`caploc.hooks.scale_neurons` (forward pre-hooks on the MLP output projection, removed in ``finally``); weights
are never touched. :func:`gain_for` maps the CLI's ``erase`` / ``enhance`` modes to a gain.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Iterator

import numpy as np
import torch

from .errors import CaplocError
from .hooks import scale_neurons
from .results import NeuronSet

MODES = ("erase", "enhance")


def by_layer(neurons, d_mlp: int | None = None) -> dict[int, np.ndarray]:
    """``{layer: int64 indices}`` of a neuron spec (see the module docstring); flat indices need ``d_mlp``."""
    if isinstance(neurons, NeuronSet):
        return {int(l): np.asarray(ix, dtype=np.int64) for l, ix in neurons.by_layer().items()}
    if isinstance(neurons, Mapping):
        return {int(l): np.asarray(ix, dtype=np.int64).reshape(-1) for l, ix in neurons.items()}
    arr = np.asarray(neurons, dtype=np.int64)
    if arr.ndim == 1:
        if d_mlp is None:
            raise CaplocError("flat neuron indices need d_mlp to be split into (layer, index)")
        arr = np.stack([arr // d_mlp, arr % d_mlp], 1) if arr.size else arr.reshape(0, 2)
    arr = arr.reshape(-1, 2)
    out: dict[int, list[int]] = {}
    for l, i in arr.tolist():
        out.setdefault(int(l), []).append(int(i))
    return {l: np.asarray(ix, dtype=np.int64) for l, ix in out.items()}


def flat_indices(neurons, d_mlp: int) -> np.ndarray:
    """Sorted unique flat indices ``layer * d_mlp + index`` (int64) of a neuron spec."""
    bl = by_layer(neurons, d_mlp)
    if not bl:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([l * d_mlp + ix for l, ix in bl.items()])).astype(np.int64)


def pairs_of(neurons, d_mlp: int | None = None) -> np.ndarray:
    """``[n, 2]`` int64 ``(layer, index)`` pairs of a neuron spec, in layer order (a NeuronSet's own order kept)."""
    if isinstance(neurons, NeuronSet):
        return neurons.pairs
    if not isinstance(neurons, Mapping):
        arr = np.asarray(neurons, dtype=np.int64)
        if arr.ndim != 1:
            return arr.reshape(-1, 2)
    rows = [(l, int(i)) for l, ix in sorted(by_layer(neurons, d_mlp).items()) for i in ix.tolist()]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def gain_for(mode: str, k: float) -> float:
    """The activation gain of a mode: erase -> 0, enhance -> k (finite, >= 0)."""
    if mode == "erase":
        return 0.0
    if mode == "enhance":
        if not (isinstance(k, (int, float)) and math.isfinite(k) and k >= 0):
            raise CaplocError(f"enhance needs a finite gain k >= 0, got {k!r}; pass e.g. --k 2")
        return float(k)
    raise CaplocError(f"unknown mode {mode!r}; choose erase or enhance")


@contextlib.contextmanager
def intervention(site, neurons, gain: float) -> Iterator[None]:
    """Scale ``neurons``' activations by ``gain`` (0 = erase) at every position, via hooks only; gain 1 (or no
    neuron) installs nothing. ``neurons``: any neuron spec (flat indices use ``site.d_mlp``)."""
    bl = {l: ix for l, ix in by_layer(neurons, site.d_mlp).items() if len(ix)}
    if float(gain) == 1.0 or not bl:
        yield
        return
    with scale_neurons(site, {l: torch.as_tensor(ix) for l, ix in bl.items()}, float(gain)):
        yield


__all__ = ["MODES", "by_layer", "flat_indices", "pairs_of", "gain_for", "intervention"]
