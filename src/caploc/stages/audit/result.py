"""The audit's result: everything measured per fact, the pure summary over facts, save / load of a result directory.

Layout of a result directory (unchanged since format 1): ``audit.json`` (config, model, selection, facts, probes,
circuits entry, summary, ``complete``, ``fact_key``), ``facts/fact_XXXXX.json`` + ``.safetensors`` (one finished fact
each), ``circuits_sets.json`` (circuit parameter sets), ``circuits/`` (the circuit audit) and ``report.json`` + figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ... import __version__
from ...errors import CaplocError
from ...report import audit as report_audit
from ...report.audit import strict_json
from ...results import atomic_save_tensors, atomic_write_json, read_json, read_tensors
from .facts import Fact
from .methods import METHODS
from .metrics import control_partners
from .tracer import PhrasingTrace

FORMAT = 1
#: the per-fact timing keys summed in ``summary["timing_s"]``
TIMING_KEYS = ("kn_attribution", "kn_manipulation", "cnl", "tracing")


@dataclass
class AuditResult:
    """Everything the audit measured, its summary, and the report. ``save``/``load`` a directory."""

    kind: ClassVar[str] = "audit"

    config: dict
    model: dict
    selection: dict
    facts: list[Fact]
    probes: list[dict]
    records: list[dict]
    traces: list[list[PhrasingTrace]] | None
    circuits: dict
    summary: dict = field(default_factory=dict)
    out_dir: Path | None = None
    complete: bool = True  # False: loaded from an unfinished run (only its finished facts)

    @property
    def provenance(self) -> dict:
        """The model this audit ran on (the audit records no dataset fingerprint of its own)."""
        return self.model

    # ---- save / load ------------------------------------------------------------------------------------------------
    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        fdir = out_dir / "facts"
        for rec in self.records:
            p = fdir / f"fact_{rec['index']:05d}.json"
            if not p.exists():
                atomic_write_json(p, rec)
        if self.traces is not None:
            for rec, trs in zip(self.records, self.traces):
                t = fdir / f"fact_{rec['index']:05d}.safetensors"
                if not t.exists() and trs:
                    atomic_save_tensors(t, {f"trace.p_restored.{j}": tr.p_restored for j, tr in enumerate(trs)})
        if "param_sets" in self.circuits:
            atomic_write_json(out_dir / "circuits_sets.json", {"param_sets": self.circuits["param_sets"],
                                                              "universe": self.circuits.get("universe")})
        self.write_meta(out_dir, self.records[0].get("config_key") if self.records else None)
        self.out_dir = out_dir
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str, allow_partial: bool = False) -> "AuditResult":
        """Load a finished audit; ``allow_partial=True`` also loads a running/interrupted one (its finished facts, in
        order, with ``complete=False``; the summary is then recomputed by :func:`summarize`)."""
        out_dir = Path(out_dir)
        meta = read_json(out_dir / "audit.json")
        if meta.get("kind") != "audit":
            raise CaplocError(f"{out_dir}/audit.json is not a caploc audit result (kind={meta.get('kind')!r})")
        complete = bool(meta.get("complete", True))
        if not complete and not allow_partial:
            raise CaplocError(f"{out_dir} holds an unfinished audit; rerun the same command to finish it, or load it "
                              "with allow_partial=True (CLI: --report-only)")
        facts = [Fact.from_json(f) for f in meta["facts"]]
        key = meta.get("fact_key")
        records, traces = [], []
        for i in range(len(facts)):
            p = out_dir / "facts" / f"fact_{i:05d}.json"
            rec = read_json(p) if p.exists() else None
            if rec is not None and key is not None and rec.get("config_key") != key:
                rec = None  # a stale record of another configuration
            if rec is None:
                if not allow_partial:
                    raise CaplocError(f"{p} is missing: the audit directory is incomplete; rerun the same audit command")
                complete = False
                break
            records.append(rec)
            traces.append(load_traces(out_dir, rec))
        if not records:
            raise CaplocError(f"{out_dir} has no finished fact yet")
        n = len(records)
        circ = dict(meta.get("circuits", {}))
        cs = out_dir / "circuits_sets.json"
        if cs.exists():
            circ.update(read_json(cs))
        res = cls(meta["config"], meta["model"], meta["selection"], facts[:n], meta["probes"][:n], records,
                  traces if any(t is not None for t in traces) else None, circ, meta.get("summary", {}), out_dir,
                  complete)
        if not complete:
            res.summary = summarize(res)
        return res

    def write_meta(self, out_dir: Path, fact_key: str | None) -> None:
        """``audit.json`` (written first with ``complete=False`` so an interrupted run is recognized, then last)."""
        circ = {k: v for k, v in self.circuits.items() if k not in ("param_sets", "universe")}
        atomic_write_json(Path(out_dir) / "audit.json", {
            "kind": "audit", "format": FORMAT, "caploc_version": __version__, "config": self.config,
            "model": self.model, "selection": self.selection, "facts": [f.to_json() for f in self.facts],
            "probes": self.probes, "circuits": strict_json(circ), "summary": strict_json(self.summary),
            "complete": self.complete, "fact_key": fact_key,
        })

    # ---- reporting --------------------------------------------------------------------------------------------------
    def report(self) -> dict:
        """The report.json dict (tables, figure entries, claims); see docs/DEVELOPING.md."""
        return report_audit.build_report(self, self.summary or summarize(self))

    def to_report(self, out_dir: Path | str | None = None) -> dict:
        """Write the PNG figures into ``out_dir`` (default: where the result was saved); return the report.json dict."""
        return report_audit.audit_report(self, self.summary or summarize(self), Path(out_dir or self.out_dir))

    def write_report(self, out_dir: Path | str | None = None) -> Path:
        """Write the figures and then report.json into ``out_dir`` (default: where the result was saved)."""
        return report_audit.write_report(self, self.summary or summarize(self), Path(out_dir or self.out_dir))


def load_traces(out_dir: Path, rec: dict) -> list[PhrasingTrace] | None:
    """The traces of one stored fact record (None when it has no tracing entry)."""
    if "tracing" not in rec:
        return None
    t = read_tensors(out_dir / "facts" / f"fact_{rec['index']:05d}.safetensors", "audit fact")
    return [PhrasingTrace.from_json(d, t[f"trace.p_restored.{j}"]) for j, d in enumerate(rec["tracing"]["traces"])]


def summarize(result: AuditResult) -> dict:
    """Records -> the summary over facts (pure: a loaded or unfinished result is summarized the same way)."""
    seed = int(result.config["seed"])
    partners = control_partners(result.facts, seed)
    recs = result.records
    s: dict = {"n_facts": len(recs), "n_phrasings": int(sum(r["n_phrasings"] for r in recs)),
               "phrasings_per_fact": float(np.mean([r["n_phrasings"] for r in recs])) if recs else float("nan"),
               "n_same_template_partners": sum(1 for p in partners if p["same_template"]),
               "n_unrelated_partners": sum(1 for p in partners if p["unrelated"])}
    probes = result.probes
    s["p_target_prompt_mean"] = float(np.mean([p["p"][0] for p in probes])) if probes else float("nan")
    s["p_target_paraphrases_mean"] = float(np.mean([x for p in probes for x in p["p"][1:]])) if probes else float("nan")
    s["top1_paraphrases_rate"] = float(np.mean([x == 0 for p in probes for x in p["rank"][1:]])) if probes else float("nan")
    for name, method in METHODS.items():
        m = method.summarize(result, partners)
        if m is not None:
            s[name] = m
    s["timing_s"] = {k: float(sum(r["timing"].get(k, 0.0) for r in recs)) for k in TIMING_KEYS}
    return s


__all__ = ["AuditResult", "FORMAT", "load_traces", "summarize"]
