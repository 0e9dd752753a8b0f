"""Knowledge neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers"), per fact.

For every phrasing of a fact:

1. **Attribution**: KN-compatible integrated gradients through caploc's engine (``AttributionConfig(method="ig",
   objective="prob", positions="last")``): for each layer, the neuron activations at the last prompt position are
   scaled by alpha in ``m`` Riemann steps and ``Attr = a * mean_k dP(first target token)/da``.
2. **Coarse neurons** (:func:`kn_select`): ``Attr > t * max Attr`` over all scored neurons of the phrasing (t = 0.2 as
   in Dai et al.; the knowledge-neurons package defaults to 0.3). A phrasing whose max attribution is <= 0 has no
   coarse neurons.
3. **Refinement across the fact's phrasings** (:func:`caploc.stages.audit.neurons.refine`, shared with CNL): keep the neurons that are coarse neurons of at least
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

import time

import numpy as np
import torch

from ...attribution.engine import Attributor
from ...localize import select_kn
from ...models.layouts import Site
from .base import FactJob
from .config import KNConfig
from .neurons import NeuronMethod, refine


def kn_select(scores: torch.Tensor, t: float) -> np.ndarray:
    """scores [n_layers, d_mlp] (or flat [n]) -> sorted flat indices with Attr > t * max; empty if max <= 0."""
    flat = scores.reshape(1, -1).double()
    if flat.numel() == 0 or not float(flat.max()) > 0:
        return np.zeros(0, dtype=np.int64)
    return np.nonzero(select_kn(flat, t)[0].numpy())[0].astype(np.int64)


def kn_scores(site: Site, encoded, cfg: KNConfig, attributor: Attributor | None = None) -> list:
    """KN integrated-gradient scores (``SampleScores``) of each encoded phrasing."""
    att = attributor or Attributor(site, cfg.attribution())
    return [att.score(e.input_ids, e.prompt_len) for e in encoded]


class KnowledgeNeurons(NeuronMethod):
    """``kn``: IG attribution per phrasing, coarse neurons ``Attr > t * max``, refined across the phrasings."""

    name = "kn"
    seed_tag = 1

    def __init__(self, lm, cfg):
        super().__init__(lm, cfg)
        self.attributor = Attributor(lm.site, cfg.kn.attribution()) if lm is not None else None

    def localize(self, job: FactJob) -> tuple[dict, dict[str, torch.Tensor]]:
        kcfg = self.cfg.kn
        t0 = time.time()
        sets, fs, gaps, tensors = [], [], [], {}
        for j, e in enumerate(job.encoded):
            sc = self.attributor.score(e.input_ids, e.prompt_len)
            sets.append(kn_select(sc.scores, kcfg.t))
            fs.append(sc.f)
            gaps.append(float(sc.gap.abs().nanmean()) if sc.gap is not None else None)  # mean |gap| per layer
            if self.cfg.save_scores:
                tensors[f"kn.scores.{j}"] = sc.scores.half()
        refined = refine(sets, kcfg.p, kcfg.share_rule)
        job.timing["kn_attribution"] = time.time() - t0
        t0 = time.time()
        man = self.manipulate(job, sets, refined)
        rec = {"sets": [s.tolist() for s in sets], "refined": refined.tolist(), "f": fs, "completeness_gap": gaps,
               **man}
        job.timing["kn_manipulation"] = time.time() - t0
        return rec, tensors

    @classmethod
    def summarize(cls, result, partners: list[dict]) -> dict | None:
        out = super().summarize(result, partners)
        if out is not None:
            gaps = [g for r in result.records for g, f in zip(r["kn"]["completeness_gap"], r["kn"]["f"])
                    if g is not None]
            out["completeness_gap_mean_abs"] = float(np.mean(np.abs(gaps))) if gaps else None
        return out


__all__ = ["KNConfig", "KnowledgeNeurons", "kn_select", "kn_scores"]
