"""Decoupling (paper §4): do per-sample neuron sets follow shared *commonality* (problem type) or shared *content*?

Comparative groups per domain (commonality: one problem type / relation; content: shared strings or answers across
types; random), built deterministically from a seed and checked to be what they claim: see
:mod:`caploc.stages.decouple_groups` for how each kind is built and its confounds.

Per sample: attribution (``grad_x_act`` by default: one forward/backward; or exact per-layer ``ig``), per-sample
selection (``sigma``: Attr > mean + sigma * sd over the sample's neurons, or ``topk``). Per group: the mean pairwise
IoU (and overlap rate) of its members' sets. Per kind: mean over groups with a percentile bootstrap CI over groups;
the difference commonality - content with a bootstrap CI (groups resampled within each kind); the exact chance IoU
of independent random sets with the same per-layer sizes. ``follows_commonality`` = commonality IoU > content IoU
with the 95% CI of the difference above 0.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .. import __version__
from ..attribution.engine import OBJECTIVES, POSITIONS, AttributionConfig, Attributor
from ..config import check, setting, to_mapping
from ..data import encode, load_dataset
from ..errors import CaplocError, DataError
from ..localize import select_sigma, select_topk
from ..progress import bar
from ..report import decouple as report_decouple
from ..results import atomic_save_tensors, atomic_write_json, read_result
from ..stats import bootstrap_ci, expected_random_agreement, iou, overlap_rate, per_layer_counts
from .decouple_groups import (
    KINDS,
    Group,
    content_items,
    content_sharing,
    fact_groups,
    gsm_groups,
)

log = logging.getLogger(__name__)

DOMAINS = ("gsm_symbolic", "facts")


# ---------------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class DecoupleConfig:
    """Settings of ``caploc decouple``."""

    domains: list[str] = setting(default_factory=lambda: ["gsm_symbolic", "facts"], help="Comma-separated: "
                                 "gsm_symbolic, facts.", choices=DOMAINS, item=str)
    n_groups: int = setting(8, help="Groups per kind (commonality / content / random) and domain.", min=2)
    group_size: int = setting(5, help="Samples per group.", min=2)
    pool_size: int = setting(2000, help="gsm_symbolic problems generated to search groups in.", min=1)
    seed: int = setting(0, help="Seed of the pool and of the group choice.")
    gsm_target: str = setting("cot", help="gsm_symbolic target: cot (gold chain of thought) or answer.",
                              choices=("cot", "answer"))
    method: str = setting("grad_x_act", help="Per-sample attribution: grad_x_act | ig (exact per-layer IG).",
                          choices=("grad_x_act", "ig"))
    steps: int = setting(8, help="IG steps (method=ig).", min=1)
    objective: str = setting("logprob", help="Attribution objective.", choices=OBJECTIVES)
    positions: str = setting("all", help="Attributed positions.", choices=POSITIONS)
    rule: str = setting("sigma", help="Per-sample selection: sigma | topk.", choices=("sigma", "topk"))
    sigma: float = setting(6.0, help="sigma rule: Attr > mean + sigma*sd of the sample.")
    topk: int = setting(200, help="topk rule: neurons per sample.", min=1)
    batch_size: int = setting(4, help="Samples per forward/backward (grad_x_act).", min=1)
    n_boot: int = setting(2000, help="Bootstrap resamples for the CIs.", min=1)
    chat: bool = setting(False, help="Wrap prompts in the tokenizer's chat template.")
    max_length: int | None = setting(None, help="Refuse samples longer than this many tokens (default: the model's "
                                                "context).", min=1)

    def __post_init__(self):
        self.domains = list(self.domains)
        check(self)
        if not self.domains:
            raise CaplocError(f"no decoupling domain given; choose from {', '.join(DOMAINS)}")
        if self.pool_size < self.n_groups * self.group_size * 3:
            raise CaplocError(f"pool_size={self.pool_size} is too small for {self.n_groups} groups x {self.group_size} "
                              "x 3 kinds; raise --pool-size")

    def to_dict(self) -> dict:
        return to_mapping(self)

    @classmethod
    def full(cls, **kw) -> "DecoupleConfig":
        """Paper scale: 50 groups of 20 = 1000 samples per kind. The facts data cannot give content groups of 20 (an
        attribute occurs in at most 9 relations), so at this size the facts domain is skipped (reported)."""
        base = dict(n_groups=50, group_size=20, pool_size=20000)
        base.update(kw)
        return cls(**base)


def build_groups(domain: str, cfg: DecoupleConfig):
    """(pool Dataset, {kind: [Group]}, per-sample content items) for one domain."""
    if domain == "gsm_symbolic":
        pool = load_dataset("gsm_symbolic", n=cfg.pool_size, seed=cfg.seed, target=cfg.gsm_target)
        groups, items = gsm_groups(pool, cfg.n_groups, cfg.group_size, cfg.seed)
    else:
        pool = load_dataset("facts")
        groups, items = fact_groups(pool, cfg.n_groups, cfg.group_size, cfg.seed)
    return pool, groups, items


# ---------------------------------------------------------------------------------------------------------------------
# within-group agreement (pure functions)
# ---------------------------------------------------------------------------------------------------------------------
def symmetric_overlap(a, b) -> float:
    """Symmetrised overlap rate (|A∩B|/|A| + |A∩B|/|B|) / 2; nan if a set is empty."""
    return 0.5 * (overlap_rate(a, b) + overlap_rate(b, a))


def group_agreement(sets: list[np.ndarray], metric: str = "iou") -> float:
    """Mean over all unordered pairs of the group's sets (nan pairs dropped)."""
    fn = iou if metric == "iou" else symmetric_overlap
    vals = [fn(np.unique(a), np.unique(b)) for a, b in itertools.combinations(sets, 2)]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def diff_ci(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) with a percentile bootstrap CI (a and b resampled independently)."""
    a = np.asarray([x for x in a if not math.isnan(x)], dtype=np.float64)
    b = np.asarray([x for x in b if not math.isnan(x)], dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    ba = a[rng.integers(0, a.size, (n_boot, a.size))].mean(1)
    bb = b[rng.integers(0, b.size, (n_boot, b.size))].mean(1)
    d = ba - bb
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return float(a.mean() - b.mean()), float(lo), float(hi)


def chance_iou(sets: list[np.ndarray], n_layers: int, d_mlp: int, max_pairs: int = 40) -> float:
    """Mean exact expected IoU of independent random sets with the per-layer sizes of each pair (first max_pairs)."""
    vals = []
    for a, b in itertools.islice(itertools.combinations(sets, 2), max_pairs):
        if a.size + b.size == 0:
            continue
        vals.append(expected_random_agreement(per_layer_counts(a, n_layers, d_mlp), per_layer_counts(b, n_layers, d_mlp),
                                              d_mlp)["iou"])
    return float(np.mean(vals)) if vals else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class DomainResult:
    domain: str
    groups: dict[str, list[Group]]
    sample_ids: list[str]  # aligned with sets
    sets: list[np.ndarray]  # per scored sample: flat neuron indices (layer * d_mlp + index)
    f: np.ndarray  # per scored sample: objective
    sharing: dict  # measured content sharing per kind
    pool_index: list[int]  # per scored sample: index in the pool

    def _sets_of(self, g: Group) -> list[np.ndarray]:
        pos = {p: k for k, p in enumerate(self.pool_index)}
        return [self.sets[pos[i]] for i in g.indices]

    def per_group(self, metric: str = "iou") -> dict[str, list[float]]:
        return {kind: [group_agreement(self._sets_of(g), metric) for g in gs] for kind, gs in self.groups.items()}


@dataclass
class DecoupleResult:
    """Per domain: groups, per-sample neuron sets, within-group agreement; plus config and provenance."""

    kind: ClassVar[str] = "decouple_result"

    domains: dict[str, DomainResult]
    n_layers: int
    d_mlp: int
    config: dict
    meta: dict = field(default_factory=dict)

    @property
    def provenance(self) -> dict:
        """The model (id, fingerprint, type, neuron site) this result was measured on."""
        return {k: self.meta.get(k) for k in ("model_id", "model_fingerprint", "model_type", "neuron_site")}

    def summary(self) -> dict:
        seed, n_boot = int(self.config.get("seed", 0)), int(self.config.get("n_boot", 2000))
        out = {}
        for name, dr in self.domains.items():
            d: dict[str, Any] = {"sharing": dr.sharing, "n_groups": {k: len(v) for k, v in dr.groups.items()},
                                 "set_size_mean": float(np.mean([s.size for s in dr.sets])) if dr.sets else float("nan")}
            for metric in ("iou", "overlap"):
                pg = dr.per_group(metric)
                m = {}
                for kind in KINDS:
                    v = pg.get(kind, [])
                    est, lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed) if v else (float("nan"),) * 3
                    m[kind] = {"mean": est, "ci": [lo, hi], "per_group": v}
                dd, dlo, dhi = diff_ci(pg.get("commonality", []), pg.get("content", []), n_boot, seed)
                m["commonality_minus_content"] = {"mean": dd, "ci": [dlo, dhi]}
                dd, dlo, dhi = diff_ci(pg.get("content", []), pg.get("random", []), n_boot, seed)
                m["content_minus_random"] = {"mean": dd, "ci": [dlo, dhi]}
                d[metric] = m
            chance = []
            for gs in dr.groups.values():
                for g in gs[:4]:
                    chance.append(chance_iou(dr._sets_of(g), self.n_layers, self.d_mlp, max_pairs=4))
            finite = [c for c in chance if np.isfinite(c)]  # a group whose sets are all empty has no chance IoU
            d["chance_iou"] = float(np.mean(finite)) if finite else float("nan")
            c = d["iou"]
            d["follows_commonality"] = bool(c["commonality_minus_content"]["ci"][0] > 0)
            out[name] = d
        return out

    # ---- report ----------------------------------------------------------------------------------------------------
    def report(self, out_dir: Path | str | None = None) -> dict:
        """The report.json dict; figures are written into ``out_dir`` when given."""
        return report_decouple.build_report(self, self.summary(), out_dir)

    to_report = report

    # ---- save / load ----------------------------------------------------------------------------------------------
    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        t = {}
        js: dict[str, Any] = {"kind": "decouple_result", "caploc_version": __version__, "n_layers": self.n_layers,
                              "d_mlp": self.d_mlp, "config": self.config, "meta": self.meta, "domains": {}}
        for name, dr in self.domains.items():
            sizes = np.array([s.size for s in dr.sets], dtype=np.int64)
            t[f"{name}.offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
            t[f"{name}.flat"] = torch.from_numpy(np.concatenate(dr.sets).astype(np.int64) if dr.sets else
                                                 np.zeros(0, np.int64))
            t[f"{name}.f"] = torch.from_numpy(np.asarray(dr.f, dtype=np.float64))
            js["domains"][name] = {"groups": {k: [g.to_json() for g in v] for k, v in dr.groups.items()},
                                   "sample_ids": dr.sample_ids, "pool_index": dr.pool_index, "sharing": dr.sharing}
        atomic_save_tensors(out_dir / "decouple.safetensors", t)
        atomic_write_json(out_dir / "decouple.json", js)
        atomic_write_json(out_dir / "report.json", self.report(out_dir))  # last: marks a complete result
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> "DecoupleResult":
        js, t = read_result(out_dir, "decouple.json", "decouple_result", "decoupling result", "decouple.safetensors")
        doms = {}
        for name, d in js["domains"].items():
            off = t[f"{name}.offsets"].numpy()
            flat = t[f"{name}.flat"].numpy()
            sets = [flat[off[k]:off[k + 1]] for k in range(len(off) - 1)]
            groups = {k: [Group(**g) for g in v] for k, v in d["groups"].items()}
            doms[name] = DomainResult(name, groups, d["sample_ids"], sets, t[f"{name}.f"].numpy(), d["sharing"],
                                      [int(i) for i in d["pool_index"]])
        return cls(doms, int(js["n_layers"]), int(js["d_mlp"]), js["config"], js["meta"])


# ---------------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------------
def per_sample_sets(lm, samples, cfg: DecoupleConfig, progress: bool | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Attribute every sample and select its neurons; returns (flat index sets, objectives)."""
    acfg = AttributionConfig(method=cfg.method, steps=cfg.steps, objective=cfg.objective, positions=cfg.positions,
                             batch_size=cfg.batch_size, completeness=False)
    att = Attributor(lm.site, acfg)
    max_len = cfg.max_length or getattr(lm.model.config, "max_position_embeddings", None)
    enc = [encode(lm.tokenizer, s, chat=cfg.chat, max_length=max_len) for s in samples]
    sets, fs = [], []
    with bar(len(enc), desc=f"decouple ({cfg.method})", unit="sample", progress=progress) as pbar:
        step = cfg.batch_size if cfg.method != "ig" else 1
        for b in range(0, len(enc), step):
            chunk = enc[b:b + step]
            res = att.score_batch([(e.input_ids, e.prompt_len) for e in chunk])
            scores = torch.stack([r.scores.flatten() for r in res])  # [B, L*d]
            mask = select_sigma(scores, cfg.sigma) if cfg.rule == "sigma" else select_topk(scores, cfg.topk)
            for k, r in enumerate(res):
                sets.append(np.nonzero(mask[k].numpy())[0].astype(np.int64))
                fs.append(r.f)
            pbar.update(len(chunk))
    return sets, np.asarray(fs, dtype=np.float64)


def decouple(lm, cfg: DecoupleConfig | None = None, out_dir: Path | str | None = None,
             progress: bool | None = None) -> DecoupleResult:
    """Build the comparative groups of every domain, localize every member, and measure within-group agreement."""
    cfg = cfg or DecoupleConfig()
    t0 = time.time()
    doms = {}
    timing = {}
    skipped: dict[str, str] = {}
    for domain in cfg.domains:
        t1 = time.time()
        pool, groups, items = build_groups(domain, cfg)
        missing = [k for k in ("commonality", "content") if len(groups[k]) < 2]
        if missing:
            why = (f"fewer than 2 {' / '.join(missing)} groups of {cfg.group_size} can be built from this data "
                   f"({ {k: len(v) for k, v in groups.items()} })")
            log.warning("%s skipped: %s", domain, why)
            skipped[domain] = why
            continue
        idx = sorted({i for gs in groups.values() for g in gs for i in g.indices})
        samples = [pool[i] for i in idx]
        log.info("%s: %d groups, %d samples to localize", domain, sum(len(v) for v in groups.values()), len(samples))
        sets, fs = per_sample_sets(lm, samples, cfg, progress)
        doms[domain] = DomainResult(domain, groups, [s.id for s in samples], sets, fs,
                                    content_sharing(groups, items), idx)
        timing[domain] = round(time.time() - t1, 1)
    if not doms:
        raise DataError(f"no domain has enough comparative groups ({'; '.join(f'{k}: {v}' for k, v in skipped.items())}); "
                        "lower --group-size or raise --pool-size")
    meta = {"model_id": lm.info.get("model_id"), "model_fingerprint": lm.info.get("fingerprint"),
            "model_type": lm.site.model_type, "neuron_site": lm.site.describe()["neuron_site"],
            "seconds": round(time.time() - t0, 1), "seconds_per_domain": timing, "skipped_domains": skipped}
    res = DecoupleResult(doms, lm.site.n_layers, lm.site.d_mlp, cfg.to_dict(), meta)
    if out_dir is not None:
        res.save(out_dir)
    return res


__all__ = [
    "DecoupleConfig", "DecoupleResult", "DomainResult", "Group", "decouple", "build_groups", "gsm_groups",
    "fact_groups", "content_items", "content_sharing", "group_agreement", "symmetric_overlap", "diff_ci", "chance_iou",
    "per_sample_sets",
]
