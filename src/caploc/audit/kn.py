"""Knowledge neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers"), per fact.

For every phrasing of a fact:

1. **Attribution**: KN-compatible integrated gradients through caploc's engine (``AttributionConfig(method="ig",
   objective="prob", positions="last")``): for each layer, the neuron activations at the last prompt position are
   scaled by alpha in ``m`` Riemann steps and ``Attr = a * mean_k dP(first target token)/da``.
2. **Coarse neurons** (:func:`kn_select`): ``Attr > t * max Attr`` over all scored neurons of the phrasing (t = 0.2 as
   in Dai et al.; the knowledge-neurons package defaults to 0.3). A phrasing whose max attribution is <= 0 has no
   coarse neurons.
3. **Refinement across the fact's phrasings** (:func:`refine`): keep the neurons that are coarse neurons of at least
   a share ``p`` of the phrasings. Two comparison rules: ``"gt"`` (count > p * n: Dai et al.'s "shared by more than
   p% of prompts", and ``count > n_prompts * p`` in EleutherAI's knowledge-neurons package; the DEFAULT here) and
   ``"ge"`` (count >= p * n). They differ exactly when p * n is a whole number: with p = 0.5 and 2 phrasings, "gt"
   keeps the intersection and "ge" the union of the two sets; with 4 phrasings "gt" needs 3 and "ge" needs 2.

Manipulation (reliability): multiply the refined neurons' activations by 0 (suppress) or by ``enhance`` (2, as in
Dai et al.'s "amplify" by doubling) and measure the relative change of P(first target token) on every phrasing,
next to layer-matched random neuron sets (same number of neurons in every layer, drawn disjoint from the set).
``positions="last"`` (default) intervenes only at the last prompt position, where the attribution was measured and
where the knowledge-neurons package patches; ``"all"`` scales every position (``caploc.hooks.scale_neurons``).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from ..attribution.engine import AttributionConfig, Attributor
from ..errors import CaplocError
from ..hooks import neuron_hooks, scale_neurons
from ..localize import select_kn
from ..models.layouts import Site

log = logging.getLogger(__name__)

SHARE_RULES = ("gt", "ge")
POSITIONS = ("last", "all")


@dataclass
class KNConfig:
    """Knowledge-neuron settings (validated on construction)."""

    steps: int = 20  # m, IG Riemann steps (Dai et al.: 20)
    alphas: str = "right"  # IG points (see caploc.attribution.engine)
    t: float = 0.2  # coarse threshold: Attr > t * max
    p: float = 0.5  # sharing fraction for refinement
    share_rule: str = "gt"  # gt: count > p*n (Dai et al., knowledge-neurons package) | ge: count >= p*n
    layers: list[int] | None = None  # None = all layers
    enhance: float = 2.0  # enhancement factor (suppress is 0)
    positions: str = "last"  # where the manipulation acts: last prompt position | all positions
    memory_mb: float = 2048.0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise CaplocError(f"KN steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.t < 1.0:
            raise CaplocError(f"KN threshold t must be in [0, 1), got {self.t}")
        if not 0.0 <= self.p <= 1.0:
            raise CaplocError(f"KN sharing fraction p must be in [0, 1], got {self.p}")
        if self.share_rule not in SHARE_RULES:
            raise CaplocError(f"KN share rule {self.share_rule!r}: choose gt (count > p*n) or ge (count >= p*n)")
        if self.positions not in POSITIONS:
            raise CaplocError(f"KN intervention positions {self.positions!r}: choose last or all")
        if self.enhance <= 0:
            raise CaplocError(f"KN enhancement factor must be > 0, got {self.enhance}")

    def attribution(self) -> AttributionConfig:
        return AttributionConfig(method="ig", steps=self.steps, alphas=self.alphas, objective="prob",
                                 positions="last", layers=self.layers, memory_mb=self.memory_mb)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# pure selection / refinement
# ---------------------------------------------------------------------------------------------------------------------
def kn_select(scores: torch.Tensor, t: float) -> np.ndarray:
    """scores [n_layers, d_mlp] (or flat [n]) -> sorted flat indices with Attr > t * max; empty if max <= 0."""
    flat = scores.reshape(1, -1).double()
    if flat.numel() == 0 or not float(flat.max()) > 0:
        return np.zeros(0, dtype=np.int64)
    return np.nonzero(select_kn(flat, t)[0].numpy())[0].astype(np.int64)


def share_threshold(n: int, p: float, rule: str = "gt") -> int:
    """Smallest count a neuron needs among ``n`` phrasings: rule gt -> floor(p*n) + 1, ge -> ceil(p*n) (min 1)."""
    if rule not in SHARE_RULES:
        raise CaplocError(f"share rule {rule!r}: choose gt or ge")
    x = p * n
    xr = round(x)
    if abs(x - xr) < 1e-9:  # whole number: exact comparison without float noise
        x = float(xr)
    k = math.floor(x) + 1 if rule == "gt" else math.ceil(x)
    return max(1, int(k))


def refine(sets: Sequence[np.ndarray], p: float, rule: str = "gt") -> np.ndarray:
    """Neurons present in a share ``p`` of the per-phrasing sets (rule ``gt``: count > p*n; ``ge``: >= p*n).
    Returns a sorted flat int64 array (empty if no set is given or none qualifies)."""
    if not sets:
        return np.zeros(0, dtype=np.int64)
    k = share_threshold(len(sets), p, rule)
    allv = np.concatenate([np.unique(np.asarray(s, dtype=np.int64)) for s in sets]) if sets else np.zeros(0, np.int64)
    if allv.size == 0:
        return np.zeros(0, dtype=np.int64)
    vals, counts = np.unique(allv, return_counts=True)
    return vals[counts >= k].astype(np.int64)


def flat_to_layers(flat: np.ndarray, d_mlp: int) -> dict[int, np.ndarray]:
    flat = np.asarray(flat, dtype=np.int64)
    out: dict[int, list[int]] = {}
    for f in flat.tolist():
        out.setdefault(f // d_mlp, []).append(f % d_mlp)
    return {l: np.asarray(v, dtype=np.int64) for l, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------------
# attribution
# ---------------------------------------------------------------------------------------------------------------------
def kn_scores(site: Site, encoded, cfg: KNConfig, attributor: Attributor | None = None) -> list:
    """KN integrated-gradient scores (``SampleScores``) of each encoded phrasing."""
    att = attributor or Attributor(site, cfg.attribution())
    return [att.score(e.input_ids, e.prompt_len) for e in encoded]


# ---------------------------------------------------------------------------------------------------------------------
# manipulation
# ---------------------------------------------------------------------------------------------------------------------
def _batch(encoded, pad_id: int):
    """Right-padded prompt batch: ids [B, T], attention mask [B, T], last prompt position [B], target ids [B]."""
    T = max(e.prompt_len for e in encoded)
    B = len(encoded)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    last = torch.zeros(B, dtype=torch.long)
    tgt = torch.zeros(B, dtype=torch.long)
    for k, e in enumerate(encoded):
        P = e.prompt_len
        ids[k, :P] = torch.tensor(e.input_ids[:P])
        att[k, :P] = 1
        last[k] = P - 1
        tgt[k] = e.input_ids[P]
    return ids, att, last, tgt


@contextlib.contextmanager
def _scale_at(site: Site, neurons_flat: np.ndarray, factor: float, positions: str, last: torch.Tensor):
    if neurons_flat is None or len(neurons_flat) == 0 or factor == 1.0:
        yield
        return
    by_layer = flat_to_layers(neurons_flat, site.d_mlp)
    if positions == "all":
        with scale_neurons(site, {l: torch.as_tensor(ix) for l, ix in by_layer.items()}, factor):
            yield
        return

    def make(ix):
        ix_t = torch.as_tensor(ix, dtype=torch.long)

        def fn(_l, x):  # x [B, T, d_mlp]
            x = x.clone()
            b = torch.arange(x.shape[0], device=x.device)[:, None]
            p = last.to(x.device)[:, None]
            x[b, p, ix_t.to(x.device)[None, :]] *= factor
            return x
        return fn

    with neuron_hooks(site, {l: make(ix) for l, ix in by_layer.items()}):
        yield


def target_probs(site: Site, encoded, neurons_flat: np.ndarray | None = None, factor: float = 1.0,
                 positions: str = "last", pad_id: int = 0, batch_size: int = 32) -> np.ndarray:
    """P(first target token) at the last prompt position of each encoded phrasing [n], with the given neurons' (flat
    indices) activations multiplied by ``factor`` at the last prompt position (``positions="last"``) or everywhere
    (``"all"``, via :func:`caploc.hooks.scale_neurons`)."""
    model = site.model
    dev = site.input_device()
    out = []
    for b0 in range(0, len(encoded), batch_size):
        chunk = encoded[b0 : b0 + batch_size]
        ids, att, last, tgt = _batch(chunk, pad_id)
        with torch.no_grad(), _scale_at(site, neurons_flat, factor, positions, last):
            logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=False).logits
        lg = logits[torch.arange(len(chunk), device=logits.device), last.to(logits.device)].float()
        out.append(lg.softmax(-1).gather(1, tgt.to(lg.device)[:, None])[:, 0].cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def relative_change(p_new, p_old) -> np.ndarray:
    """(p_new - p_old) / p_old elementwise (nan where p_old == 0)."""
    p_new = np.asarray(p_new, dtype=np.float64)
    p_old = np.asarray(p_old, dtype=np.float64)
    out = np.full(np.broadcast(p_new, p_old).shape, np.nan)
    ok = np.broadcast_to(p_old, out.shape) > 0
    out[ok] = (np.broadcast_to(p_new, out.shape)[ok] - np.broadcast_to(p_old, out.shape)[ok]) / np.broadcast_to(p_old, out.shape)[ok]
    return out
