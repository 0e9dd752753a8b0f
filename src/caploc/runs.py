"""The run layer: a stored run, its provenance, and the one way every verb rebuilds data and builds evaluation sets.

Every verb that reads a ``caploc locate`` directory or writes a result goes through this module:

* :class:`Provenance` (typed: :class:`ModelInfo`, :class:`DataInfo`, config, seed, caploc version) -- what made a result;
  :meth:`Provenance.of` records it, :meth:`Provenance.from_meta` reads what a ``neurons.json`` holds.
* :func:`rebuild_dataset` -- the one function that re-creates a dataset from its recorded ``source`` with every field
  (loader, n, seed, target, few-shot, task, file path, field mapping, subsets), checked against the recorded fingerprint.
  A file path recorded in a result is followed only when the user named it (``allow_paths``), never just because a
  JSON file says so.
* :func:`locate_config_from_dict` -- the one place a stored ``LocateConfig`` is rebuilt.
* :func:`settings_diff` / :func:`check_same_settings` -- "were these two score stores made the same way?" (memory-only
  knobs ignored: :attr:`AttributionConfig.MEMORY_KNOBS`).
* :class:`LocateRun` / :func:`load_run` / :func:`locate_run` -- a stored locate run (scores, neuron set, config,
  provenance, sample groups) ready for relocalization by stability, sweep, crosscap, contrast and faithfulness.
* :func:`eval_sets` -- the one builder of on-target held-out and off-target evaluation sets (eval, intervene,
  finetune and ``reproduce`` all use it).
* :class:`StageResult` -- the protocol every stage's result follows (``kind``, ``provenance``, ``save``, ``load``,
  ``to_report``) and :func:`commit` which writes a result and its ``report.json``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from . import __version__
from .attribution.engine import AttributionConfig
from .data import Dataset, load_dataset, train_test_split
from .errors import CaplocError, IncompatibleResultError
from .localize import LocateConfig, locate
from .results import NeuronSet, ScoreStore, atomic_write_json, read_json

log = logging.getLogger(__name__)

#: keys of a neuron set's meta that describe the selection rule (not the run)
SELECTION_KEYS = ("rule", "rule_value", "min_freq", "min_count", "per_sample_selected_mean")


# ---------------------------------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """Which model a result was made on (the fingerprint covers its weights)."""

    model_id: str | None = None
    model_type: str | None = None
    fingerprint: str | None = None
    n_layers: int | None = None
    d_mlp: int | None = None
    dtype: str | None = None
    neuron_site: str | None = None
    params_per_neuron: int | None = None
    total_params: int | None = None

    @classmethod
    def of(cls, lm) -> "ModelInfo":
        site, info = lm.site, lm.info
        return cls(model_id=info.get("model_id"), model_type=site.model_type, fingerprint=info.get("fingerprint"),
                   n_layers=site.n_layers, d_mlp=site.d_mlp, dtype=info.get("dtype"),
                   neuron_site=site.describe().get("neuron_site"), params_per_neuron=site.params_per_neuron(),
                   total_params=site.total_params())

    def check_model(self, lm, what: str = "this result") -> None:
        """Refuse a model with other dimensions; warn when the weights differ (same shape, other fingerprint)."""
        site = lm.site
        if self.n_layers is not None and (self.n_layers, self.d_mlp) != (site.n_layers, site.d_mlp):
            raise IncompatibleResultError(
                f"{what} was made on a model with {self.n_layers} layers x {self.d_mlp} MLP neurons ({self.model_id}), "
                f"but this model has {site.n_layers} x {site.d_mlp}: use the same model or localize on this one first")
        fp = lm.info.get("fingerprint")
        if self.fingerprint and fp and fp != self.fingerprint:
            log.warning("%s was made on %s (fingerprint %s); this model's fingerprint is %s", what, self.model_id,
                        self.fingerprint, fp)


@dataclass(frozen=True)
class DataInfo:
    """Which data a result was made on: the dataset's name, content fingerprint and recorded source."""

    name: str | None = None
    fingerprint: str | None = None
    source: dict = field(default_factory=dict)
    n: int | None = None

    @classmethod
    def of(cls, ds: Dataset) -> "DataInfo":
        return cls(ds.name, ds.fingerprint(), ds.source, len(ds))

    @property
    def spec(self) -> str | None:
        return spec_of(self.source)

    @property
    def seed(self) -> int | None:
        s = self.source.get("seed") if isinstance(self.source, dict) else None
        return int(s) if isinstance(s, int) and not isinstance(s, bool) else None

    def rebuild(self, allow_paths: Sequence[str | Path] = ()) -> Dataset:
        return rebuild_dataset(self.source, self.fingerprint, allow_paths=allow_paths)


@dataclass(frozen=True)
class Provenance:
    """What made a result: model, data, the stage's settings, seed and caploc version."""

    model: ModelInfo = field(default_factory=ModelInfo)
    data: DataInfo | None = None
    config: dict = field(default_factory=dict)
    seed: int | None = None
    caploc_version: str = __version__

    @classmethod
    def of(cls, lm, dataset: Dataset | None = None, config: Any = None, seed: int | None = None) -> "Provenance":
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        return cls(ModelInfo.of(lm), DataInfo.of(dataset) if dataset is not None else None, cfg, seed)

    def to_dict(self) -> dict:
        return {"model": _asdict(self.model), "data": _asdict(self.data) if self.data else None,
                "config": self.config, "seed": self.seed, "caploc_version": self.caploc_version}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Provenance":
        d = d if isinstance(d, dict) else {}
        m, data = d.get("model"), d.get("data")
        return cls(_from(ModelInfo, m), _from(DataInfo, data) if isinstance(data, dict) else None,
                   d.get("config") if isinstance(d.get("config"), dict) else {}, d.get("seed"),
                   str(d.get("caploc_version", "?")))

    @classmethod
    def from_meta(cls, meta: dict) -> "Provenance":
        """The provenance recorded in a locate run's ``neurons.json`` (flat keys written by :func:`caploc.localize.locate`)."""
        m = meta if isinstance(meta, dict) else {}
        src = m.get("dataset_source")
        return cls(
            ModelInfo(model_id=m.get("model_id"), model_type=m.get("model_type"), fingerprint=m.get("model_fingerprint"),
                      n_layers=m.get("n_layers"), d_mlp=m.get("d_mlp"), neuron_site=m.get("neuron_site"),
                      params_per_neuron=m.get("params_per_neuron"), total_params=m.get("total_params")),
            DataInfo(m.get("dataset"), m.get("dataset_fingerprint"), src if isinstance(src, dict) else {},
                     m.get("n_samples")),
            m.get("config") if isinstance(m.get("config"), dict) else {}, m.get("seed"),
            str(m.get("caploc_version", "?")))


def _asdict(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _from(cls, d):
    d = d if isinstance(d, dict) else {}
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------------------------------
# datasets from their recorded source
# ---------------------------------------------------------------------------------------------------------------------
_BUILTIN = ("gsm_symbolic", "facts", "humaneval")
_FILE_LOADERS = ("json", "jsonl", "csv", "tsv", "parquet", "hf_disk", "caploc_jsonl")


def spec_of(source: dict | None) -> str | None:
    """The ``load_dataset`` spec that made a dataset, from its recorded ``source`` (None if there is none)."""
    s = source if isinstance(source, dict) else {}
    loader = s.get("loader")
    if loader in ("subset", "split"):
        return spec_of(s.get("parent_source"))
    if loader in _BUILTIN:
        return loader
    if loader == "reasoning_gym" and s.get("task"):
        return f"rg:{s['task']}"
    if loader == "hf_cache" and s.get("name"):
        return f"hf:{s['name']}"
    if s.get("path"):
        return str(s["path"])
    return None


def _same_spec(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    norm = lambda x: str(x).strip().lower().replace("-", "_")  # noqa: E731
    if norm(a) == norm(b):
        return True
    pa, pb = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    try:
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    except OSError:
        return False


def _path_allowed(path: str, allow_paths: Sequence[str | Path]) -> bool:
    try:
        p = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    for a in allow_paths:
        try:
            root = Path(a).expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if p == root or root in p.parents:
            return True
    return False


def rebuild_dataset(source: dict | None, fingerprint: str | None = None, *,
                    allow_paths: Sequence[str | Path] = ()) -> Dataset:
    """Re-create a dataset from its recorded ``source`` (the loaders are seeded and deterministic).

    Every recorded field is replayed: loader, ``n``, ``seed``, ``target``, ``few_shot``, reasoning-gym task, file path and
    field mapping; subsets and splits are rebuilt from their parent and indices. A file path is followed only if it lies
    under one of ``allow_paths`` (paths the user gave on the command line). With ``fingerprint``, the rebuilt content
    must match it. Raises :class:`CaplocError` with the reason when the dataset cannot be rebuilt.
    """
    if not isinstance(source, dict) or not source:
        raise CaplocError("the run records no dataset source, so its data cannot be rebuilt")
    loader = source.get("loader")
    if loader in ("subset", "split"):
        parent = rebuild_dataset(source.get("parent_source"), source.get("parent_fingerprint"), allow_paths=allow_paths)
        idx = source.get("indices")
        if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise CaplocError(f"the recorded {loader} has no valid sample indices")
        ds = parent.subset(idx)
    else:
        n, seed, few = source.get("n"), source.get("seed", 0), source.get("few_shot", 0) or 0
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise CaplocError(f"the recorded dataset size n={n!r} is not a positive integer")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise CaplocError(f"the recorded dataset seed {seed!r} is not an integer")
        kw: dict[str, Any] = {"n": n, "seed": seed, "few_shot": few}
        fields_kw = {k: source.get(k) for k in ("prompt_field", "target_field", "group_field")}
        if loader == "gsm_symbolic":
            ds = load_dataset("gsm_symbolic", target=source.get("target", "cot"), **kw)
        elif loader in ("facts", "humaneval"):
            ds = load_dataset(loader, **kw)
        elif loader == "reasoning_gym" and source.get("task"):
            ds = load_dataset(f"rg:{source['task']}", **kw)
        elif loader == "hf_cache" and source.get("name"):
            ds = load_dataset(f"hf:{source['name']}", **kw, **fields_kw)
        elif source.get("path"):
            path = str(source["path"])
            if not _path_allowed(path, allow_paths):
                raise CaplocError(f"the run's data file {path} was not given on the command line; pass it (e.g. "
                                  "--data) to let caploc read it again")
            ds = load_dataset(path, **kw, **({} if loader == "caploc_jsonl" else fields_kw))
        else:
            raise CaplocError(f"the run's dataset loader {loader!r} cannot be replayed")
    if fingerprint and ds.fingerprint() != fingerprint:
        raise CaplocError(f"the rebuilt dataset {ds.name} has fingerprint {ds.fingerprint()}, not the recorded "
                          f"{fingerprint} (the data or its loader changed)")
    return ds


def try_rebuild_dataset(source: dict | None, fingerprint: str | None = None, *,
                        allow_paths: Sequence[str | Path] = ()) -> tuple[Dataset | None, str]:
    """:func:`rebuild_dataset` -> ``(dataset, "")`` or ``(None, reason)``."""
    try:
        return rebuild_dataset(source, fingerprint, allow_paths=allow_paths), ""
    except CaplocError as e:
        return None, str(e)


# ---------------------------------------------------------------------------------------------------------------------
# settings of stored runs
# ---------------------------------------------------------------------------------------------------------------------
def locate_config_from_dict(d: dict | None) -> LocateConfig:
    """The :class:`LocateConfig` a run recorded (``neurons.json`` ``config``); unknown keys are ignored."""
    if not isinstance(d, dict) or not d:
        raise CaplocError("the run's neurons.json has no 'config': it was not written by caploc locate")
    c = dict(d)
    a = c.get("attribution") or {}
    if not isinstance(a, dict):
        raise CaplocError("the run's neurons.json has a malformed 'config.attribution'")
    known_a = {f.name for f in fields(AttributionConfig)}
    c["attribution"] = AttributionConfig(**{k: v for k, v in a.items() if k in known_a})
    known = {f.name for f in fields(LocateConfig)}
    try:
        return LocateConfig(**{k: v for k, v in c.items() if k in known})
    except TypeError as e:
        raise CaplocError(f"the run's neurons.json has a malformed 'config' ({e})") from None


def store_spec(run_dir: Path | str) -> dict:
    """The settings a locate run's score store was made with (``scores/store.json`` ``spec``)."""
    spec = ScoreStore(Path(run_dir) / "scores").meta().get("spec", {})
    return spec if isinstance(spec, dict) else {}


def settings_diff(a: dict, b: dict) -> list[str]:
    """What differs between two score-store specs in what decides the scores (model, attribution, chat); the memory
    knobs that only group rows into passes are ignored."""
    out = []
    ma, mb = a.get("model") or {}, b.get("model") or {}
    for k in ("n_layers", "d_mlp", "fingerprint"):
        if ma.get(k) != mb.get(k):
            out.append(f"model.{k}")
    skip = set(AttributionConfig.MEMORY_KNOBS)
    aa = {k: v for k, v in (a.get("attribution") or {}).items() if k not in skip}
    ab = {k: v for k, v in (b.get("attribution") or {}).items() if k not in skip}
    out += [f"attribution.{k}" for k in sorted(set(aa) | set(ab)) if aa.get(k) != ab.get(k)]
    if a.get("chat") != b.get("chat"):
        out.append("chat")
    return out


def check_same_settings(target_dir: Path | str, ref_dir: Path | str) -> None:
    """Refuse a run scored on another model or with other attribution settings than ``target_dir``."""
    a, b = store_spec(target_dir), store_spec(ref_dir)
    diff = settings_diff(a, b)
    if any(d.startswith("model.") for d in diff):
        ma, mb = a.get("model") or {}, b.get("model") or {}
        raise IncompatibleResultError(f"{ref_dir} was scored on another model ({mb.get('model_id')}, fingerprint "
                                      f"{mb.get('fingerprint')}) than {target_dir} ({ma.get('model_id')}, "
                                      f"{ma.get('fingerprint')}): localize both on the same model")
    if diff:
        raise CaplocError(f"{ref_dir} was scored with other attribution settings than {target_dir} "
                          f"({', '.join(diff)}): re-localize it with the same settings")


# ---------------------------------------------------------------------------------------------------------------------
# a stored locate run
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class LocateRun:
    """The stored scores of one locate run plus what is needed to relocalize them."""

    run_dir: Path | None
    scores: torch.Tensor  # [N, L, d] float32
    meta: dict  # the run's neuron-set meta (model, dataset, config, params_per_neuron, ...)
    config: LocateConfig
    groups: list | None = None
    groups_note: str = ""

    @property
    def provenance(self) -> Provenance:
        return Provenance.from_meta(self.meta)

    @property
    def n_samples(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[1])

    @property
    def d_mlp(self) -> int:
        return int(self.scores.shape[2])

    def head(self, n: int) -> "LocateRun":
        """The first ``n`` stored samples (e.g. to compare capabilities at equal sample counts)."""
        if n < 1 or n > self.n_samples:
            raise CaplocError(f"cannot take the first {n} of {self.n_samples} stored samples of {self.run_dir}; "
                              f"use a count between 1 and {self.n_samples}")
        if n == self.n_samples:
            return self
        meta = {**self.meta, "samples_used": f"first {n} of {self.n_samples}"}
        return LocateRun(self.run_dir, self.scores[:n], meta, self.config,
                         None if self.groups is None else self.groups[:n], self.groups_note)

    def summary(self) -> dict:
        """A JSON-ready description of the run for result files."""
        p = self.provenance
        return {"run_dir": str(self.run_dir) if self.run_dir else None,
                "samples_used": self.meta.get("samples_used", "all"), "model_id": p.model.model_id,
                "model_fingerprint": p.model.fingerprint, "model_type": p.model.model_type,
                "dataset": p.data.name if p.data else None, "dataset_fingerprint": p.data.fingerprint if p.data else None,
                "dataset_source": p.data.source if p.data else None, "method": self.meta.get("method"),
                "n_samples": self.n_samples, "n_layers": self.n_layers, "d_mlp": self.d_mlp,
                "params_per_neuron": p.model.params_per_neuron, "total_params": p.model.total_params}

    def neuron_set(self, flat: np.ndarray, cfg: LocateConfig | None = None, n_samples: int | None = None) -> NeuronSet:
        cfg = cfg or self.config
        meta = {k: v for k, v in self.meta.items() if k not in SELECTION_KEYS}
        meta.update(rule=cfg.rule, rule_value=cfg.rule_value, min_freq=cfg.min_freq)
        return NeuronSet.from_flat(flat, self.n_layers, self.d_mlp, n_samples=n_samples or self.n_samples, meta=meta)

    def share_of_params(self, n_neurons: int) -> float | None:
        ppn, tot = self.meta.get("params_per_neuron"), self.meta.get("total_params")
        return n_neurons * ppn / tot if ppn and tot else None

    def dataset(self, allow_paths: Sequence[str | Path] = ()) -> Dataset:
        """The run's localization data, rebuilt from its recorded source (fingerprint-checked)."""
        p = self.provenance
        if p.data is None:
            raise CaplocError(f"{self.run_dir} records no dataset")
        return p.data.rebuild(allow_paths)


def _groups_for(run_dir: Path, meta: dict, n: int) -> tuple[list | None, str]:
    """Group labels of the run's samples: ``run_dir/groups.json`` if present, else the rebuilt dataset's groups."""
    gpath = run_dir / "groups.json"
    if gpath.exists():
        g = read_json(gpath)
        g = g.get("groups") if isinstance(g, dict) else g
        if isinstance(g, list) and len(g) == n:
            if all(x is None for x in g):
                return None, "the dataset has no groups"
            return g, f"groups read from {gpath}"
        log.warning("%s does not hold %d group labels; ignoring it", gpath, n)
    p = Provenance.from_meta(meta)
    ds, why = try_rebuild_dataset(p.data.source if p.data else None, p.data.fingerprint if p.data else None)
    if ds is None:
        return None, f"the dataset could not be rebuilt for its groups ({why})"
    if len(ds) != n:
        return None, f"the rebuilt dataset has {len(ds)} samples, the scores {n}; groups not used"
    groups = ds.groups()
    if all(g is None for g in groups):
        return None, "the dataset has no groups"
    return groups, f"groups from the rebuilt dataset (fingerprint {ds.fingerprint()} matches the run)"


def is_run_dir(p: str | Path) -> bool:
    p = Path(str(p)).expanduser()
    return p.is_dir() and (p / "scores" / "store.json").exists()


def load_run(run_dir: Path | str, groups: list | None = None, want_groups: bool = True) -> LocateRun:
    """Load a locate run directory (``neurons.json`` + ``scores/``) for relocalization."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CaplocError(f"{run_dir} has no scores/store.json: pass a directory written by `caploc locate`")
    if not (run_dir / "neurons.json").exists():
        raise CaplocError(f"{run_dir} has no neurons.json (the locate run did not finish): rerun the same "
                          "`caploc locate` command to resume it")
    meta = NeuronSet.load(run_dir).meta
    data = ScoreStore(run_dir / "scores").load()
    scores = data["scores"]
    if not torch.equal(data["index"], torch.arange(scores.shape[0])):
        raise CaplocError(f"{run_dir}/scores has samples out of order or missing; rerun `caploc locate` with --overwrite")
    cfg = locate_config_from_dict(meta.get("config"))
    note = "groups given by the caller"
    if groups is None and not want_groups:
        note = "groups not loaded"
    elif groups is None:
        groups, note = _groups_for(run_dir, meta, scores.shape[0])
    elif len(groups) != scores.shape[0]:
        raise CaplocError(f"got {len(groups)} group labels for {scores.shape[0]} stored samples")
    return LocateRun(run_dir, scores, meta, cfg, groups, note)


def locate_run(lm, dataset: Dataset, cfg: LocateConfig, out_dir: Path | str, *, overwrite: bool = False,
               progress: bool | None = None) -> LocateRun:
    """Run :func:`caploc.localize.locate` into ``out_dir`` (resumable) and return it as a :class:`LocateRun`.

    The dataset's groups are also written to ``out_dir/groups.json`` so later runs need not rebuild the dataset."""
    out_dir = Path(out_dir)
    locate(lm, dataset, cfg, out_dir, overwrite=overwrite, progress=progress)
    atomic_write_json(out_dir / "groups.json", {"dataset": dataset.name, "fingerprint": dataset.fingerprint(),
                                                "groups": dataset.groups()})
    return load_run(out_dir)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation sets
# ---------------------------------------------------------------------------------------------------------------------
DEFAULT_OFF_TARGET = ("facts", "rg:letter_counting", "gsm_symbolic")


def default_off_target(on_spec: str, n: int = 2) -> list[str]:
    """Off-target datasets used when none are given: facts and rg:letter_counting (gsm_symbolic when one of them
    is the on-target data)."""
    return [s for s in DEFAULT_OFF_TARGET if not _same_spec(s, on_spec)][:n]


def heldout_splits(dataset: Dataset, exclude: Dataset | None = None, *, test_fraction: float = 0.5, seed: int = 0):
    """Two in-domain held-out sets of ``dataset``: ``(samples, templates)``.

    With ``exclude`` (the dataset the neurons were localized on): samples whose prompt is in ``exclude`` are dropped;
    ``samples`` = the rest whose group (template) occurs in ``exclude`` (new problems, seen templates);
    ``templates`` = those whose group does not (unseen templates). Without ``exclude`` the groups of ``dataset`` are
    split with ``train_test_split(by_group=True)``: the test part is the held-out-template set and the train part is
    returned as "samples" (its templates are NOT guaranteed to be the localization's). Either part may be None.
    """
    if exclude is not None:
        seen_prompts = {s.prompt for s in exclude}
        seen_groups = {s.group for s in exclude}
        fresh = [i for i, s in enumerate(dataset) if s.prompt not in seen_prompts]
        a = [i for i in fresh if dataset[i].group in seen_groups]
        b = [i for i in fresh if dataset[i].group not in seen_groups]
        sa = dataset.subset(a, name=f"{dataset.name}[heldout-samples]") if a else None
        sb = dataset.subset(b, name=f"{dataset.name}[heldout-templates]") if b else None
        return sa, sb
    train, test = train_test_split(dataset, test_fraction, seed, by_group=True)
    return (Dataset(f"{dataset.name}[split-train-groups]", train.samples, train.source),
            Dataset(f"{dataset.name}[split-test-groups]", test.samples, test.source))


def eval_sets(specs: Sequence[str], *, n: int = 32, seed: int = 1, neuron_meta: dict | None = None,
              heldout: bool = True, target: str = "cot", n_off: int | None = None,
              load_kw: dict | None = None) -> list[tuple[str, Dataset, str]]:
    """``[(label, Dataset, role)]``: the first spec is on-target, the others off-target (``n_off`` samples each,
    default ``n``). The one builder of evaluation sets for ``eval``, ``intervene``, ``finetune`` and ``reproduce``.

    With ``heldout`` and a neuron set whose localization data can be rebuilt from its recorded source (same spec as the
    first one), the on-target spec becomes two datasets of up to ``n`` samples each, drawn from a pool of ``4 n``
    samples (seed ``seed``) minus the localization prompts: ``<spec>:heldout-samples`` (groups seen during
    localization) and ``<spec>:heldout-templates`` (unseen groups). When the localization data is of the same kind but
    cannot be rebuilt, the pool is split by group (labels ``:split-groups-a`` / ``:split-groups-b``) and a warning says
    the samples may overlap the localization data. A first spec other than the localization data's is used as is.
    ``load_kw`` (field mapping of user files) goes to every ``load_dataset`` call of the first spec.
    """
    if not specs:
        raise CaplocError("no datasets given: pass --data at least once")
    load_kw = dict(load_kw or {})
    out: list[tuple[str, Dataset, str]] = []
    first = specs[0]
    prov = Provenance.from_meta(neuron_meta) if neuron_meta is not None else None
    loc_spec = prov.data.spec if prov is not None and prov.data is not None else None
    same = loc_spec is None or _same_spec(loc_spec, first)
    if heldout and prov is not None and same:
        loc, why = (None, "no recorded source")
        if loc_spec is not None:
            loc, why = try_rebuild_dataset(prov.data.source, prov.data.fingerprint, allow_paths=[first])
        pool = load_dataset(first, n=4 * n, seed=seed, target=target, **load_kw)
        if loc is None and len(pool.unique_groups()) < 2:
            raise CaplocError(f"{first} has no groups to hold out and its localization data cannot be rebuilt "
                              f"({why}); pass --no-heldout")
        if loc is not None:
            a, b = heldout_splits(pool, exclude=loc)
            names = ("heldout-samples", "heldout-templates")
        else:
            log.warning("the neurons' localization data cannot be rebuilt (%s): splitting %s by group instead; these "
                        "samples may overlap the localization data", why, first)
            a, b = heldout_splits(pool, None, seed=seed)
            names = ("split-groups-a", "split-groups-b")
        for part, name in zip((a, b), names):
            if part is None or len(part) == 0:
                log.warning("no %s samples of %s in a pool of %d; skipped", name, first, len(pool))
                continue
            if len(part) < n:
                log.warning("only %d %s samples of %s (wanted %d)", len(part), name, first, n)
            out.append((f"{first}:{name}", part.subset(range(min(n, len(part))), name=f"{part.name}"), "on"))
        if not out:
            raise CaplocError(f"no held-out samples of {first} in a pool of {len(pool)}: load more (--n) or pass "
                              "--no-heldout")
    else:
        out.append((first, load_dataset(first, n=n, seed=seed, target=target, **load_kw), "on"))
    for spec in specs[1:]:
        if any(lab == spec for lab, _, _ in out):
            raise CaplocError(f"dataset {spec!r} is given twice; pass each --data once")
        out.append((spec, load_dataset(spec, n=n_off or n, seed=seed, target=target), "off"))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the result protocol
# ---------------------------------------------------------------------------------------------------------------------
@runtime_checkable
class StageResult(Protocol):
    """What every stage returns: a typed result that saves, loads and describes itself for the report.

    ``save(dir)`` writes tensors as safetensors and metadata as JSON (never pickle); ``load(dir)`` reads and verifies
    them; ``to_report(dir)`` writes the figures into ``dir`` (through ``caploc.report``) and returns the ``report.json``
    dict (``kind``, ``title``, ``text``, ``tables``, ``figures``, ``claims``)."""

    kind: ClassVar[str]

    def save(self, out_dir: Path | str) -> Path: ...

    @classmethod
    def load(cls, out_dir: Path | str) -> "StageResult": ...

    def to_report(self, out_dir: Path | str) -> dict: ...


def commit(result: StageResult, out_dir: Path | str, *, report: bool = True) -> Path:
    """Save ``result`` into ``out_dir`` and, with ``report``, its figures and ``report.json`` (written last)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.save(out_dir)
    if report:
        atomic_write_json(out_dir / "report.json", result.to_report(out_dir))
    return out_dir


__all__ = [
    "ModelInfo", "DataInfo", "Provenance", "spec_of", "rebuild_dataset", "try_rebuild_dataset",
    "locate_config_from_dict", "store_spec", "settings_diff", "check_same_settings", "LocateRun", "load_run",
    "locate_run", "is_run_dir", "default_off_target", "heldout_splits", "eval_sets", "StageResult", "commit",
    "SELECTION_KEYS",
]
