"""The individual-knowledge audit (Huang et al., ICLR 2025, §3): can existing methods localize ONE fact?

For each fact (a prompt, its paraphrases, one target) every method (:mod:`caploc.stages.audit.methods`) localizes
something per phrasing:

* ``kn`` — knowledge neurons (:mod:`~caploc.stages.audit.kn`): per-phrasing coarse neuron sets, refined across phrasings;
* ``cnl`` — caploc's own per-sample rule applied to single phrasings (:mod:`~caploc.stages.audit.cnl`);
* ``tracing`` — ROME causal tracing (:mod:`~caploc.stages.audit.tracing`): per-phrasing peak sites / peak MLP layer;
* ``circuits`` — knowledge circuits by edge attribution patching (:mod:`~caploc.stages.audit.circuits`), set-level.

**Fidelity** = agreement of the localizations between paraphrases of the same fact, as one common metric (IoU of the
localized parameter sets, :mod:`caploc.stages.audit.metrics`) next to random, same-template/other-fact and
unrelated-fact controls. **Reliability** = the method's own manipulation does what it promises (see each method).

Every fact is written to ``out/facts/`` as soon as it is finished (JSON + safetensors); rerunning the same command
resumes, and a larger ``n_facts`` with the same seed reuses the finished facts (the fact order is a seeded scan).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from ...data import pad_id
from ...progress import bar
from ...results import atomic_save_tensors, atomic_write_json
from ...runs import commit
from .base import FactJob, Method
from .config import AuditConfig
from .facts import Fact, encode_fact, select_facts
from .methods import selected
from .metrics import control_partners
from .result import AuditResult, load_traces, summarize

log = logging.getLogger(__name__)


def audit_fact(methods: list[Method], job: FactJob) -> tuple[dict, dict]:
    """All per-phrasing measurements of one fact by the per-fact ``methods`` -> (JSON record, tensors)."""
    rec: dict = {"index": job.index, "fact": job.fact.to_json(), "n_phrasings": len(job.encoded), "timing": job.timing}
    tensors: dict = {}
    for m in methods:
        rec[m.name], t = m.localize(job)
        tensors.update(t)
    return rec, tensors


def _reusable(jp: Path, tp: Path, key: str, fact: Fact) -> dict | None:
    """The stored record of a fact when it was made with the same settings (resume), else None."""
    if not jp.exists():
        return None
    try:
        old = json.loads(jp.read_text())
    except (OSError, ValueError):
        return None
    if old.get("config_key") == key and old.get("fact", {}).get("id") == fact.id and (
            tp.exists() or not old.get("has_tensors")):
        return old
    return None


def _model_info(lm) -> dict:
    site = lm.site
    info = {k: lm.info.get(k) for k in ("model_id", "model_type", "fingerprint", "dtype")}
    info.update(n_layers=site.n_layers, d_mlp=site.d_mlp, params_per_neuron=site.params_per_neuron(),
                neuron_site=site.describe()["neuron_site"])
    return info


def run_audit(lm, dataset, cfg: AuditConfig, out_dir: Path | str, *, overwrite: bool = False,
              progress: bool | None = None) -> AuditResult:
    """Run the audit of ``dataset``'s facts on ``lm`` into ``out_dir`` (resumable) and write its report."""
    out_dir = Path(out_dir)
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir / "facts", ignore_errors=True)
    t_start = time.time()
    classes = selected(cfg.methods)
    facts, probes, selection = select_facts(lm, dataset, cfg, need_subject=any(c.needs_subject and c.per_fact
                                                                               for c in classes))
    log.info("selected %d facts (%d of %d scanned facts known)", len(facts), selection["n_known_scanned"],
             selection["n_scanned"])
    model_info = _model_info(lm)
    key = cfg.fact_key()
    methods = [c(lm, cfg) for c in classes]
    per_fact = [m for m in methods if m.per_fact]
    tok = lm.tokenizer
    pad = pad_id(tok, lm.model.config)
    partners = control_partners(facts, cfg.seed)
    fdir = out_dir / "facts"
    AuditResult(config=cfg.to_dict(), model=model_info, selection=selection, facts=facts, probes=probes, records=[],
                traces=None, circuits={}, complete=False).write_meta(out_dir, key)
    records, traces = [], []
    reused = 0
    with bar(len(facts), desc="audit", unit="fact", progress=progress) as b:
        for i, f in enumerate(facts):
            jp, tp = fdir / f"fact_{i:05d}.json", fdir / f"fact_{i:05d}.safetensors"
            rec = _reusable(jp, tp, key, f)
            if rec is not None:
                reused += 1
            else:
                off = partners[i]["unrelated"]
                off_fact = facts[off["fact"]] if off else (facts[(i + 1) % len(facts)] if len(facts) > 1 else None)
                job = FactJob(fact=f, index=i, encoded=encode_fact(tok, f, chat=cfg.chat),
                              off_encoded=encode_fact(tok, off_fact, chat=cfg.chat) if off_fact is not None else None,
                              pad=pad)
                rec, tensors = audit_fact(per_fact, job)
                rec["config_key"] = key
                rec["has_tensors"] = bool(tensors)
                if tensors:
                    atomic_save_tensors(tp, tensors)
                elif tp.exists():
                    tp.unlink()
                atomic_write_json(jp, rec)
                log.info("fact %d/%d (%s, %d phrasings) done: %s", i + 1, len(facts), f.id, len(f.phrasings),
                         ", ".join(f"{k} {v:.1f}s" for k, v in rec["timing"].items()))
            records.append(rec)
            traces.append(load_traces(out_dir, rec) if "tracing" in rec else None)
            b.update(1)
    # remove records beyond n_facts from an earlier, larger run so load() sees exactly this audit
    for p in fdir.glob("fact_*.json"):
        try:
            if int(p.stem.split("_")[1]) >= len(facts):
                p.unlink()
                p.with_suffix(".safetensors").unlink(missing_ok=True)
        except ValueError:
            pass
    circuits: dict = {"status": "not requested"}
    for m in methods:
        if not m.per_fact:
            circuits = m.localize_all(facts, out_dir)
    result = AuditResult(config=cfg.to_dict(), model=model_info, selection=selection, facts=facts, probes=probes,
                         records=records, traces=traces if "tracing" in cfg.methods else None, circuits=circuits,
                         out_dir=out_dir)
    result.summary = summarize(result)
    result.summary["reused_facts"] = reused
    result.summary["seconds_this_run"] = round(time.time() - t_start, 1)
    for m in methods:
        result.summary.update(m.run_info())
    commit(result, out_dir)  # facts, audit.json, then figures and report.json (last)
    return result


__all__ = ["audit_fact", "run_audit"]
