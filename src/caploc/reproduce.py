"""``caploc reproduce CONFIG``: the whole study from one TOML file, cached and resumable per stage, one report.

A study runs these stages in order (each can be switched off with ``enabled = false``):

    locate -> stability -> sweep -> crosscap -> contrast -> intervene -> finetune -> audit -> decouple -> report

Every stage calls the same library function its single verb calls, with the config parsed from its section
(:mod:`caploc.study`), and writes its own result directory under ``[study].out`` plus ``.stage.json`` with a
fingerprint of everything the stage depends on (its resolved settings, the study's model and seed, and the fingerprints
of the stages it reads). A rerun skips a stage whose fingerprint is unchanged and reruns a stage whose inputs changed
(and every stage downstream of it). Evaluation sets come from :func:`caploc.evalsets.eval_sets`, the builder ``eval``,
``intervene`` and ``finetune`` use. Then the report assembles all stage reports, a run manifest (package versions,
model and data fingerprints, seeds, timings) and the paper-claim table (:mod:`caploc.report.claims`).
"""
from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .data import load_dataset
from .errors import CaplocError
from .evalsets import eval_sets
from .localize import locate
from .models import load_model
from .report import build_report
from .report.claims import claim_table
from .report.locate import locate_report
from .results import NeuronSet, OutLock, atomic_write_json, check_out_dir, config_key, read_json
from .stages.audit import run_audit
from .stages.contrast import contrast
from .stages.crosscap import crosscap
from .stages.decouple import decouple
from .stages.finetune import finetune, finetune_data
from .stages.intervene import run_intervention
from .stages.stability import stability
from .stages.sweep import sweep
from .study import DEPENDS, STAGES, Study, load_study, validate

log = logging.getLogger(__name__)


@dataclass
class _Ctx:
    study: Study
    lm_loader: Callable[[], Any]
    _lm: Any = None
    fingerprints: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def lm(self):
        if self._lm is None:
            self._lm = self.lm_loader()
        return self._lm

    def dir(self, stage: str) -> Path:
        return self.study.out / stage

    @property
    def seed(self) -> int:
        return self.study.settings.seed


# ---------------------------------------------------------------------------------------------------------------------
# stages: each one library call with the section's config
# ---------------------------------------------------------------------------------------------------------------------
def _locate_data(ctx: _Ctx):
    d = ctx.study.extras["locate"]
    return load_dataset(d.data, n=d.n, seed=ctx.seed, target=d.target, prompt_field=d.prompt_field,
                        target_field=d.target_field, group_field=d.group_field)


def _fields(ctx: _Ctx) -> dict:
    d = ctx.study.extras["locate"]
    return {k: getattr(d, k) for k in ("prompt_field", "target_field", "group_field") if getattr(d, k) is not None}


def _stage_locate(ctx: _Ctx, out: Path) -> None:
    res = locate(ctx.lm, _locate_data(ctx), ctx.study.configs["locate"], out)
    atomic_write_json(out / "report.json", locate_report(res.neurons))


def _stage_stability(ctx: _Ctx, out: Path) -> None:
    stability(ctx.dir("locate"), ctx.study.configs["stability"], out_dir=out)


def _stage_sweep(ctx: _Ctx, out: Path) -> None:
    sweep(ctx.dir("locate"), ctx.study.configs["sweep"], out_dir=out)


def _capabilities(ctx: _Ctx) -> dict:
    loc = ctx.study.extras["locate"]
    own = {loc.data.replace("rg:", ""): {"data": loc.data, **_fields(ctx)}}
    return {**own, **dict(ctx.study.extras["crosscap"].capabilities)}


def _stage_crosscap(ctx: _Ctx, out: Path) -> None:
    loc = ctx.study.extras["locate"]
    crosscap(_capabilities(ctx), ctx.study.configs["locate"], out, ctx.study.configs["crosscap"],
             lm_factory=lambda: ctx.lm, runs={loc.data.replace("rg:", ""): ctx.dir("locate")})


def _stage_contrast(ctx: _Ctx, out: Path) -> None:
    c = ctx.study.extras["contrast"]
    refs = []
    for r in c.references:
        d = ctx.dir("crosscap") / "runs" / r
        refs.append(str(d) if (d / "neurons.json").exists() else r)  # a dataset spec is localized with the same settings
    contrast(ctx.dir("locate"), refs, ctx.study.configs["contrast"], out_dir=out, lm=ctx.lm,
             split_seeds=c.split_seeds, seed=ctx.seed)


def _stage_intervene(ctx: _Ctx, out: Path) -> None:
    iv, loc = ctx.study.extras["intervene"], ctx.study.extras["locate"]
    meta = read_json(ctx.dir("locate") / "neurons.json")
    sets = eval_sets([loc.data, *iv.off_target], n=iv.n, seed=ctx.seed + 1, neuron_meta=meta,
                     heldout=iv.held_out_templates, target=loc.target, load_kw=_fields(ctx))
    candidates = {"plain": ctx.dir("locate")} if "plain" in iv.sets else {}
    if "contrastive" in iv.sets and (ctx.dir("contrast") / "neurons.json").exists():
        candidates["contrastive"] = ctx.dir("contrast")
    for name, d in candidates.items():
        ns = NeuronSet.load(d)
        if len(ns) == 0:
            log.warning("the %s neuron set is empty; skipping its interventions", name)
            continue
        run_intervention(ctx.lm, ns, sets, ctx.study.configs["intervene"], out_dir=out / name)


def _stage_finetune(ctx: _Ctx, out: Path) -> None:
    ft, loc = ctx.study.extras["finetune"], ctx.study.extras["locate"]
    ns = NeuronSet.load(ctx.dir("locate"))
    train, sets, on = finetune_data(loc.data, ft.n_train, ft.n_eval, eval_data=ft.eval_data, seed=ctx.seed,
                                    data_seed=ctx.seed + 1, target=loc.target, neuron_meta=ns.meta)
    cfg = ctx.study.configs["finetune"]
    if not len(ns) and "neurons" in cfg.arms:
        log.warning("the located set is empty: fine-tuning without the neurons arm")
        cfg = dataclasses.replace(cfg, arms=tuple(a for a in cfg.arms if a != "neurons"))
    # this runs only when the stage's fingerprint changed: arms of another configuration in its directory are stale
    finetune(ctx.lm, ns if len(ns) else None, train, cfg, out, eval_sets=sets, on_target=on, overwrite=True)


def _stage_audit(ctx: _Ctx, out: Path) -> None:
    run_audit(ctx.lm, load_dataset("facts", None, seed=ctx.seed), ctx.study.configs["audit"], out)


def _stage_decouple(ctx: _Ctx, out: Path) -> None:
    decouple(ctx.lm, ctx.study.configs["decouple"], out)


RUNNERS: dict[str, Callable[[_Ctx, Path], None]] = {
    "locate": _stage_locate, "stability": _stage_stability, "sweep": _stage_sweep, "crosscap": _stage_crosscap,
    "contrast": _stage_contrast, "intervene": _stage_intervene, "finetune": _stage_finetune, "audit": _stage_audit,
    "decouple": _stage_decouple,
}


# ---------------------------------------------------------------------------------------------------------------------
# manifest and driver
# ---------------------------------------------------------------------------------------------------------------------
def manifest(ctx: _Ctx) -> dict:
    pkgs = {}
    for name in ("torch", "transformers", "accelerate", "safetensors", "numpy", "reasoning-gym", "peft", "matplotlib"):
        try:
            pkgs[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pkgs[name] = None
    model_info = ctx._lm.info if ctx._lm is not None else None
    data_fp = {}
    for p in sorted(ctx.study.out.rglob("neurons.json")):
        try:
            m = read_json(p)
            data_fp[str(p.parent.relative_to(ctx.study.out))] = {"dataset": m.get("dataset"),
                                                                   "fingerprint": m.get("dataset_fingerprint")}
        except CaplocError:
            pass
    return {"kind": "manifest", "caploc_version": __version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "packages": pkgs, "config_source": ctx.study.source,
            "config": ctx.study.sections, "model": model_info, "datasets": data_fp, "seed": ctx.seed,
            "stage_fingerprints": ctx.fingerprints, "timings_s": ctx.timings}


def _default_loader(study: Study) -> Callable[[], Any]:
    s = study.settings
    return lambda: load_model(s.model, dtype=s.dtype, device=s.device, device_map=s.device_map)


def reproduce(study: Study, *, lm_loader: Callable[[], Any] | None = None, only: list[str] | None = None,
              force: list[str] | None = None, progress: Callable[[str, str], None] | None = None) -> dict:
    """Run (or resume) every enabled stage, then write the claim table, manifest and report. Returns paths + claims."""
    out = check_out_dir(study.out)
    with OutLock(out):
        return _reproduce(study, lm_loader or _default_loader(study), only, force, progress)


#: settings that change how a stage runs (memory, batching under a budget), not what it finds: a stage is not rerun
#: when only these change (e.g. a lower memory_mb after running out of memory), so they stay out of its fingerprint
EXECUTION_ONLY = frozenset({"memory_mb"})


def result_settings(section):
    """A stage section without :data:`EXECUTION_ONLY` keys (at any depth): what its fingerprint hashes."""
    if isinstance(section, dict):
        return {k: result_settings(v) for k, v in section.items() if k not in EXECUTION_ONLY}
    return section


def _reproduce(study: Study, lm_loader, only, force, progress) -> dict:
    out = study.out
    ctx = _Ctx(study, lm_loader)
    s = study.settings
    base = {"model": s.model, "dtype": s.dtype, "seed": s.seed, "chat": s.chat, "caploc": __version__}
    force = set(force or [])
    for stage in STAGES:
        if not study.enabled(stage) or (only and stage not in only):
            continue
        deps = {d: ctx.fingerprints.get(d) for d in DEPENDS[stage]}
        fp = config_key({"stage": stage, "section": result_settings(study.section(stage)), "base": base, "deps": deps})
        ctx.fingerprints[stage] = fp
        sdir = ctx.dir(stage)
        marker = sdir / ".stage.json"
        if marker.exists() and stage not in force:
            old = read_json(marker)
            if old.get("fingerprint") == fp:
                ctx.timings[stage] = old.get("seconds", 0.0)
                log.info("stage %s: up to date (cached)", stage)
                if progress:
                    progress(stage, "cached")
                continue
        if progress:
            progress(stage, "running")
        if marker.exists():
            marker.unlink()
        t0 = time.time()
        RUNNERS[stage](ctx, sdir)
        ctx.timings[stage] = round(time.time() - t0, 2)
        atomic_write_json(marker, {"stage": stage, "fingerprint": fp, "seconds": ctx.timings[stage],
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if progress:
            progress(stage, f"done in {ctx.timings[stage]:.0f} s")

    table = claim_table(out)
    atomic_write_json(out / "claims" / "report.json", {
        "kind": "claims", "title": "Paper claims → our result",
        "text": [f"Study '{s.name}' on {s.model} (seed {s.seed}). Each row compares a claim of Huang et al. "
                 "(ICLR 2025) with what this run measured; 'differs' means our measurement does not support the "
                 "paper's number or conclusion on this model and these settings; 'insufficient controls' means the "
                 "claim was judged against fewer random neuron sets than its stage requires."],
        "tables": [{"title": "Paper claim → our result", **table}], "figures": [], "claims": {},
    })
    atomic_write_json(out / "manifest.json", manifest(ctx))
    paths = build_report([out], out / "report", title=f"caploc study: {s.name}")
    return {"report": str(paths.html), "markdown": str(paths.md), "manifest": str(out / "manifest.json"),
            "claims": table, "timings": ctx.timings}


__all__ = ["STAGES", "DEPENDS", "load_study", "validate", "reproduce", "manifest", "RUNNERS"]
