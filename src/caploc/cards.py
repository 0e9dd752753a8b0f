"""Neuron cards: for the top neurons of a set, where in the data each one fires most.

A card holds a neuron's (layer, index), its selection frequency and mean attribution score (from the set) and the
``contexts`` dataset positions with the largest activation of that neuron: the activation is the neuron's input to the
MLP output projection (``act(gate) * up`` for gated MLPs), the value the hooks scale and erase. Each context is a
window of tokens around the position, the firing token marked. "Top neurons" are ranked by selection frequency, then
by mean score (the order in which the frequency rule would keep them). One forward pass per batch, no gradients.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .data import collate, encode_dataset, pad_id
from .errors import CaplocError
from .hooks import capture
from .progress import track
from .results import NeuronSet

log = logging.getLogger(__name__)


@dataclass
class Context:
    sample_id: str
    position: int  # token position in the sample
    activation: float
    tokens: list[str]  # the window of tokens around ``position``
    mark: int  # index of the firing token in ``tokens``

    def text(self, left: str = "[[", right: str = "]]") -> str:
        """The window as text with the firing token between ``left`` and ``right``."""
        return "".join(f"{left}{t}{right}" if i == self.mark else t for i, t in enumerate(self.tokens))


@dataclass
class NeuronCard:
    layer: int
    index: int
    frequency: float | None
    mean_score: float | None
    contexts: list[Context] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def top_neurons(neurons: NeuronSet, k: int) -> np.ndarray:
    """Positions in ``neurons.pairs`` of the ``k`` top neurons: by frequency, then mean score, then (layer, index)."""
    n = len(neurons)
    freq = neurons.frequency if neurons.frequency is not None else np.zeros(n)
    score = neurons.mean_score if neurons.mean_score is not None else np.zeros(n)
    order = np.lexsort((neurons.pairs[:, 1], neurons.pairs[:, 0], -np.nan_to_num(score), -np.nan_to_num(freq)))
    return order[: max(0, int(k))]


def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def neuron_cards(lm, neurons: NeuronSet, dataset, *, top: int = 10, contexts: int = 3, window: int = 6,
                 batch_size: int = 8, chat: bool = False, max_length: int | None = None) -> list[NeuronCard]:
    """Cards for the ``top`` neurons of ``neurons`` with their ``contexts`` most-activating positions in ``dataset``
    (``window`` tokens either side)."""
    if top < 1 or contexts < 1 or window < 0 or batch_size < 1:
        raise CaplocError("neuron cards need top >= 1, contexts >= 1, window >= 0 and batch_size >= 1")
    neurons.check_compatible(lm.site)
    sel = top_neurons(neurons, top)
    if len(sel) == 0:
        return []
    if len(dataset) == 0:
        raise CaplocError(f"dataset {dataset.name!r} is empty: no contexts for neuron cards")
    pairs = neurons.pairs[sel]
    layers = sorted({int(l) for l in pairs[:, 0]})
    by_layer = {l: torch.as_tensor(pairs[pairs[:, 0] == l, 1]) for l in layers}
    slot = {(int(l), int(i)): k for k, (l, i) in enumerate(pairs.tolist())}
    heaps: list[list] = [[] for _ in range(len(pairs))]  # min-heaps of (activation, sample, position)
    encoded = encode_dataset(lm.tokenizer, dataset, chat=chat, max_length=max_length)
    pad = pad_id(lm.tokenizer, lm.model.config)
    device = next(lm.model.parameters()).device
    starts = list(range(0, len(encoded), batch_size))
    with torch.no_grad():
        for b0 in track(starts, "neuron cards"):
            batch = encoded[b0: b0 + batch_size]
            ids, mask = collate([e.input_ids for e in batch], pad)
            with capture(lm.site, layers) as acts:
                lm.model(input_ids=ids.to(device), attention_mask=mask.to(device))
            for l in layers:
                a = acts[l][..., by_layer[l].to(acts[l].device)].float().cpu()  # [b, pos, k_l]
                a = a.masked_fill(~mask.bool()[..., None], float("-inf"))
                for j, idx in enumerate(by_layer[l].tolist()):
                    h = heaps[slot[(l, idx)]]
                    vals, flat = a[..., j].flatten().topk(min(contexts, a[..., j].numel()))
                    for v, f in zip(vals.tolist(), flat.tolist()):
                        if v == float("-inf"):
                            continue
                        item = (v, b0 + f // a.shape[1], f % a.shape[1])
                        if len(h) < contexts:
                            heapq.heappush(h, item)
                        elif item > h[0]:
                            heapq.heapreplace(h, item)
    cards = []
    for k, (l, i) in enumerate(pairs.tolist()):
        pos_in_set = sel[k]
        card = NeuronCard(int(l), int(i),
                          float(neurons.frequency[pos_in_set]) if neurons.frequency is not None else None,
                          float(neurons.mean_score[pos_in_set]) if neurons.mean_score is not None else None)
        for v, s, p in sorted(heaps[k], reverse=True):
            ids = encoded[s].input_ids
            lo, hi = max(0, p - window), min(len(ids), p + window + 1)
            card.contexts.append(Context(encoded[s].id, int(p), float(v), _token_texts(lm.tokenizer, ids[lo:hi]),
                                         int(p - lo)))
        cards.append(card)
    return cards


__all__ = ["Context", "NeuronCard", "neuron_cards", "top_neurons"]
