"""``caploc stability``: agreement of the commonality neurons relocalized on disjoint splits of one locate run.

Everything works on the run's STORED per-sample scores (no attribution is recomputed); the split and agreement
machinery (and its statistics) is :mod:`caploc.splits`, the report and figure :mod:`caploc.report.stability`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import load_file

from .. import __version__
from ..errors import CaplocError
from ..localize import LocateConfig
from ..report import stability as report_stability
from ..report.fmt import json_safe
from ..results import NeuronSet, OutLock, atomic_save_tensors, atomic_write_json, check_out_dir, read_json
from ..runs import LocateRun, commit, load_run
from ..splits import StabilityConfig, selection_masks, set_from_mask, split_pairs, summarize_pairs

log = logging.getLogger(__name__)


@dataclass
class StabilityResult:
    """Split agreement of a commonality neuron set. ``pairs``: one record per split pair; ``summary``: per kind."""

    config: dict
    locate_config: dict
    provenance: dict  # the run's summary (LocateRun.summary())
    pairs: list[dict]
    summary: dict
    full_set: NeuronSet
    split_sets: dict = field(default_factory=dict)  # (kind, seed, part) -> (sample indices, flat set)
    groups_note: str = ""
    kinds_skipped: dict = field(default_factory=dict)

    kind: ClassVar[str] = "stability"

    def headline_kind(self) -> str | None:
        return "random" if "random" in self.summary else next(iter(self.summary), None)

    def claims(self) -> dict:
        return report_stability.claims(self)

    def to_report(self, out_dir: Path | str) -> dict:
        return report_stability.to_report(self, Path(out_dir))

    def save(self, out_dir: Path | str) -> Path:
        """``full_set.*``, ``split_sets.safetensors`` and ``stability.json`` (the report: :meth:`to_report`)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.full_set.save(out_dir, name="full_set")
        tensors = {}
        for (kind, seed, part), (idx, flat) in self.split_sets.items():
            tensors[f"{kind}/seed{seed}/part{part}/samples"] = torch.as_tensor(np.asarray(idx), dtype=torch.long)
            tensors[f"{kind}/seed{seed}/part{part}/neurons"] = torch.as_tensor(np.asarray(flat), dtype=torch.long)
        if tensors:
            atomic_save_tensors(out_dir / "split_sets.safetensors", tensors)
        atomic_write_json(out_dir / "stability.json", json_safe({
            "kind": "stability", "caploc_version": __version__, "config": self.config,
            "locate_config": self.locate_config, "provenance": self.provenance, "summary": self.summary,
            "pairs": self.pairs, "groups_note": self.groups_note, "kinds_skipped": self.kinds_skipped,
            "claims": self.claims(),
        }))
        return out_dir / "stability.json"

    @classmethod
    def load(cls, out_dir: Path | str) -> "StabilityResult":
        out_dir = Path(out_dir)
        d = read_json(out_dir / "stability.json")
        if d.get("kind") != "stability":
            raise CaplocError(f"{out_dir}/stability.json is not a caploc stability result")
        sets = {}
        sp = out_dir / "split_sets.safetensors"
        if sp.exists():
            t = load_file(str(sp))
            for key in t:
                kind, seed, part, what = key.split("/")
                if what == "samples":
                    s, p = int(seed[4:]), int(part[4:])
                    sets[(kind, s, p)] = (t[key].numpy(), t[f"{kind}/{seed}/{part}/neurons"].numpy())
        return cls(config=d["config"], locate_config=d["locate_config"], provenance=d["provenance"],
                   pairs=d["pairs"], summary=d["summary"], full_set=NeuronSet.load(out_dir, name="full_set"),
                   split_sets=sets, groups_note=d.get("groups_note", ""), kinds_skipped=d.get("kinds_skipped", {}))


def usable_kinds(run: LocateRun, scfg: StabilityConfig) -> tuple[list[str], dict]:
    """The split kinds of ``scfg`` that ``run`` supports, and ``{kind: why}`` for those it does not."""
    kinds, skipped = [], {}
    for kind in scfg.kinds:
        if kind == "group":
            if run.groups is None:
                skipped[kind] = f"no sample groups ({run.groups_note})"
                continue
            n_groups = len(set(run.groups))
            if n_groups < scfg.k:
                skipped[kind] = f"only {n_groups} distinct group(s) for k={scfg.k} splits"
                continue
        if run.n_samples < scfg.k:
            raise CaplocError(f"{run.n_samples} samples cannot be split into k={scfg.k} parts; lower --k")
        kinds.append(kind)
    for kind, why in skipped.items():
        log.info("split kind %r skipped: %s", kind, why)
    if not kinds:
        raise CaplocError(f"no usable split kind ({'; '.join(f'{k}: {v}' for k, v in skipped.items())}); "
                          "use --kinds random")
    return kinds, skipped


def stability(run: LocateRun | Path | str, scfg: StabilityConfig | None = None, cfg: LocateConfig | None = None,
              out_dir: Path | str | None = None) -> StabilityResult:
    """Split agreement of ``run``'s commonality neurons under ``cfg`` (default: the run's own rule).

    Splits, relocalizes every split from the stored scores, and compares every split pair (see :mod:`caploc.splits`).
    Writes ``out_dir`` (``stability.json``, ``full_set.*``, ``split_sets.safetensors``, figure, ``report.json``).
    """
    scfg = scfg or StabilityConfig()
    if out_dir is not None:
        out_dir = check_out_dir(out_dir)
    if not isinstance(run, LocateRun):
        run = load_run(run)
    cfg = cfg or run.config
    kinds, skipped = usable_kinds(run, scfg)
    mask = selection_masks(run.scores, cfg)
    full = set_from_mask(mask, cfg.min_freq)
    full_set = run.neuron_set(full, cfg)
    log.info("full-data set: %d neurons; splitting %d samples into k=%d for seeds %s (%s)", len(full),
             run.n_samples, scfg.k, scfg.seeds, ", ".join(kinds))
    recs, sets = split_pairs(mask, cfg.min_freq, run.n_layers, run.d_mlp, run.groups, scfg, kinds, keep_sets=True)
    res = StabilityResult(config=scfg.to_dict(), locate_config=cfg.to_dict(), provenance=run.summary(),
                          pairs=json_safe(recs), summary=summarize_pairs(recs, scfg), full_set=full_set,
                          split_sets=sets, groups_note=run.groups_note, kinds_skipped=skipped)
    if out_dir is not None:
        with OutLock(out_dir):
            commit(res, out_dir)
    return res


__all__ = ["StabilityConfig", "StabilityResult", "stability", "usable_kinds"]
