"""Controls for an intervention on a neuron set.

Controls (``caploc intervene``):

* :func:`random_controls` -- random sets with the set's per-layer sizes, drawn from the neurons NOT in the set
  (``stats.random_layer_matched_set``, seeds ``seed .. seed + n - 1``);
* :func:`activation_matched_set` -- for every set neuron the neuron of the same layer, not in the set and not yet
  used, whose mean |activation| (:func:`mean_abs_activation`) is closest.

The verdict rules that turn set-vs-control numbers into claims are in :mod:`caploc.verdicts`.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import collate, encode_dataset, pad_id
from ..errors import CaplocError
from ..hooks import capture
from ..neurons import by_layer, flat_indices
from ..stats import per_layer_counts, random_layer_matched_set


# ---------------------------------------------------------------------------------------------------------------------
# controls
# ---------------------------------------------------------------------------------------------------------------------
def random_controls(neurons, n_layers: int, d_mlp: int, n: int, seed: int) -> list[np.ndarray]:
    """``n`` random flat sets with the per-layer sizes of ``neurons``, excluding its neurons; seeds seed..seed+n-1."""
    flat = flat_indices(neurons, d_mlp)
    sizes = per_layer_counts(flat, n_layers, d_mlp)
    return [random_layer_matched_set(sizes, d_mlp, np.random.default_rng(seed + i), exclude=flat) for i in range(n)]


@torch.no_grad()
def mean_abs_activation(lm, dataset, *, n_samples: int = 8, chat: bool = False, batch_size: int = 4,
                        max_length: int | None = None) -> torch.Tensor:
    """Mean |activation| of every neuron over all real (non-padding) tokens of the first ``n_samples`` samples:
    float64 ``[n_layers, d_mlp]``, measured with ``hooks.capture``."""
    site = lm.site
    ds = dataset.subset(range(min(n_samples, len(dataset))))
    max_len = max_length or getattr(lm.model.config, "max_position_embeddings", None)
    enc = encode_dataset(lm.tokenizer, ds, chat=chat, max_length=max_len)
    pad = pad_id(lm.tokenizer, lm.model.config)
    dev = site.input_device()
    total = torch.zeros(site.n_layers, site.d_mlp, dtype=torch.float64)
    count = 0
    for start in range(0, len(enc), batch_size):
        ids, mask = collate([e.input_ids for e in enc[start:start + batch_size]], pad)
        with capture(site) as store:
            lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        for l in range(site.n_layers):
            x = store[l].abs().double().cpu()  # [B, T, d_mlp]
            total[l] += (x * mask[:, :, None].double()).sum((0, 1))
        count += int(mask.sum())
    return total / max(count, 1)


def activation_matched_set(neurons, mean_abs: torch.Tensor | np.ndarray) -> np.ndarray:
    """For each set neuron (in each layer, largest mean |a| first) the not-yet-used neuron of the same layer, not in
    the set, with the closest mean |a| (ties: lower index). ``mean_abs``: ``[n_layers, d_mlp]``. Flat indices."""
    act = np.asarray(mean_abs, dtype=np.float64)
    L, d = act.shape
    bl = by_layer(neurons, d)
    out = []
    for l, ix in sorted(bl.items()):
        if len(ix) > d - len(ix):
            raise CaplocError(f"layer {l} holds {len(ix)} of {d} set neurons: too few others for a matched control")
        free = np.ones(d, dtype=bool)
        free[ix] = False
        for i in sorted(ix.tolist(), key=lambda i: -act[l, i]):
            cand = np.flatnonzero(free)
            j = int(cand[np.argmin(np.abs(act[l, cand] - act[l, i]))])
            free[j] = False
            out.append(l * d + j)
    return np.sort(np.asarray(out, dtype=np.int64))


__all__ = ["random_controls", "mean_abs_activation", "activation_matched_set"]
