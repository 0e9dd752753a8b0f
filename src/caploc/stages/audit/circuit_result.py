"""The knowledge-circuit audit result: per-phrasing circuits, their fidelity, reliability and size, and the
parameter sets each circuit owns (for the audit's common metric).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ... import __version__
from ...errors import CaplocError
from ...report import audit as report_audit
from ...results import atomic_save_tensors, atomic_write_json, read_result
from ...stats import bootstrap_ci, expected_random_agreement, iou
from .metrics import weighted_index_iou

log = logging.getLogger(__name__)


@dataclass
class CircuitAudit:
    """Per-phrasing circuits of a set of facts with fidelity, reliability and size numbers.

    Tensors: ``top_edges [P, k]`` (indices into ``edges``, by decreasing |score|), ``top_scores [P, k]``,
    ``edges [E, 2]`` node indices, ``m_clean``/``m_corrupt``/``m_empty`` [P], ``ratio_circuit [P]``,
    ``ratio_random [P, R]`` (P_ablated / P_full of the first target token), ``unit_sizes [U]``.
    JSON: nodes, per node its parameter units, per phrasing its fact, text and corruption, the facts, config, meta.
    """

    kind: ClassVar[str] = "circuit_audit"

    nodes: list[str]
    edges: np.ndarray
    node_units: list[list[int]]
    unit_names: list[str]
    unit_sizes: np.ndarray
    unit_ranges: dict
    phrasing_fact: np.ndarray  # [P] index into ``facts`` (the audited facts)
    phrasing_slot: np.ndarray  # [P] index of the phrasing among its fact's phrasings
    phrasing_text: list[str]
    phrasing_corruption: list[str]
    facts: list[dict]  # audited facts: id, subject, attribute, relation_id, input_index, n_phrasings
    top_edges: np.ndarray
    top_scores: np.ndarray
    m_clean: np.ndarray
    m_corrupt: np.ndarray
    m_empty: np.ndarray
    ratio_circuit: np.ndarray
    ratio_random: np.ndarray
    total_params: int
    config: dict
    meta: dict = field(default_factory=dict)
    n_input_facts: int | None = None  # facts passed in (some may have been skipped)

    # ---- derived sets --------------------------------------------------------------------------------------------
    @property
    def n_phrasings(self) -> int:
        return len(self.phrasing_text)

    def edge_sets(self) -> list[np.ndarray]:
        return [np.sort(r) for r in self.top_edges]

    def node_sets(self) -> list[np.ndarray]:
        out = []
        for r in self.top_edges:
            e = self.edges[r]
            out.append(np.unique(np.concatenate([e[:, 0], e[:, 1]])))
        return out

    def unit_sets(self, node_sets: list[np.ndarray] | None = None) -> list[np.ndarray]:
        ns = self.node_sets() if node_sets is None else node_sets
        return [np.unique(np.asarray([u for n in s for u in self.node_units[int(n)]], dtype=np.int64)) for s in ns]

    @property
    def universe(self) -> dict[str, int]:
        """{parameter unit: parameter count} of every head / MLP unit (for random-set baselines)."""
        return {n: int(w) for n, w in zip(self.unit_names, self.unit_sizes)}

    @property
    def param_sets(self) -> list[list[dict[str, int] | None]]:
        """Per INPUT fact, per phrasing: the circuit's parameter units {unit: parameter count} (None where a fact or
        phrasing was not audited). See :func:`param_sets`."""
        return param_sets(self)

    def param_share(self) -> np.ndarray:
        return np.array([self.unit_sizes[u].sum() / self.total_params for u in self.unit_sets()])

    # ---- fidelity ------------------------------------------------------------------------------------------------
    def _pairs(self):
        f = self.phrasing_fact
        same, rel, other = [], [], []
        rels = [self.facts[int(i)]["relation_id"] for i in f]
        for i, j in itertools.combinations(range(self.n_phrasings), 2):
            if f[i] == f[j]:
                same.append((i, j))
            elif rels[i] == rels[j]:
                rel.append((i, j))
            else:
                other.append((i, j))
        return same, rel, other

    def fidelity(self, seed: int = 0, n_draws: int | None = None) -> dict:
        """Pairwise IoU of edge / node / parameter sets: paraphrases of one fact (per fact mean, then mean over
        facts with a bootstrap CI) vs phrasings of different facts (same relation, other relations) vs random sets
        of the same size (edges: exact expectation; nodes / parameters: random edge sets of the same size)."""
        es, ns = self.edge_sets(), self.node_sets()
        us = self.unit_sets(ns)
        w = self.unit_sizes.astype(np.float64)
        fns = {"edge_iou": lambda i, j: iou(es[i], es[j]), "node_iou": lambda i, j: iou(ns[i], ns[j]),
               "param_iou": lambda i, j: weighted_index_iou(us[i], us[j], w)}
        same, rel, other = self._pairs()
        rng = np.random.default_rng(seed)
        if len(rel) > 2000:
            rel = [rel[k] for k in rng.choice(len(rel), 2000, replace=False)]
        if len(other) > 2000:
            other = [other[k] for k in rng.choice(len(other), 2000, replace=False)]
        out: dict[str, Any] = {"n_facts": len(self.facts), "n_phrasings": self.n_phrasings,
                               "n_pairs": {"paraphrase": len(same), "same_relation": len(rel), "other_relation": len(other)}}
        E, k = len(self.edges), self.top_edges.shape[1]
        n_draws = n_draws or int(self.config.get("fidelity_draws", 200))
        rnd_nodes, rnd_params = [], []
        for _ in range(n_draws):
            a, b = rng.choice(E, k, replace=False), rng.choice(E, k, replace=False)
            na, nb = self._nodes_of(a), self._nodes_of(b)
            rnd_nodes.append(iou(na, nb))
            ua, ub = self.unit_sets([na, nb])
            rnd_params.append(weighted_index_iou(ua, ub, w))
        chance = {"edge_iou": expected_random_agreement([k], [k], E)["iou"], "node_iou": float(np.mean(rnd_nodes)),
                  "param_iou": float(np.mean(rnd_params))}
        for name, fn in fns.items():
            per_fact: dict[int, list[float]] = {}
            for i, j in same:
                per_fact.setdefault(int(self.phrasing_fact[i]), []).append(fn(i, j))
            vals = np.array([np.mean(v) for v in per_fact.values()])
            est, lo, hi = bootstrap_ci(vals, seed=seed) if len(vals) else (float("nan"),) * 3
            rel_v = np.array([fn(i, j) for i, j in rel]) if rel else np.array([])
            oth_v = np.array([fn(i, j) for i, j in other]) if other else np.array([])
            out[name] = {
                "paraphrase": est, "ci": [lo, hi], "per_fact": vals.tolist(),
                "same_relation_other_fact": float(rel_v.mean()) if rel_v.size else float("nan"),
                "other_relation": float(oth_v.mean()) if oth_v.size else float("nan"),
                "random_same_size": chance[name],
            }
        return out

    def _nodes_of(self, edge_idx) -> np.ndarray:
        e = self.edges[edge_idx]
        return np.unique(np.concatenate([e[:, 0], e[:, 1]]))

    # ---- reliability ---------------------------------------------------------------------------------------------
    def reliability(self, threshold: float = 0.5, seed: int = 0) -> dict:
        rc = self.ratio_circuit
        rr = self.ratio_random
        re = np.exp(self.m_empty - self.m_clean) if self.config.get("metric") != "logit" else np.full_like(rc, np.nan)
        out = {"threshold": threshold, "n_phrasings": int(len(rc))}
        for name, v in (("circuit", rc), ("random", rr.mean(1)), ("empty", re)):
            est, lo, hi = bootstrap_ci(v, seed=seed)
            out[name] = {"mean_ratio": est, "ci": [lo, hi], "median_ratio": float(np.nanmedian(v))}
        for name, v in (("circuit", rc[:, None]), ("random", rr), ("empty", re[:, None])):
            share = (v >= threshold).mean(1)
            est, lo, hi = bootstrap_ci(share, seed=seed)
            out[name]["share_keeps"] = est
            out[name]["share_keeps_ci"] = [lo, hi]
        return out

    # ---- size ----------------------------------------------------------------------------------------------------
    def size(self) -> dict:
        ns = self.node_sets()
        n_nodes = len(self.nodes) - 2  # heads + MLPs (emb / logits are always there)
        inner = [int(np.sum((s > 0) & (s < len(self.nodes) - 1))) for s in ns]
        ps = self.param_share()
        return {"top_k_edges": int(self.top_edges.shape[1]), "n_edges": int(len(self.edges)),
                "edge_share": self.top_edges.shape[1] / len(self.edges),
                "nodes_mean": float(np.mean(inner)), "node_share_mean": float(np.mean(inner)) / n_nodes,
                "param_share_mean": float(ps.mean()), "param_share_min": float(ps.min()), "param_share_max": float(ps.max())}

    @property
    def provenance(self) -> dict:
        """The model and data set the circuits were built on."""
        return {k: self.meta.get(k) for k in ("model_id", "model_fingerprint", "dataset", "dataset_fingerprint")}

    # ---- report ----------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"fidelity": self.fidelity(seed=int(self.config.get("seed", 0))), "reliability": self.reliability(),
                "size": self.size(), "m_clean_mean": float(self.m_clean.mean()),
                "m_corrupt_mean": float(self.m_corrupt.mean()),
                "corruptions": {c: self.phrasing_corruption.count(c) for c in sorted(set(self.phrasing_corruption))}}

    def to_report(self, out_dir: Path | str | None = None) -> dict:
        """The report.json dict; figures are written into ``out_dir`` when given."""
        return report_audit.circuit_report(self, self.summary(), out_dir)

    # ---- save / load -----------------------------------------------------------------------------------------------
    def save(self, out_dir: Path | str, report: bool = True) -> Path:
        """Write ``circuits.safetensors`` + ``circuits.json`` (+ ``report.json`` and figures) atomically."""
        out_dir = Path(out_dir)
        t = {
            "edges": torch.from_numpy(np.ascontiguousarray(self.edges, dtype=np.int64)),
            "top_edges": torch.from_numpy(np.ascontiguousarray(self.top_edges, dtype=np.int64)),
            "top_scores": torch.from_numpy(np.ascontiguousarray(self.top_scores, dtype=np.float32)),
            "phrasing_fact": torch.from_numpy(np.ascontiguousarray(self.phrasing_fact, dtype=np.int64)),
            "phrasing_slot": torch.from_numpy(np.ascontiguousarray(self.phrasing_slot, dtype=np.int64)),
            "unit_sizes": torch.from_numpy(np.ascontiguousarray(self.unit_sizes, dtype=np.int64)),
        }
        for k in ("m_clean", "m_corrupt", "m_empty", "ratio_circuit", "ratio_random"):
            t[k] = torch.from_numpy(np.ascontiguousarray(getattr(self, k), dtype=np.float64))
        atomic_save_tensors(out_dir / "circuits.safetensors", t)
        js = {"kind": "circuit_audit", "caploc_version": __version__, "nodes": self.nodes, "node_units": self.node_units,
              "unit_names": self.unit_names, "unit_ranges": self.unit_ranges, "phrasing_text": self.phrasing_text,
              "phrasing_corruption": self.phrasing_corruption, "facts": self.facts, "total_params": self.total_params, "n_input_facts": self.n_input_facts,
              "config": self.config, "meta": self.meta}
        atomic_write_json(out_dir / "circuits.json", js)
        if report:  # last: a directory with report.json holds a complete result
            atomic_write_json(out_dir / "report.json", self.to_report(out_dir))
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> "CircuitAudit":
        js, t = read_result(out_dir, "circuits.json", "circuit_audit", "circuit audit", "circuits.safetensors")
        t = {k: v.numpy() for k, v in t.items()}
        return cls(nodes=js["nodes"], edges=t["edges"], node_units=js["node_units"], unit_names=js["unit_names"],
                   unit_sizes=t["unit_sizes"], unit_ranges={k: [tuple(r) for r in v] for k, v in js["unit_ranges"].items()},
                   phrasing_fact=t["phrasing_fact"], phrasing_slot=t["phrasing_slot"], phrasing_text=js["phrasing_text"],
                   phrasing_corruption=js["phrasing_corruption"], facts=js["facts"], top_edges=t["top_edges"],
                   top_scores=t["top_scores"], m_clean=t["m_clean"], m_corrupt=t["m_corrupt"], m_empty=t["m_empty"],
                   ratio_circuit=t["ratio_circuit"], ratio_random=t["ratio_random"],
                   total_params=int(js["total_params"]), config=js["config"], meta=js["meta"],
                   n_input_facts=js.get("n_input_facts"))


# ---------------------------------------------------------------------------------------------------------------------
# parameter sets for the common audit metric
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ParamSet:
    """A set of parameter entries: per parameter name a list of ``(dim, start, stop)`` slices (``dim = -1``: the whole
    tensor). ``shapes`` gives each named parameter's shape so sets from different methods can be intersected."""

    ranges: dict[str, list[tuple[int, int, int]]]
    shapes: dict[str, tuple[int, ...]]

    def masks(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, rs in self.ranges.items():
            m = torch.zeros(self.shapes[name], dtype=torch.bool)
            for dim, a, b in rs:
                if dim < 0:
                    m[...] = True
                else:
                    m.narrow(dim, a, b - a).fill_(True)
            out[name] = m
        return out

    def n_params(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks().values()))

    def iou(self, other: "ParamSet") -> float:
        """Element-level IoU (parameters counted once each)."""
        a, b = self.masks(), other.masks()
        inter = union = 0
        for name in set(a) | set(b):
            ma, mb = a.get(name), b.get(name)
            if ma is None:
                union += int(mb.sum())
            elif mb is None:
                union += int(ma.sum())
            else:
                inter += int((ma & mb).sum())
                union += int((ma | mb).sum())
        return inter / union if union else float("nan")


def param_sets(audit: CircuitAudit) -> list[list[dict[str, int] | None]]:
    """The common-metric localization of every phrasing: per INPUT fact (in the order given to
    :func:`audit_circuits`), per phrasing, the parameter units its circuit's nodes own as {unit: parameter count}
    (None for facts / phrasings that were not audited). Units are disjoint, so the parameter-weighted IoU of two such
    dicts is the element-level IoU of the parameter sets (``stages.audit.metrics.weighted_iou``)."""
    n_in = audit.n_input_facts if audit.n_input_facts is not None else len(audit.facts)
    out: list[list[dict[str, int] | None] | None] = [None] * n_in
    for f in audit.facts:
        out[int(f.get("input_index", audit.facts.index(f)))] = [None] * int(f.get("n_phrasings", 0) or 0)
    for i, us in enumerate(audit.unit_sets()):
        f = audit.facts[int(audit.phrasing_fact[i])]
        row = out[int(f.get("input_index", audit.phrasing_fact[i]))]
        slot = int(audit.phrasing_slot[i])
        while len(row) <= slot:
            row.append(None)
        row[slot] = {audit.unit_names[int(u)]: int(audit.unit_sizes[int(u)]) for u in us}
    return [r if r is not None else [] for r in out]


def param_ranges(audit: CircuitAudit, shapes: dict[str, tuple[int, ...]] | None = None) -> list[ParamSet]:
    """Per audited phrasing (aligned with ``audit.phrasing_text``) the circuit's parameters as slices of named
    parameter tensors, for element-level comparison with other localizations. ``shapes`` defaults to the shapes
    recorded in the audit (``meta['param_shapes']``)."""
    shapes = shapes or {k: tuple(v) for k, v in audit.meta.get("param_shapes", {}).items()}
    out = []
    for us in audit.unit_sets():
        ranges: dict[str, list[tuple[int, int, int]]] = {}
        for u in us:
            for name, dim, a, b in audit.unit_ranges[audit.unit_names[int(u)]]:
                ranges.setdefault(name, []).append((int(dim), int(a), int(b)))
        missing = [n for n in ranges if n not in shapes]
        if missing:
            raise CaplocError(f"parameter shapes unknown for {missing[:3]}; pass shapes from model.named_parameters()")
        out.append(ParamSet(ranges, {n: shapes[n] for n in ranges}))
    return out
