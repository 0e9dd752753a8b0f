"""A study configuration: one TOML file, one section per stage, parsed into the stages' own config dataclasses.

    [study]      name, model, dtype, device, device_map, seed, out, chat
    [locate]     which data (data, n, target, *_field) + every LocateConfig and AttributionConfig setting
    [stability]  StabilityConfig            [sweep]      SweepConfig          [crosscap]  capabilities + CrossCapConfig
    [contrast]   references + ContrastConfig
    [intervene]  off_target, n, held_out_templates, sets + InterveneConfig
    [finetune]   n_train, n_eval, eval_data + FinetuneConfig
    [audit]      AuditConfig (kn and tracing settings also as kn_<name> / tracing_<name>)
    [decouple]   DecoupleConfig

There is no table of defaults here: a key a section does not set takes the stage config's default, the same default
the single verbs and the notebook API use, and every value is validated by the same code (``caploc.config``) before
anything runs, so ``caploc reproduce --check`` checks everything the run will use. Study-wide ``seed`` and ``chat``
apply to every stage whose config has such a setting, unless the section sets its own. Every section takes
``enabled = false``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .attribution.engine import AttributionConfig
from .config import check, default_of, fields_of, from_mapping, setting, to_mapping
from .data.builtin import GSM_TARGETS
from .errors import CaplocError
from .localize import LocateConfig
from .splits import StabilityConfig
from .stages.audit.config import AuditConfig
from .stages.contrast_rules import ContrastConfig
from .stages.crosscap import CrossCapConfig
from .stages.decouple import DecoupleConfig
from .stages.finetune import FinetuneConfig
from .stages.intervene import InterveneConfig
from .stages.sweep import SweepConfig

STAGES = ("locate", "stability", "sweep", "crosscap", "contrast", "intervene", "finetune", "audit", "decouple")
# which earlier stages each stage reads (a change upstream reruns it)
DEPENDS = {
    "locate": (), "stability": ("locate",), "sweep": ("locate", "stability"), "crosscap": ("locate", "stability"),
    "contrast": ("locate", "crosscap"), "intervene": ("locate", "contrast"), "finetune": ("locate",),
    "audit": (), "decouple": (),
}


# ---------------------------------------------------------------------------------------------------------------------
# the study-only keys of each section (which data, which sets); everything else is the stage's config
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class StudySettings:
    name: str = setting("study", help="Study name (report title).")
    model: str = setting("smollm2-135m", help="Model: built-in name, local directory, .gguf file or cached HF id.")
    dtype: str = setting("float32", help="float32 | bfloat16 | float16.",
                         choices=("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"))
    device: str = setting("cpu", help="cpu | cuda | cuda:N | auto.")
    device_map: str | None = setting(None, help="accelerate device_map, e.g. auto.")
    seed: int = setting(0, help="Seed of every stage whose section sets none.")
    out: str = setting("runs/study", help="Output directory.")
    chat: bool = setting(False, help="Wrap prompts in the tokenizer's chat template (every stage).")

    def __post_init__(self):
        check(self)


@dataclass
class Switch:
    enabled: bool = setting(True, help="Run this stage.")

    def __post_init__(self):
        check(self)


@dataclass
class LocateData(Switch):
    data: str = setting("gsm_symbolic", help="The capability's data: a built-in name, rg:<task> or a file.")
    n: int | None = setting(48, help="Samples to localize on.", min=2)
    target: str = setting("cot", help="gsm_symbolic target: cot | answer.", choices=GSM_TARGETS)
    prompt_field: str | None = setting(None, help="Prompt column of a data file.")
    target_field: str | None = setting(None, help="Target column of a data file.")
    group_field: str | None = setting(None, help="Group (commonality) column of a data file.")


@dataclass
class CrossCapData(Switch):
    capabilities: dict = setting(default_factory=dict, help="name = spec, or name = {data, prompt_field, "
                                 "target_field, group_field}; the [locate] data joins as its own capability.")


@dataclass
class ContrastData(Switch):
    references: list[str] = setting(default_factory=lambda: ["facts", "letter_counting", "sentence_reordering"],
                                    item=str, help="Crosscap capability names or dataset specs to contrast with.")
    split_seeds: int = setting(5, min=1, help="Split seeds for the contrastive set's stability.")


@dataclass
class InterveneData(Switch):
    off_target: list[str] = setting(default_factory=lambda: ["facts", "rg:letter_counting"], item=str,
                                    help="Off-target datasets.")
    n: int = setting(24, min=1, help="Samples per evaluation set.")
    held_out_templates: bool = setting(True, help="Hold out the localization rows (and report unseen templates).")
    sets: list[str] = setting(default_factory=lambda: ["plain", "contrastive"], choices=("plain", "contrastive"),
                              item=str, help="Neuron sets to intervene on.")

    def __post_init__(self):
        super().__post_init__()
        if not self.sets:
            raise CaplocError("sets must list 'plain' and/or 'contrastive'")


@dataclass
class FinetuneData(Switch):
    n_train: int = setting(32, min=1, help="Training samples.")
    n_eval: int = setting(24, min=1, help="Samples per evaluation set.")
    eval_data: list[str] = setting(default_factory=lambda: ["facts", "rg:letter_counting"], item=str,
                                   help="Off-target evaluation datasets.")


@dataclass(frozen=True)
class Section:
    """How one TOML section maps onto a stage: its study-only keys and its config (with nested configs whose keys may
    be written flat in the section, also as ``<nested>_<key>``)."""

    extras: type
    config: type | None = None
    flat: tuple[str, ...] = ()


SECTIONS: dict[str, Section] = {
    "study": Section(StudySettings),
    "locate": Section(LocateData, LocateConfig, ("attribution",)),
    "stability": Section(Switch, StabilityConfig),
    "sweep": Section(Switch, SweepConfig),
    "crosscap": Section(CrossCapData, CrossCapConfig),
    "contrast": Section(ContrastData, ContrastConfig),
    "intervene": Section(InterveneData, InterveneConfig),
    "finetune": Section(FinetuneData, FinetuneConfig),
    "audit": Section(Switch, AuditConfig, ("kn", "tracing")),
    "decouple": Section(Switch, DecoupleConfig),
}
INHERITED = ("seed", "chat")  # study-wide settings a stage config takes unless its section sets them


@dataclass
class Study:
    """A validated study: per section its study-only keys (``extras``) and its stage config (``configs``)."""

    settings: StudySettings
    extras: dict[str, Any]
    configs: dict[str, Any]
    given: dict[str, set]  # the keys each section set explicitly
    source: str = ""

    @property
    def out(self) -> Path:
        return Path(self.settings.out)

    def enabled(self, stage: str) -> bool:
        return bool(self.extras[stage].enabled)

    def section(self, name: str) -> dict:
        """The resolved settings of a section as plain values (what ``--check`` prints and stage fingerprints hash)."""
        if name == "study":
            return to_mapping(self.settings)
        out = to_mapping(self.extras[name])
        if self.configs.get(name) is not None:
            out.update(to_mapping(self.configs[name]))
        return out

    def __getitem__(self, name: str) -> dict:
        return self.section(name)

    @property
    def sections(self) -> dict[str, dict]:
        return {name: self.section(name) for name in SECTIONS}


# ---------------------------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------------------------
def _names(cls) -> set[str]:
    return {f.name for f in fields_of(cls)}


def _route(sec: str, table: Mapping, spec: Section, where: str) -> tuple[dict, dict]:
    """Split a section's keys into study-only keys and the stage config's table (flat nested keys moved in)."""
    extras, conf = {}, {}
    ex_names = _names(spec.extras)
    conf_names = _names(spec.config) if spec.config is not None else set()
    nested = {n: _names(type(default_of(spec.config, n))) for n in spec.flat}
    for key, value in table.items():
        if key in ex_names:
            extras[key] = value
        elif key in conf_names:
            if key in nested and isinstance(value, Mapping):
                conf.setdefault(key, {}).update(value)
            else:
                conf[key] = value
        else:
            for n, inner in nested.items():
                short = key[len(n) + 1:] if key.startswith(n + "_") else None
                if key in inner or short in inner:
                    conf.setdefault(n, {})[key if key in inner else short] = value
                    break
            else:
                known = sorted(ex_names | conf_names | set().union(set(), *nested.values()))
                raise CaplocError(f"unknown key '{key}' in [{sec}]{where}; known keys: {', '.join(known)}")
    return extras, conf


def validate(raw: Mapping, source: str = "") -> Study:
    """Parse and check a whole study (a TOML document as a dict); the first problem is a one-line error."""
    where = f" in {source}" if source else ""
    if not isinstance(raw, Mapping):
        raise CaplocError(f"a study config must be a table of sections{where}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise CaplocError(f"unknown section [{unknown[0]}]{where}; known sections: {', '.join(SECTIONS)}")
    for sec, table in raw.items():
        if not isinstance(table, Mapping):
            raise CaplocError(f"[{sec}]{where} must be a table of settings")

    def build(cls, table, sec):
        try:
            return from_mapping(cls, table, sec)
        except CaplocError as e:
            raise CaplocError(f"{e}{where}") from None

    settings = build(StudySettings, raw.get("study", {}), "study")
    extras, configs, given = {}, {}, {}
    for sec, spec in SECTIONS.items():
        if sec == "study":
            continue
        table = dict(raw.get(sec, {}))
        ex, conf = _route(sec, table, spec, where)
        given[sec] = set(table)
        names = _names(spec.config) if spec.config is not None else set()
        for key in INHERITED:
            if key in names and key not in conf:
                conf[key] = getattr(settings, key)
        extras[sec] = build(spec.extras, ex, sec)
        configs[sec] = build(spec.config, conf, sec) if spec.config is not None else None
    _derive(configs, extras, given)
    return Study(settings, extras, configs, given, source)


def _derive(configs: dict, extras: dict, given: dict) -> None:
    """Settings one stage takes from another unless its section sets them (kept from the first study format)."""
    stab: StabilityConfig = configs["stability"]
    loc = extras["locate"]
    shared_split = dataclasses.replace(stab, seeds=list(stab.seeds)[:3], kinds=["random"], null_draws=0)
    if "split" not in given["sweep"]:
        configs["sweep"] = dataclasses.replace(configs["sweep"], split=shared_split)
    cc = configs["crosscap"]
    changes = {}
    if "split" not in given["crosscap"]:
        changes["split"] = shared_split
    if "run_samples" not in given["crosscap"] and loc.n is not None:
        changes["run_samples"] = min(cc.n, loc.n)
    if "target" not in given["crosscap"]:
        changes["target"] = loc.target
    if changes:
        configs["crosscap"] = dataclasses.replace(cc, **changes)
    if not isinstance(configs["locate"].attribution, AttributionConfig):  # pragma: no cover - from_mapping builds it
        raise CaplocError("[locate] attribution settings are invalid")


def builtin_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("caploc").joinpath("configs").iterdir() if p.name.endswith(".toml"))


def load_study(path_or_name: str | Path, out: str | Path | None = None) -> Study:
    """Read a TOML study file (or a built-in config by name: ``quick``, ``full``, ``paper-llama2-7b``, ``paper-gptj``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path_or_name)
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CaplocError(f"{p} is not UTF-8 text: pass a TOML file") from None
        source = str(p)
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
    except RecursionError:
        raise CaplocError(f"{source} is nested too deeply to read") from None
    st = validate(raw, source)
    if out is not None:
        st.settings = dataclasses.replace(st.settings, out=str(out))
    return st


__all__ = ["STAGES", "DEPENDS", "SECTIONS", "Study", "StudySettings", "validate", "load_study", "builtin_configs"]
