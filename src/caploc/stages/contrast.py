"""``caploc contrast``: contrastive localization of a stored locate run against reference runs, and what ``caploc
locate --contrast/--exclude-generic`` does after localizing.

The rules themselves (pure functions over the stored per-sample scores) are in :mod:`caploc.stages.contrast_rules`.
This module resolves the references (run directories, or dataset specs localized first with the target run's
settings, refused when they were scored on another model or with other attribution settings:
:func:`caploc.runs.check_same_settings`), measures the split agreement of the plain and the contrastive set, writes the
result (:class:`ContrastResult`) and, on request, erases both sets on and off target against random sets
(:func:`add_erase_specificity`, numbers from :func:`caploc.stages.generic.erase_specificity`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .. import __version__, stats
from ..data import Dataset, Sample, load_dataset, random_splits
from ..errors import CaplocError, IncompatibleResultError
from ..localize import LocateConfig, load_scores, locate, min_count, neuron_set_from_scores
from ..models.loading import load_model
from ..report import contrast as report_contrast
from ..results import NeuronSet, atomic_save_tensors, atomic_write_json, check_out_dir, read_json, read_tensors
from ..runs import (
    Provenance,
    check_same_settings,
    commit,
    is_run_dir,
    locate_config_from_dict,
    spec_of,
    store_spec,
    try_rebuild_dataset,
)
from .contrast_rules import ContrastConfig, contrast_arrays, contrastive_set, default_references
from .generic import GenericConfig, erase_specificity, find_generic
from .generic import exclude_generic as drop_generic

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# specificity from the stores, split agreement
# ---------------------------------------------------------------------------------------------------------------------
def store_specificity(flat_set: np.ndarray, target_freq: np.ndarray, ref_freq: np.ndarray, ref_names: list[str],
                      min_freq_frac: float) -> dict:
    """How much of a set is also common elsewhere, from frequency tables (no model needed).

    ``common_elsewhere``: share of the set's neurons with reference frequency >= ``min_freq_frac`` on at least one
    reference; ``common_everywhere``: on every reference; mean frequencies on the target and each reference.
    """
    flat_set = np.asarray(flat_set, dtype=np.int64)
    out = {"n": int(flat_set.size)}
    if flat_set.size == 0:
        out.update(common_elsewhere=float("nan"), common_everywhere=float("nan"), target_freq=float("nan"),
                   ref_freq={k: float("nan") for k in ref_names})
        return out
    R = ref_freq[:, flat_set] if len(ref_names) else np.zeros((0, flat_set.size))
    com = R >= min_freq_frac - 1e-12
    out["common_elsewhere"] = float(com.any(0).mean()) if len(ref_names) else float("nan")
    out["common_everywhere"] = float(com.all(0).mean()) if len(ref_names) else float("nan")
    out["target_freq"] = float(target_freq[flat_set].mean())
    out["ref_freq"] = {k: float(R[j].mean()) for j, k in enumerate(ref_names)}
    return out


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The two parts of :func:`caploc.data.random_splits` (k = 2, ``seed``) of ``n`` samples, as sorted indices."""
    ds = Dataset("scores", [Sample(prompt=str(i), target="") for i in range(n)])
    a, b = (np.asarray(p.source["indices"], dtype=np.int64) for p in random_splits(ds, 2, seed))
    return np.sort(a), np.sort(b)


def _half_cfg(lcfg: LocateConfig, n_full: int) -> LocateConfig:
    """An absolute min_freq count (> 1) becomes the same fraction of the samples on each half."""
    if lcfg.min_freq > 1:
        return locate_config_from_dict({**lcfg.to_dict(), "min_freq": lcfg.min_freq / n_full})
    return lcfg


def split_agreement(target_scores: torch.Tensor, reference_scores: dict[str, torch.Tensor], cfg: ContrastConfig,
                    lcfg: LocateConfig, n_seeds: int = 5, seed: int = 0) -> dict:
    """Stability of a (contrastive) set: random 2-splits of the target AND of every reference sample set.

    For split seed s (``seed .. seed + n_seeds - 1``) every dataset's samples are split in two disjoint random halves
    (``caploc.data.random_splits``; the reference halves use seeds offset by 1000 * (j + 1)); set A is computed from the
    first halves, set B from the second halves, with the same rule. An absolute ``min_freq`` count becomes the same
    fraction of each half. Returns the mean / sd over seeds of IoU and of the overlap rate (mean of both directions),
    the per-seed records and the IoU expected for two random sets with the same per-layer sizes (exact,
    ``caploc.stats``).
    """
    t = target_scores
    N, L, d = t.shape
    if N < 2 or any(v.shape[0] < 2 for v in reference_scores.values()):
        raise CaplocError("split agreement needs at least 2 samples in the target and in every reference")
    hcfg = _half_cfg(lcfg, N)
    per = []
    for s in range(seed, seed + int(n_seeds)):
        ti = _halves(N, s)
        ri = {k: _halves(v.shape[0], s + 1000 * (j + 1)) for j, (k, v) in enumerate(reference_scores.items())}
        sets = []
        for h in (0, 1):
            tt = t[torch.as_tensor(ti[h])]
            rr = {k: v[torch.as_tensor(ri[k][h])] for k, v in reference_scores.items()}
            keep, _, _ = contrast_arrays(tt, rr, cfg, hcfg)
            sets.append(np.nonzero(keep)[0].astype(np.int64))
        a, b = sets
        rec = stats.agreement(a, b)
        sa, sb = stats.per_layer_counts(a, L, d), stats.per_layer_counts(b, L, d)
        chance = stats.expected_random_agreement(sa, sb, d)["iou"]
        per.append({"seed": s, "size_a": int(a.size), "size_b": int(b.size), "iou": float(rec["iou"]),
                    "overlap": float(rec["overlap"]), "chance_iou": float(chance)})

    def ms(key):
        v = np.asarray([p[key] for p in per], dtype=np.float64)
        ok = v[np.isfinite(v)]
        return (float(ok.mean()) if ok.size else float("nan"), float(ok.std()) if ok.size else float("nan"))

    iou_m, iou_s = ms("iou")
    ov_m, ov_s = ms("overlap")
    ch_m, _ = ms("chance_iou")
    return {"iou": iou_m, "iou_sd": iou_s, "overlap": ov_m, "overlap_sd": ov_s, "chance_iou": ch_m,
            "n_seeds": int(n_seeds), "per_seed": per, "method": "random 2-splits of target and every reference"}


# ---------------------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------------------
def resolve_references(run_dir: Path, references, lm=None, out_root: Path | None = None, *, n: int | None = None,
                       seed: int | None = None, progress: bool | None = None) -> dict[str, Path]:
    """Reference run directories for ``references`` (run dirs, or dataset specs localized with the target's settings).

    ``references=None`` -> :func:`~caploc.stages.contrast_rules.default_references` of the target dataset. Dataset
    specs are localized into ``out_root/<name>`` (resumable) with the target run's LocateConfig, the target's number of
    samples and data seed, unless ``n`` / ``seed`` are given; ``lm`` is loaded from the run's model id when needed and
    not given. Every reference must have been scored like the target (:func:`caploc.runs.check_same_settings`).
    """
    run_dir = Path(run_dir)
    meta = read_json(run_dir / "neurons.json")
    if references is None:
        spec = spec_of(meta.get("dataset_source")) or meta.get("dataset", "")
        references = default_references(spec)
        log.info("default reference mix for %s: %s", spec, references)
    if isinstance(references, str):
        references = [r for r in references.split(",") if r.strip()]
    out: dict[str, Path] = {}
    todo = []
    for r in references:
        r = str(r).strip()
        if is_run_dir(r):
            rm = read_json(Path(r) / "neurons.json") if (Path(r) / "neurons.json").exists() else {}
            name = rm.get("dataset") or Path(r).name
            if name in out:
                name = f"{name}@{Path(r).name}"
            out[name] = Path(r)
        else:
            todo.append(r)
    if todo:
        lcfg = locate_config_from_dict(meta.get("config"))
        if lm is None:
            mid = meta.get("model_id")
            if not mid:
                raise CaplocError(f"{run_dir} does not name its model; pass the model to score the reference datasets")
            lm = load_model(mid, dtype=store_spec(run_dir).get("model", {}).get("dtype") or "float32")
        if lm.info.get("fingerprint") != meta.get("model_fingerprint"):
            raise IncompatibleResultError(f"the model to score references ({lm.model_id}) is not the target run's model "
                                          f"({meta.get('model_id')}): pass the same model")
        n_ref = n if n is not None else int(meta.get("n_samples") or 0) or None
        seed_ref = seed if seed is not None else int(meta.get("seed") or 0)
        root = Path(out_root) if out_root is not None else run_dir / "references"
        for spec in todo:
            ds = load_dataset(spec, n=n_ref, seed=seed_ref)
            d = root / ds.name
            log.info("localizing reference %s (%d samples) into %s", spec, len(ds), d)
            locate(lm, ds, lcfg, d, progress=progress)
            out[ds.name] = d
    for name, d in out.items():
        check_same_settings(run_dir, d)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ContrastResult:
    """The contrastive set and the plain commonality set of one locate run, with the per-neuron tables behind them.

    ``table``: one row per set (plain first) with split agreement and store specificity; ``references``: {name: run
    dir}; ``statistic`` / ``target_freq`` / ``ref_freq`` [n] / [n] / [K, n]: the rule's statistic and the frequency
    tables (flat neuron index); ``meta``: the target run's ``neurons.json`` (its provenance)."""

    kind: ClassVar[str] = "contrast"

    neurons: NeuronSet
    plain: NeuronSet
    out_dir: Path
    table: list[dict] = field(default_factory=list)
    references: dict[str, str] = field(default_factory=dict)
    config: ContrastConfig = field(default_factory=ContrastConfig)
    locate_config: LocateConfig | None = None
    meta: dict = field(default_factory=dict)
    statistic: np.ndarray | None = None
    target_freq: np.ndarray | None = None
    ref_freq: np.ndarray | None = None
    ref_names: list[str] = field(default_factory=list)
    source_run: str = ""
    seconds: float = 0.0

    @property
    def provenance(self) -> Provenance:
        return Provenance.from_meta(self.meta)

    @property
    def n_samples(self) -> int:
        return int(self.plain.n_samples or self.meta.get("n_samples") or 0)

    def save(self, out_dir: Path | str) -> Path:
        """``neurons.{json,safetensors}`` (the contrastive set), ``plain.{json,safetensors}``, ``contrast.safetensors``
        (statistic and frequency tables) and ``summary.json`` (the table); ``report.json`` comes from :func:`commit`."""
        out_dir = Path(out_dir)
        self.neurons.save(out_dir)
        self.plain.save(out_dir, name="plain")
        names = list(self.ref_names)
        atomic_save_tensors(out_dir / "contrast.safetensors", {
            "statistic": torch.from_numpy(np.asarray(self.statistic, dtype=np.float64)),
            "target_freq": torch.from_numpy(np.asarray(self.target_freq, dtype=np.float64)),
            "ref_freq": torch.from_numpy(np.asarray(self.ref_freq, dtype=np.float64).reshape(len(names), -1)),
        }, metadata={"ref_names": ",".join(names), "rule": self.config.rule})
        atomic_write_json(out_dir / "summary.json", {
            "rows": self.table, "seconds": self.seconds, "caploc_version": __version__,
            "references": self.references, "source_run": self.source_run, "ref_names": names})
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> "ContrastResult":
        out_dir = Path(out_dir)
        ns, plain = NeuronSet.load(out_dir), NeuronSet.load(out_dir, name="plain")
        summ = read_json(out_dir / "summary.json")
        t = read_tensors(out_dir / "contrast.safetensors", "contrast")
        c = dict(ns.meta.get("contrast") or {})
        known = set(ContrastConfig.__dataclass_fields__)
        cfg = ContrastConfig(**{k: v for k, v in c.items() if k in known})
        meta = {k: v for k, v in plain.meta.items()}
        src = summ.get("source_run") or ns.meta.get("source_run", "")
        return cls(ns, plain, out_dir, summ.get("rows", []), summ.get("references") or ns.meta.get("reference_runs", {}),
                   cfg, locate_config_from_dict(meta.get("config")) if meta.get("config") else None, meta,
                   t["statistic"].numpy(), t["target_freq"].numpy(), t["ref_freq"].numpy(),
                   list(summ.get("ref_names") or list(c.get("references") or {})), str(src),
                   float(summ.get("seconds") or 0.0))

    def to_report(self, out_dir: Path | str | None = None) -> dict:
        """The ``report.json`` dict (:func:`caploc.report.contrast.contrast_report`); no figures."""
        return report_contrast.contrast_report(self)


def contrast(run_dir: Path | str, reference_run_dirs, cfg: ContrastConfig | None = None, out_dir: Path | str | None = None,
             *, lm=None, split_seeds: int = 5, seed: int = 0, progress: bool | None = None) -> ContrastResult:
    """Contrastive localization of a locate run against references; writes a neuron-set directory with report.json.

    ``reference_run_dirs``: locate run directories and/or dataset specs (scored first with the target's settings,
    see :func:`resolve_references`), or None for the default mix. ``out_dir`` (default ``run_dir/contrast-<rule>``)
    gets ``neurons.{json,safetensors}`` (the contrastive set), ``plain.{json,safetensors}`` (the commonality set),
    ``contrast.safetensors`` (per-neuron statistic and frequency tables), ``summary.json`` and ``report.json``;
    ``split_seeds`` random 2-splits measure the split agreement of both sets (0 skips it).
    """
    t0 = time.time()
    cfg = cfg or ContrastConfig()
    run_dir = Path(run_dir)
    meta = NeuronSet.load(run_dir).meta  # the run's recorded metadata (not the fields NeuronSet.save derives)
    lcfg = locate_config_from_dict(meta.get("config"))
    out_dir = check_out_dir(out_dir if out_dir is not None else run_dir / f"contrast-{cfg.rule}")
    refs = resolve_references(run_dir, reference_run_dirs, lm=lm, out_root=run_dir / "references", progress=progress)
    if not refs and cfg.rule != "none":
        raise CaplocError("no reference datasets: pass --reference with run directories or dataset specs")
    tdata = load_scores(run_dir)["scores"]
    rdata = {k: load_scores(d)["scores"] for k, d in refs.items()}
    base_meta = {k: v for k, v in meta.items() if k not in ("rule", "rule_value", "min_freq", "min_count", "contrast",
                                                             "per_sample_selected_mean")}
    ns = contrastive_set(tdata, rdata, cfg.rule, locate_cfg=lcfg, meta={**base_meta, "source_run": str(run_dir),
                         "reference_runs": {k: str(v) for k, v in refs.items()}},
                         **{k: v for k, v in asdict(cfg).items() if k != "rule"})
    plain = neuron_set_from_scores(tdata, lcfg, base_meta)
    _, stat, info = contrast_arrays(tdata, rdata, cfg, lcfg)
    names = info["ref_names"]
    N = tdata.shape[0]
    mf = min_count(lcfg.min_freq, N) / N
    rows = []
    for label, flat, c in (("plain", plain.flat, ContrastConfig(rule="none")), (cfg.rule, ns.flat, cfg)):
        sp = store_specificity(flat, info["target_freq"], info["ref_freq"], names, mf)
        sa = split_agreement(tdata, rdata, c, lcfg, n_seeds=split_seeds, seed=seed) if split_seeds else None
        rows.append({"set": label, "n_neurons": len(flat), "split_iou": sa["iou"] if sa else None,
                     "split_iou_sd": sa["iou_sd"] if sa else None, "chance_iou": sa["chance_iou"] if sa else None,
                     "split_overlap": sa["overlap"] if sa else None, **{f"{k}": v for k, v in sp.items() if k != "n"}})
    res = ContrastResult(ns, plain, out_dir, rows, {k: str(v) for k, v in refs.items()}, cfg, lcfg, meta,
                         np.asarray(stat), np.asarray(info["target_freq"]), np.asarray(info["ref_freq"]), list(names),
                         str(run_dir), round(time.time() - t0, 2))
    commit(res, out_dir)
    log.info("contrastive set (%s): %d of %d plain neurons kept", cfg.rule, len(ns), len(plain))
    return res


# ---------------------------------------------------------------------------------------------------------------------
# erase-based specificity of a contrast result, and the locate post-processing
# ---------------------------------------------------------------------------------------------------------------------
def add_erase_specificity(out_dir: Path | str, lm, datasets: dict, target: str, n_random: int = 5, seed: int = 0,
                          batch_size: int = 4, chat: bool = False, progress: bool | None = None) -> dict:
    """Erase the plain and the contrastive set of a :func:`contrast` result on every dataset, vs random sets.

    ``datasets``: {name: Dataset} (use held-out samples); ``target``: the on-target name. Writes ``erase.json`` and
    adds a table, claims and a figure to ``report.json`` (:func:`caploc.report.contrast.add_erase_section`; numbers
    from :func:`caploc.stages.generic.erase_specificity`).
    """
    out_dir = Path(out_dir)
    ns, plain = NeuronSet.load(out_dir), NeuronSet.load(out_dir, name="plain")
    ns.check_compatible(lm.site)
    rule = (ns.meta.get("contrast") or {}).get("rule", "contrast")
    res = erase_specificity(lm, {"plain": plain, rule: ns}, datasets, target=target, n_random=n_random, seed=seed,
                            batch_size=batch_size, chat=chat, progress=progress)
    atomic_write_json(out_dir / "erase.json", res)
    rep = report_contrast.add_erase_section(read_json(out_dir / "report.json"), res, list(datasets), target, n_random,
                                            out_dir)
    atomic_write_json(out_dir / "report.json", rep)
    return res


def _reference_datasets(refs: dict[str, Path], allow_paths) -> dict[str, Dataset]:
    """The datasets of reference runs, rebuilt from their recorded source (every recorded field, ``target`` included);
    a reference whose data cannot be rebuilt is skipped with a warning."""
    out = {}
    for name, d in refs.items():
        rm = read_json(Path(d) / "neurons.json")
        ds, why = try_rebuild_dataset(rm.get("dataset_source"), rm.get("dataset_fingerprint"), allow_paths=allow_paths)
        if ds is None:
            log.warning("reference %s: its dataset cannot be rebuilt (%s); left out of the generic diagnostics", name, why)
            continue
        out[name] = ds
    return out


def apply_specificity(lm, run_dir: Path | str, dataset=None, *, contrast_rule: str = "none", references=None,
                      exclude_generic: bool = False, ccfg: ContrastConfig | None = None, gcfg: GenericConfig | None = None,
                      split_seeds: int = 5, progress: bool | None = None) -> NeuronSet:
    """What ``caploc locate --contrast RULE --reference ... --exclude-generic`` does after localizing.

    The plain commonality set is kept as ``run_dir/plain.{json,safetensors}``; the final set (contrastive and/or
    without generic neurons) replaces ``run_dir/neurons.{json,safetensors}``, with ``meta["contrast"]`` /
    ``meta["excluded_generic"]`` saying what was done. Details: ``run_dir/contrast-<rule>/`` (report.json) and
    ``run_dir/generic/`` (report.json); a summary in ``run_dir/specificity.json``.
    """
    run_dir = Path(run_dir)
    plain = NeuronSet.load(run_dir)
    plain.save(run_dir, name="plain")
    final = plain
    summary: dict = {"plain_size": len(plain), "plain": "plain.json"}
    refs: dict[str, Path] = {}
    if contrast_rule and contrast_rule != "none":
        cfg = ccfg or ContrastConfig(rule=contrast_rule)
        if cfg.rule != ContrastConfig(rule=contrast_rule).rule:
            raise CaplocError(f"contrast rule {contrast_rule!r} differs from the given configuration's {cfg.rule!r}")
        res = contrast(run_dir, references, cfg, run_dir / f"contrast-{cfg.rule}", lm=lm, split_seeds=split_seeds,
                       progress=progress)
        refs = {k: Path(v) for k, v in res.references.items()}
        final = res.neurons
        summary.update(contrast=cfg.rule, contrast_dir=f"contrast-{cfg.rule}", contrast_size=len(final),
                       references=res.references)
    elif references:
        refs = resolve_references(run_dir, references, lm=lm, out_root=run_dir / "references", progress=progress)
    if exclude_generic:
        datasets = {}
        if dataset is not None:
            datasets[dataset.name] = dataset
        given = [references] if isinstance(references, str) else list(references or [])
        datasets.update(_reference_datasets(refs, [r for r in given if not is_run_dir(r)]))
        runs = {(dataset.name if dataset is not None else "target"): run_dir, **refs}
        chat = bool(locate_config_from_dict(read_json(run_dir / "neurons.json").get("config")).chat)
        rep = find_generic(lm, datasets, runs, gcfg or GenericConfig(chat=chat), progress=progress)
        rep.save(run_dir / "generic")
        before = len(final)
        final = drop_generic(final, rep)
        summary.update(generic_dir="generic", generic_flagged=len(rep.generic_pairs), excluded_generic=before - len(final))
    final.save(run_dir)
    summary["final_size"] = len(final)
    atomic_write_json(run_dir / "specificity.json", summary)
    return final


__all__ = ["ContrastResult", "contrast", "resolve_references", "split_agreement", "store_specificity",
           "add_erase_specificity", "apply_specificity", "is_run_dir"]
