"""``caploc reproduce CONFIG``: the whole study from one TOML file, cached and resumable per stage, one report.

A study runs these stages in order (each can be switched off with ``enabled = false``):

    locate -> stability -> sweep -> crosscap -> contrast -> intervene -> finetune -> audit -> decouple -> report

Every stage writes its own result directory under ``[study].out`` (the same library functions the single verbs call)
plus ``.stage.json`` with a fingerprint of everything the stage depends on (its config section, the study's model and
seed, and the fingerprints of the stages it reads). A rerun skips a stage whose fingerprint is unchanged and reruns a
stage whose inputs changed (and every stage downstream of it). Then ``caploc report`` assembles all stage reports, a
run manifest (package versions, model and data fingerprints, seeds, timings) and the paper-claim table, which states
plainly where our result differs from the paper.
"""
from __future__ import annotations

import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import CaplocError
from .results import atomic_write_json, config_key, read_json

log = logging.getLogger(__name__)

STAGES = ("locate", "stability", "sweep", "crosscap", "contrast", "intervene", "finetune", "audit", "decouple")
# which earlier stages each stage reads
DEPENDS = {
    "locate": (), "stability": ("locate",), "sweep": ("locate",), "crosscap": ("locate",),
    "contrast": ("locate", "crosscap"), "intervene": ("locate", "contrast"), "finetune": ("locate",),
    "audit": (), "decouple": (),
}

# ---------------------------------------------------------------------------------------------------------------------
# configuration: defaults + validation
# ---------------------------------------------------------------------------------------------------------------------
DEFAULTS: dict[str, dict[str, Any]] = {
    "study": {"name": "study", "model": "smollm2-135m", "dtype": "float32", "device": "cpu", "device_map": None,
              "seed": 0, "out": "runs/study", "chat": False},
    "locate": {"enabled": True, "data": "gsm_symbolic", "n": 48, "target": "cot", "method": "grad_x_act", "steps": 20,
               "positions": "all", "rule": "sigma", "sigma": 6.0, "topk": 50, "kn_t": 0.2, "min_freq": 0.5,
               "memory_mb": 2048.0, "batch_size": 8},
    "stability": {"enabled": True, "k": 2, "seeds": [0, 1, 2, 3, 4], "kinds": ["random", "group"]},
    "sweep": {"enabled": True, "sigmas": [2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0],
              "min_freqs": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], "topks": [10, 50, 100, 500]},
    "crosscap": {"enabled": True, "n": 32,
                 "capabilities": {"basic_arithmetic": "rg:basic_arithmetic", "letter_counting": "rg:letter_counting",
                                  "sentence_reordering": "rg:sentence_reordering", "facts": "facts",
                                  "humaneval": "humaneval"}},
    "contrast": {"enabled": True, "rule": "subtract", "references": ["facts", "letter_counting", "sentence_reordering"]},
    "intervene": {"enabled": True, "off_target": ["facts", "rg:letter_counting"], "n": 24, "held_out_templates": True,
                  "ks": [0.0, 2.0], "n_random": 10, "act_matched": True, "metrics": ["nll"],
                  "sets": ["plain", "contrastive"]},
    "finetune": {"enabled": True, "n_train": 32, "n_eval": 24, "steps": 10, "lr": 1e-3, "batch_size": 4,
                 "arms": ["neurons", "random", "full"], "n_random": 3, "eval_data": ["facts", "rg:letter_counting"]},
    "audit": {"enabled": True, "n_facts": 20, "methods": ["kn", "tracing", "cnl", "circuits"], "kn_steps": 4,
              "max_phrasings": 3, "known": "prob", "known_threshold": 0.05,
              "tracing_tokens": "subject", "tracing_kinds": ["hidden", "mlp", "attn"], "tracing_n_noise": 5},
    "decouple": {"enabled": True, "n_groups": 6, "group_size": 4, "domains": ["gsm_symbolic", "facts"],
                 "method": "grad_x_act", "gsm_target": "cot"},
}


@dataclass
class Study:
    """A validated study configuration (all sections, defaults filled in)."""

    sections: dict[str, dict[str, Any]]
    source: str = ""

    def __getitem__(self, key):
        return self.sections[key]

    @property
    def out(self) -> Path:
        return Path(self.sections["study"]["out"])


def _type_ok(default, value) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, list):
        return isinstance(value, list)
    if isinstance(default, dict):
        return isinstance(value, dict)
    return isinstance(value, type(default))


def validate(raw: dict, source: str = "") -> Study:
    """Fill defaults and check every key and type; unknown sections/keys and bad values raise a one-line error."""
    where = f" in {source}" if source else ""
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise CaplocError(f"unknown section [{unknown[0]}]{where}; known sections: {', '.join(DEFAULTS)}")
    out: dict[str, dict[str, Any]] = {}
    for sec, defaults in DEFAULTS.items():
        given = raw.get(sec, {})
        if not isinstance(given, dict):
            raise CaplocError(f"[{sec}]{where} must be a table of settings")
        bad = sorted(set(given) - set(defaults))
        if bad:
            raise CaplocError(f"unknown key '{bad[0]}' in [{sec}]{where}; known keys: {', '.join(defaults)}")
        merged = {**defaults, **given}
        for k, v in given.items():
            if not _type_ok(defaults[k], v):
                raise CaplocError(f"[{sec}] {k} = {v!r}{where} has the wrong type: expected {type(defaults[k]).__name__}")
        out[sec] = merged
    # value checks with the stages' own validators (they raise one-line CaplocErrors)
    loc = out["locate"]
    for key in ("n",):
        if loc[key] is not None and loc[key] < 2:
            raise CaplocError(f"[locate] n must be >= 2{where}, got {loc[key]}")
    if out["stability"]["k"] < 2:
        raise CaplocError(f"[stability] k must be >= 2{where}")
    if not out["stability"]["seeds"]:
        raise CaplocError(f"[stability] seeds must not be empty{where}")
    if out["intervene"]["n_random"] < 1 or out["finetune"]["steps"] < 1:
        raise CaplocError(f"[intervene] n_random and [finetune] steps must be >= 1{where}")
    bad_sets = [x for x in out["intervene"]["sets"] if x not in ("plain", "contrastive")]
    if bad_sets or not out["intervene"]["sets"]:
        raise CaplocError(f"[intervene] sets must list 'plain' and/or 'contrastive'{where}, got {out['intervene']['sets']}")
    _locate_config(out)  # AttributionConfig / LocateConfig validation
    from .audit.tracing import TracingConfig

    a = out["audit"]
    try:
        TracingConfig(tokens=a["tracing_tokens"], kinds=tuple(a["tracing_kinds"]), n_noise=a["tracing_n_noise"])
    except CaplocError as e:
        raise CaplocError(f"[audit] {e}{where}") from None
    return Study(out, source)


def builtin_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("caploc").joinpath("configs").iterdir() if p.name.endswith(".toml"))


def load_study(path_or_name: str | Path, out: str | Path | None = None) -> Study:
    """Read a TOML study file (or a built-in config by name: ``quick``, ``full``, ``paper-llama2-7b``, ``paper-gptj``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path_or_name)
    if p.exists():
        text, source = p.read_text(), str(p)
    else:
        res = resources.files("caploc").joinpath("configs", f"{path_or_name}.toml")
        if not res.is_file():
            raise CaplocError(f"study config {str(path_or_name)!r} not found: pass a .toml file or one of "
                              f"{', '.join(builtin_configs())}")
        text, source = res.read_text(), f"built-in {path_or_name}"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CaplocError(f"{source} is not valid TOML: {e}") from None
    st = validate(raw, source)
    if out is not None:
        st.sections["study"]["out"] = str(out)
    return st


# ---------------------------------------------------------------------------------------------------------------------
# helpers shared by stages
# ---------------------------------------------------------------------------------------------------------------------
def _locate_config(sections):
    from .attribution.engine import AttributionConfig
    from .localize import LocateConfig

    loc = sections["locate"]
    acfg = AttributionConfig(method=loc["method"], steps=loc["steps"], positions=loc["positions"],
                             memory_mb=loc["memory_mb"], batch_size=loc["batch_size"])
    return LocateConfig(attribution=acfg, rule=loc["rule"], sigma=loc["sigma"], topk=loc["topk"], kn_t=loc["kn_t"],
                        min_freq=loc["min_freq"], chat=sections["study"]["chat"])


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


def _dataset(spec: str, n: int | None, seed: int, target: str = "cot"):
    from .data import load_dataset

    return load_dataset(spec, n=n, seed=seed, target=target)


# ---------------------------------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------------------------------
def _stage_locate(ctx: _Ctx, out: Path) -> None:
    from .localize import locate

    st = ctx.study
    loc = st["locate"]
    ds = _dataset(loc["data"], loc["n"], st["study"]["seed"], loc["target"])
    res = locate(ctx.lm, ds, _locate_config(st.sections), out)
    _locate_report(res, out)


def _locate_report(res, out: Path) -> None:
    ns = res.neurons
    share_p = ns.share_of_params()
    atomic_write_json(out / "report.json", {
        "kind": "locate", "title": f"Commonality neurons of {ns.meta.get('dataset')}",
        "text": [f"{len(ns)} neurons = {100 * ns.share_of_neurons():.4f} % of MLP neurons"
                 + (f" = {100 * share_p:.4f} % of parameters" if share_p is not None else "")
                 + f", selected in >= {ns.meta.get('min_count')} of {ns.n_samples} samples."],
        "tables": [], "figures": [],
        "claims": {"n_neurons": {"value": len(ns)}, "share_of_params": {"value": share_p}},
    })


def _stage_stability(ctx: _Ctx, out: Path) -> None:
    from .splits import StabilityConfig
    from .stages.stability import stability

    s = ctx.study["stability"]
    stability(ctx.dir("locate"), StabilityConfig(k=s["k"], seeds=list(s["seeds"]), kinds=list(s["kinds"])),
              out_dir=out)


def _stage_sweep(ctx: _Ctx, out: Path) -> None:
    from .splits import StabilityConfig
    from .stages.sweep import SweepConfig, sweep

    s, stab = ctx.study["sweep"], ctx.study["stability"]
    sweep(ctx.dir("locate"), SweepConfig(sigmas=list(s["sigmas"]), min_freqs=list(s["min_freqs"]),
                                         topks=list(s["topks"]),
                                         split=StabilityConfig(k=stab["k"], seeds=list(stab["seeds"])[:3])),
          out_dir=out)


def _stage_crosscap(ctx: _Ctx, out: Path) -> None:
    from .splits import StabilityConfig
    from .stages.crosscap import CrossCapConfig, crosscap

    c, st = ctx.study["crosscap"], ctx.study
    caps = {st["locate"]["data"].replace("rg:", ""): st["locate"]["data"], **dict(c["capabilities"])}
    target_name = st["locate"]["data"].replace("rg:", "")
    crosscap(caps, _locate_config(st.sections), out,
             CrossCapConfig(n=c["n"], seed=st["study"]["seed"], run_samples=min(c["n"], st["locate"]["n"]),
                            split=StabilityConfig(k=st["stability"]["k"], seeds=list(st["stability"]["seeds"])[:3])),
             lm_factory=lambda: ctx.lm, runs={target_name: ctx.dir("locate")})


def _crosscap_run_dir(ctx: _Ctx, name: str) -> Path | None:
    d = ctx.dir("crosscap") / "runs" / name
    return d if (d / "neurons.json").exists() else None


def _stage_contrast(ctx: _Ctx, out: Path) -> None:
    from .contrastive import ContrastConfig, contrast

    c = ctx.study["contrast"]
    refs = []
    for r in c["references"]:
        d = _crosscap_run_dir(ctx, r)
        refs.append(str(d) if d is not None else r)  # a dataset spec is localized with the same settings
    contrast(ctx.dir("locate"), refs, ContrastConfig(rule=c["rule"]), out_dir=out, lm=ctx.lm)


def _eval_sets(ctx: _Ctx, n: int):
    """On-target held-out samples (and held-out templates) plus off-target datasets, disjoint from localization."""
    from .data import train_test_split

    st = ctx.study
    loc, iv = st["locate"], st["intervene"]
    seed = st["study"]["seed"]
    # a fresh draw with another seed: never the localization problems
    pool = _dataset(loc["data"], max(4 * n, 64), seed + 1000, loc["target"])
    sets = []
    try:
        if iv["held_out_templates"] and len(set(pool.groups())) > 1:
            loc_ds = _dataset(loc["data"], loc["n"], seed, loc["target"])
            used = set(loc_ds.groups())
            fresh = [i for i, s in enumerate(pool) if s.group not in used]
            if len(fresh) >= 4:
                sets.append((f"{pool.name} held-out templates", pool.subset(fresh[:n]), "on"))
    except CaplocError:
        pass
    _, test = train_test_split(pool, test_fraction=0.5, seed=seed)
    sets.insert(0, (f"{pool.name} held-out", test.subset(list(range(min(n, len(test))))), "on"))
    for spec in iv["off_target"]:
        sets.append((spec, _dataset(spec, n, seed + 2000), "off"))
    return sets


def _stage_intervene(ctx: _Ctx, out: Path) -> None:
    from .intervene import InterveneConfig, run_intervention
    from .results import NeuronSet

    iv, st = ctx.study["intervene"], ctx.study
    cfg = InterveneConfig(ks=tuple(float(k) for k in iv["ks"]), n_random=iv["n_random"], seed=st["study"]["seed"],
                          act_matched=iv["act_matched"], metrics=tuple(iv["metrics"]), chat=st["study"]["chat"])
    sets = _eval_sets(ctx, iv["n"])
    candidates = {"plain": ctx.dir("locate")} if "plain" in iv["sets"] else {}
    cdir = ctx.dir("contrast")
    if "contrastive" in iv["sets"] and (cdir / "neurons.json").exists():
        candidates["contrastive"] = cdir
    for name, d in candidates.items():
        ns = NeuronSet.load(d)
        if len(ns) == 0:
            log.warning("the %s neuron set is empty; skipping its interventions", name)
            continue
        run_intervention(ctx.lm, ns, sets, cfg, out_dir=out / name)


def _stage_finetune(ctx: _Ctx, out: Path) -> None:
    from .finetune import FinetuneConfig, finetune, split_for_finetune
    from .results import NeuronSet

    ft, st = ctx.study["finetune"], ctx.study
    seed = st["study"]["seed"]
    ns = NeuronSet.load(ctx.dir("locate"))
    pool = _dataset(st["locate"]["data"], ft["n_train"] + 3 * ft["n_eval"] + 16, seed + 3000, st["locate"]["target"])
    split = split_for_finetune(pool, ft["n_train"], ft["n_eval"], seed=seed)
    eval_sets = {k: v for k, v in split.items() if k != "train"}
    for spec in ft["eval_data"]:
        eval_sets[spec] = _dataset(spec, ft["n_eval"], seed + 4000)
    arms = [a for a in ft["arms"] if a != "neurons" or len(ns)]
    cfg = FinetuneConfig(arms=tuple(arms), steps=ft["steps"], lr=ft["lr"], batch_size=ft["batch_size"],
                         n_random=ft["n_random"], seed=seed, chat=st["study"]["chat"])
    on = [k for k in eval_sets if k not in ft["eval_data"]]
    finetune(ctx.lm, ns if len(ns) else None, split["train"], cfg, out, eval_sets=eval_sets, on_target=on)


def _stage_audit(ctx: _Ctx, out: Path) -> None:
    from .audit.kn import KNConfig
    from .audit.run import AuditConfig, run_audit
    from .audit.tracing import TracingConfig

    a, st = ctx.study["audit"], ctx.study
    cfg = AuditConfig(methods=tuple(a["methods"]), n_facts=a["n_facts"], seed=st["study"]["seed"],
                      max_phrasings=a["max_phrasings"], kn=KNConfig(steps=a["kn_steps"]), chat=st["study"]["chat"],
                      known=a["known"], known_threshold=a["known_threshold"],
                      tracing=TracingConfig(tokens=a["tracing_tokens"], kinds=tuple(a["tracing_kinds"]),
                                            n_noise=a["tracing_n_noise"]))
    run_audit(ctx.lm, _dataset("facts", None, st["study"]["seed"]), cfg, out)


def _stage_decouple(ctx: _Ctx, out: Path) -> None:
    from .decouple import DecoupleConfig, decouple

    d, st = ctx.study["decouple"], ctx.study
    cfg = DecoupleConfig(n_groups=d["n_groups"], group_size=d["group_size"], domains=list(d["domains"]),
                         method=d["method"], seed=st["study"]["seed"], chat=st["study"]["chat"],
                         gsm_target=d["gsm_target"])
    decouple(ctx.lm, cfg, out)


RUNNERS: dict[str, Callable[[_Ctx, Path], None]] = {
    "locate": _stage_locate, "stability": _stage_stability, "sweep": _stage_sweep, "crosscap": _stage_crosscap,
    "contrast": _stage_contrast, "intervene": _stage_intervene, "finetune": _stage_finetune, "audit": _stage_audit,
    "decouple": _stage_decouple,
}


# ---------------------------------------------------------------------------------------------------------------------
# the paper-claim table
# ---------------------------------------------------------------------------------------------------------------------
def _claims_by_kind(out: Path) -> dict[str, dict]:
    """All claims found in stage report.json files, keyed by stage name (first path component)."""
    found: dict[str, dict] = {}
    for p in sorted(out.rglob("report.json")):
        rel = p.relative_to(out).parts
        if rel[0] in ("report", "claims"):
            continue
        try:
            rep = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        key = "/".join(rel[:-1])
        found[key] = rep.get("claims") or {}
    return found


def _val(c):
    if isinstance(c, dict):
        for k in ("value", "mean", "estimate", "iou", "effect"):
            if k in c:
                return c[k]
        return None
    return c


def _num(x) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _ours(c) -> str:
    """A claim dict in one readable line: value [CI] vs the random/null distribution, z, p, sizes."""
    if not isinstance(c, dict):
        return _num(c)
    parts = [_num(_val(c))]
    ci = c.get("ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        parts[0] += f" [{_num(ci[0])}, {_num(ci[1])}]"
    mean = c.get("chance", c.get("null_mean"))
    sd = c.get("chance_sd", c.get("null_sd"))
    n = c.get("n_random", c.get("n_null"))
    if mean is not None:
        parts.append(f"random {_num(mean)}" + (f" ± {_num(sd)}" if sd is not None else "")
                     + (f" (n = {n})" if n is not None else ""))
    for key, label in (("z", "z"), ("z_on", "z on"), ("z_off", "z off"), ("p_two_sided", "p"), ("p", "p"),
                       ("k", "k"), ("dataset", "on"), ("worst_off", "worst off-target"), ("best_method", "best")):
        if key in c and c[key] is not None:
            v = c[key]
            if isinstance(v, dict):  # e.g. {"method": ..., "iou": ..., "ci": [...]}
                v = ", ".join(f"{kk} {_num(vv) if not isinstance(vv, list) else '[' + ', '.join(map(_num, vv)) + ']'}"
                              for kk, vv in v.items())
            else:
                v = _num(v)
            parts.append(f"{label}: {v}" if isinstance(c[key], dict) else f"{label} {v}")
    return "; ".join(parts)


def _holds(c) -> bool:
    return _val(c) is True or (isinstance(c, dict) and (c.get("holds") is True or c.get("beats") is True))


def _pct(x):
    return "—" if x is None else f"{100 * float(x):.2f} %"


def _find(claims: dict[str, dict], stage_prefix: str, key: str):
    for k, c in claims.items():
        if k.split("/")[0] == stage_prefix and key in c:
            return c[key], k
    return None, None


def claim_table(out: Path, study: Study) -> dict:
    """Paper claim -> our result, with a plain verdict per row."""
    claims = _claims_by_kind(out)
    rows = []

    def add(claim, paper, ours, verdict, source):
        rows.append([claim, paper, ours, verdict, source or "—"])

    ov, src = _find(claims, "stability", "split_overlap")
    io, _ = _find(claims, "stability", "split_iou")
    ch, _ = _find(claims, "stability", "chance_iou")
    if ov is not None or io is not None:
        v_io = _val(io)
        ci = io.get("ci") if isinstance(io, dict) else None
        ours = (f"overlap {_pct(_val(ov))}, IoU {_pct(v_io)}" + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")
                + f"; chance IoU {_pct(_val(ch))}")
        verdict = ("reproduced" if v_io is not None and v_io >= 0.9 else
                   "differs: agreement far above chance but below the paper" if v_io is not None and _val(ch) is not None
                   and v_io > 5 * max(_val(ch), 1e-9) else "differs")
        add("Neurons located on different splits agree", "overlap 96.42 %, IoU 95.95 % (GSM8K)", ours, verdict, src)
    else:
        add("Neurons located on different splits agree", "overlap 96.42 %, IoU 95.95 %", "not run", "not run", None)

    sp, src = _find(claims, "locate", "share_of_params")
    spv = _val(sp)
    add("Capability neurons are a small share of parameters", "~0.15 % of parameters", _pct(spv),
        "not run" if spv is None else ("same order" if 0.0005 <= spv <= 0.005 else
                                       "differs: smaller set" if spv < 0.0005 else "differs: larger set"), src)

    for key, claim in (("erase_beats_random", "Erasing the neurons hurts the capability more than random neurons"),
                       ("enhance_beats_random", "Enhancing the neurons helps the capability more than random neurons")):
        found = [(k, c[key]) for k, c in claims.items() if k.startswith("intervene") and key in c]
        if not found:
            add(claim, "yes", "not run", "not run", None)
        for k, c in found:
            add(claim + f" ({k.split('/')[-1]} set)", "yes", "ΔNLL/token " + _ours(c),
                "reproduced" if _holds(c) else "differs", k)
    spec = [(k, c["specificity"]) for k, c in claims.items() if k.startswith("intervene") and "specificity" in c]
    for k, c in spec:
        add(f"The effect is specific to the capability ({k.split('/')[-1]} set)", "implied",
            "specificity index " + _ours(c), "reproduced" if _holds(c) else "differs", k)

    ft, src = _find(claims, "finetune", "finetune_beats_random")
    add("Fine-tuning only the neurons beats random neurons", "yes",
        "not run" if ft is None else "ΔNLL/token after tuning " + _ours(ft),
        "not run" if ft is None else ("reproduced" if _holds(ft) else "differs"),
        src)

    fl, src = _find(claims, "audit", "facts_localizable")
    add("Individual facts cannot be reliably localized", "low fidelity across paraphrases",
        "not run" if fl is None else f"facts localizable: {_ours(fl)}",
        "not run" if fl is None else ("reproduced" if _val(fl) is False or (isinstance(fl, dict) and fl.get("value") is False)
                                      else "differs"), src)

    fc, src = _find(claims, "decouple", "follows_commonality")
    cm, _ = _find(claims, "decouple", "decoupling_commonality_iou")
    ct, _ = _find(claims, "decouple", "decoupling_content_iou")
    add("Localized sets follow shared commonality, not shared content", "yes",
        "not run" if fc is None else (f"commonality IoU {_ours(cm)}; content IoU {_ours(ct)}; "
                                      f"difference {_ours({'value': fc.get('commonality_minus_content'), 'ci': fc.get('ci')}) if isinstance(fc, dict) else fc}"),
        "not run" if fc is None else ("reproduced" if _val(fc) is True else "differs"), src)
    return {"columns": ["paper claim", "paper", "ours", "verdict", "source"], "rows": rows}


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
            "config": ctx.study.sections, "model": model_info, "datasets": data_fp,
            "seed": ctx.study["study"]["seed"], "stage_fingerprints": ctx.fingerprints, "timings_s": ctx.timings}


def reproduce(study: Study, *, lm_loader: Callable[[], Any] | None = None, only: list[str] | None = None,
              force: list[str] | None = None, progress: Callable[[str, str], None] | None = None) -> dict:
    """Run (or resume) every enabled stage, then write the claim table, manifest and report. Returns paths + claims."""
    from .report import build_report

    out = study.out
    out.mkdir(parents=True, exist_ok=True)
    if lm_loader is None:
        def lm_loader():
            from .models.loading import load_model

            s = study["study"]
            return load_model(s["model"], dtype=s["dtype"], device=s["device"], device_map=s["device_map"])
    ctx = _Ctx(study, lm_loader)
    base = {"model": study["study"]["model"], "dtype": study["study"]["dtype"], "seed": study["study"]["seed"],
            "chat": study["study"]["chat"], "caploc": __version__}
    force = set(force or [])
    for stage in STAGES:
        sec = study[stage]
        if not sec.get("enabled", True) or (only and stage not in only):
            continue
        deps = {d: ctx.fingerprints.get(d) for d in DEPENDS[stage]}
        dep_sections = {d: study[d] for d in DEPENDS[stage]}
        fp = config_key({"stage": stage, "section": sec, "base": base, "deps": deps, "dep_sections": dep_sections})
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

    table = claim_table(out, study)
    atomic_write_json(out / "claims" / "report.json", {
        "kind": "claims", "title": "Paper claims → our result",
        "text": [f"Study '{study['study']['name']}' on {study['study']['model']} (seed {study['study']['seed']}). "
                 "Each row compares a claim of Huang et al. (ICLR 2025) with what this run measured; "
                 "'differs' means our measurement does not support the paper's number or conclusion on this model "
                 "and these settings."],
        "tables": [{"title": "Paper claim → our result", **table}], "figures": [], "claims": {},
    })
    man = manifest(ctx)
    atomic_write_json(out / "manifest.json", man)
    paths = build_report([out], out / "report", title=f"caploc study: {study['study']['name']}")
    return {"report": str(paths.html), "markdown": str(paths.md), "manifest": str(out / "manifest.json"),
            "claims": table, "timings": ctx.timings}
