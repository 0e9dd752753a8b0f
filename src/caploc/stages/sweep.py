"""``caploc sweep``: sensitivity of a commonality set's size and split agreement to sigma, S (min_freq), top-k and the
number of samples, from a locate run's STORED scores only (no attribution is recomputed).

Each axis varies one knob with the others at the run's values; every point is a relocalization (:mod:`caploc.splits`)
plus the split agreement at that point. The report and figures are :mod:`caploc.report.sweep`.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .. import __version__
from ..config import check, setting
from ..errors import CaplocError
from ..localize import LocateConfig, min_count
from ..progress import track
from ..report import sweep as report_sweep
from ..report.fmt import json_safe
from ..results import OutLock, atomic_write_json, check_out_dir, read_json
from ..runs import LocateRun, commit, load_run
from ..splits import StabilityConfig, rule_config, selection_masks, set_from_mask, split_pairs, summarize_pairs

log = logging.getLogger(__name__)

AXES = ("sigma", "min_freq", "topk", "n_samples")


@dataclass
class SweepConfig:
    """Thresholds to sweep. Each axis varies one knob with the others at the run's values."""

    sigmas: list[float] = setting(default_factory=lambda: [2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0], item=float,
                                  help="sigma values (per-sample rule).")
    min_freqs: list[float] = setting(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0],
                                     item=float, min=0, min_exclusive=True, help="S values (fractions or counts).")
    topks: list[int] = setting(default_factory=lambda: [10, 25, 50, 100, 200, 500], item=int, min=1,
                               help="top-k values.")
    sizes: list[int] = setting(default_factory=list, item=int, min=1,
                               help="n_samples axis: sample counts (the first N stored samples), e.g. 32,64,96.")
    split: StabilityConfig = setting(default_factory=lambda: StabilityConfig(kinds=["random"], null_draws=0),
                                     help="How to split and summarise the agreement at every point.")

    def __post_init__(self):
        for name in ("sigmas", "min_freqs", "topks", "sizes"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        check(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SweepResult:
    config: dict
    base_config: dict
    provenance: dict  # the run's summary (LocateRun.summary())
    points: list[dict]  # one per (axis, value)
    grid: dict  # {"sigmas": [...], "min_freqs": [...], "n_neurons": [[...]]}

    kind: ClassVar[str] = "sweep"

    def claims(self) -> dict:
        return report_sweep.claims(self)

    def to_report(self, out_dir: Path | str) -> dict:
        return report_sweep.to_report(self, Path(out_dir))

    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "sweep.json", json_safe({
            "kind": "sweep", "caploc_version": __version__, "config": self.config, "base_config": self.base_config,
            "provenance": self.provenance, "points": self.points, "grid": self.grid, "claims": self.claims()}))
        return out_dir / "sweep.json"

    @classmethod
    def load(cls, out_dir: Path | str) -> "SweepResult":
        d = read_json(Path(out_dir) / "sweep.json")
        if d.get("kind") != "sweep":
            raise CaplocError(f"{out_dir}/sweep.json is not a caploc sweep result")
        return cls(d["config"], d["base_config"], d["provenance"], d["points"], d["grid"])


def sweep_point(run: LocateRun, mask: torch.Tensor, cfg: LocateConfig, axis: str, scfg: StabilityConfig) -> dict:
    """Set size and split agreement of ``run`` under ``cfg`` (``mask`` = ``selection_masks(run.scores, cfg)``)."""
    full = set_from_mask(mask, cfg.min_freq)
    point = {"axis": axis, "n_samples": run.n_samples, "rule": cfg.rule, "rule_value": cfg.rule_value,
             "min_freq": cfg.min_freq,
             "min_count": min_count(cfg.min_freq, run.n_samples), "n_neurons": int(len(full)),
             "share_of_neurons": len(full) / (run.n_layers * run.d_mlp), "share_of_params": run.share_of_params(len(full)),
             "per_sample_selected_mean": float(mask.sum(1).double().mean()),
             "per_layer": np.bincount(full // run.d_mlp, minlength=run.n_layers).tolist(),
             "neurons": full.tolist(), "agreement": {}}
    kinds = [k for k in scfg.kinds if k != "group" or (run.groups is not None and len(set(run.groups)) >= scfg.k)]
    if kinds:
        recs, _ = split_pairs(mask, cfg.min_freq, run.n_layers, run.d_mlp, run.groups, scfg, kinds)
        for k, s in summarize_pairs(recs, scfg).items():
            point["agreement"][k] = {
                "overlap": s["overlap"]["mean"], "overlap_lo": s["overlap"]["lo"], "overlap_hi": s["overlap"]["hi"],
                "iou": s["iou"]["mean"], "iou_lo": s["iou"]["lo"], "iou_hi": s["iou"]["hi"],
                "chance_iou": s["iou"]["chance"], "chance_overlap": s["overlap"]["chance"],
                "size_mean": s["size_mean"], "n_empty_pairs": s["n_empty_pairs"], "ci_unit": s["ci_unit"]}
    return point


def sweep(run: LocateRun | Path | str, swcfg: SweepConfig | None = None, out_dir: Path | str | None = None,
          axes: tuple[str, ...] = ("sigma", "min_freq", "topk")) -> SweepResult:
    """Sensitivity of set size and split agreement to sigma, S (min_freq) and top-k, from stored scores only."""
    swcfg = swcfg or SweepConfig()
    bad = set(axes) - set(AXES)
    if bad:
        raise CaplocError(f"unknown sweep axis {sorted(bad)}; choose from {', '.join(AXES)}")
    if out_dir is not None:
        out_dir = check_out_dir(out_dir)
    if not isinstance(run, LocateRun):
        run = load_run(run)
    base = run.config
    jobs = []
    if "sigma" in axes:
        jobs += [("sigma", rule_config(base, "sigma", s)) for s in swcfg.sigmas]
    if "min_freq" in axes:
        jobs += [("min_freq", rule_config(base, min_freq=f)) for f in swcfg.min_freqs]
    if "topk" in axes:
        jobs += [("topk", rule_config(base, "topk", t)) for t in swcfg.topks]
    if "n_samples" in axes:
        for n in swcfg.sizes:
            if not swcfg.split.k <= n <= run.n_samples:
                raise CaplocError(f"sweep size {n} must lie between k={swcfg.split.k} and the {run.n_samples} stored "
                                  "samples")
        jobs += [("n_samples", n) for n in swcfg.sizes]
    masks: dict = {}

    def mask_for(cfg: LocateConfig) -> torch.Tensor:
        key = (cfg.rule, cfg.rule_value)
        if key not in masks:
            masks[key] = selection_masks(run.scores, cfg)
        return masks[key]

    points = []
    for axis, job in track(jobs, desc="sweep", unit="point"):
        if axis == "n_samples":  # the first n samples, at the run's own rule
            points.append(sweep_point(run.head(job), mask_for(base)[:job], base, axis, swcfg.split))
        else:
            points.append(sweep_point(run, mask_for(job), job, axis, swcfg.split))
    # size grid sigma x min_freq (cheap: one count vector per sigma)
    grid = {"sigmas": swcfg.sigmas, "min_freqs": swcfg.min_freqs, "n_neurons": []}
    for s in swcfg.sigmas:
        counts = mask_for(rule_config(base, "sigma", s)).sum(0).numpy()
        grid["n_neurons"].append([int((counts >= min_count(f, run.n_samples)).sum()) for f in swcfg.min_freqs])
    res = SweepResult(config=swcfg.to_dict(), base_config=base.to_dict(), provenance=run.summary(),
                      points=json_safe(points), grid=grid)
    if out_dir is not None:
        with OutLock(out_dir):
            commit(res, out_dir)
    return res


__all__ = ["AXES", "SweepConfig", "SweepResult", "sweep", "sweep_point"]
