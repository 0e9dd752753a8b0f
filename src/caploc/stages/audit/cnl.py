"""CNL per phrasing: caploc's own per-sample rule applied to single phrasings of one fact.

Attribution of the target's log-probability at all positions (``grad_x_act``, or KN-style IG with ``cnl_steps``),
the sigma rule per phrasing (``Attr > mean + sigma * sd`` over the phrasing's neurons), then the same refinement
across phrasings and the same suppress / enhance manipulation as KN (:mod:`caploc.stages.audit.neurons`).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ...attribution.engine import AttributionConfig, Attributor
from ...localize import select_sigma
from .base import FactJob
from .neurons import NeuronMethod, refine


class CNLPerPhrasing(NeuronMethod):
    """``cnl``: per-phrasing sigma-rule neuron sets, refined across the phrasings."""

    name = "cnl"
    seed_tag = 2

    def __init__(self, lm, cfg):
        super().__init__(lm, cfg)
        self.attributor = None
        if lm is not None:
            acfg = AttributionConfig(method=cfg.cnl_method, steps=cfg.cnl_steps, objective="logprob",
                                     positions="all", layers=cfg.kn.layers, memory_mb=cfg.kn.memory_mb)
            self.attributor = Attributor(lm.site, acfg)

    def localize(self, job: FactJob) -> tuple[dict, dict[str, torch.Tensor]]:
        t0 = time.time()
        res = self.attributor.score_batch([(e.input_ids, e.prompt_len) for e in job.encoded])
        sets = []
        for r in res:
            flat = r.scores.reshape(1, -1)
            sets.append(np.nonzero(select_sigma(flat, self.cfg.cnl_sigma)[0].numpy())[0].astype(np.int64))
        refined = refine(sets, self.cfg.kn.p, self.cfg.kn.share_rule)
        man = self.manipulate(job, sets, refined)
        job.timing["cnl"] = time.time() - t0
        return {"sets": [s.tolist() for s in sets], "refined": refined.tolist(), **man}, {}
