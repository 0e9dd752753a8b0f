"""The one interface of the audit's methods (KN, CNL per phrasing, causal tracing, knowledge circuits).

A method localizes a fact separately on each of its phrasings and runs its own manipulation:

* per-fact methods (:attr:`Method.per_fact`) implement :meth:`Method.localize`: one fact's phrasings in, a JSON record
  (stored under ``record[method.name]`` in ``facts/fact_XXXXX.json``: the per-phrasing localizations, the refined /
  shared localization and the manipulation's measurements) and named tensors (``facts/fact_XXXXX.safetensors``) out;
* set-level methods (knowledge circuits: the mean-ablation reference is the whole fact set) implement
  :meth:`Method.localize_all`: all facts in, the ``circuits`` entry of ``audit.json`` out;
* every method implements :meth:`Method.summarize`: stored records -> its summary entry (``fidelity`` with the common
  metric next to its controls, and ``reliability`` where the method has a manipulation), or None when the result
  holds nothing of it. Summaries are pure, so a loaded or unfinished result is summarized the same way.

Methods are registered by explicit import in :mod:`caploc.stages.audit.methods`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .config import AuditConfig
from .facts import Fact


@dataclass
class FactJob:
    """One fact as a per-fact method sees it."""

    fact: Fact
    index: int  # position of the fact in the audit (seeds derive from it)
    encoded: list  # Encoded phrasings (prompt + target tokens), aligned with fact.phrasings
    off_encoded: list | None  # phrasings of an unrelated fact (specificity of the manipulations)
    pad: int  # pad token id (padding is masked)
    timing: dict = field(default_factory=dict)  # seconds per step, filled by the methods


class Method:
    """Base of the audit methods (see the module docstring). ``lm`` is None when only summaries are needed."""

    name: ClassVar[str]
    per_fact: ClassVar[bool] = True
    needs_subject: ClassVar[bool] = False  # facts must name a subject that occurs in every phrasing

    def __init__(self, lm, cfg: AuditConfig):
        self.lm, self.cfg = lm, cfg

    def localize(self, job: FactJob) -> tuple[dict, dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{self.name} is a set-level method: use localize_all")

    def localize_all(self, facts: list[Fact], out_dir: Path) -> dict:
        raise NotImplementedError(f"{self.name} is a per-fact method: use localize")

    def run_info(self) -> dict:
        """Extra summary numbers of this run (e.g. the tracing noise sd)."""
        return {}

    @classmethod
    def summarize(cls, result, partners: list[dict]) -> dict | None:
        """``result``: an :class:`~caploc.stages.audit.result.AuditResult` (records, facts, config, model)."""
        raise NotImplementedError


def seed_parts(cfg: AuditConfig, fact_index: int, *more) -> list[int]:
    """Seed sequence of one fact's random draws (independent of the other facts and of the method order)."""
    return [int(cfg.seed), int(fact_index), *[int(x) for x in more]]


def seed_int(parts: list[int]) -> int:
    return int(np.random.SeedSequence(parts).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))
