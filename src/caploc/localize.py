"""Commonality neuron localization (CNL): per-sample selection, then a frequency rule over the dataset.

Per sample (pure functions over ``scores [N, n_neurons]``):
  * ``sigma``: Attr > mean + sigma * sd over all neurons of that sample (paper: sigma = 6);
  * ``topk``:  the k highest attributions of the sample;
  * ``kn``:    Attr > t * max over the sample (knowledge neurons: t = 0.2).
Dataset level: a neuron is a commonality neuron if it is selected in at least S of the N samples. ``min_freq`` is a
fraction (0 < x <= 1: S = ceil(x * N)) or an absolute count (an integer > 1). The paper used S = 19 of groups of 20.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .attribution.engine import AttributionConfig, Attributor
from .config import check, setting
from .errors import CaplocError, DataError
from .results import NeuronSet, OutLock, ScoreStore, atomic_write_json, check_out_dir

log = logging.getLogger(__name__)

RULES = ("sigma", "topk", "kn")


# ---------------------------------------------------------------------------------------------------------------------
# pure selection functions
# ---------------------------------------------------------------------------------------------------------------------
def select_sigma(scores: torch.Tensor, sigma: float) -> torch.Tensor:
    """scores [N, n] -> bool [N, n]: Attr > mean + sigma * sd (per sample, over all its neurons; population sd)."""
    s = scores.double()
    mu = s.mean(1, keepdim=True)
    sd = s.std(1, keepdim=True, unbiased=False)
    return s > mu + sigma * sd


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [N, n] -> bool [N, n]: the k largest attributions of each sample."""
    k = min(int(k), scores.shape[1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, scores.topk(k, dim=1).indices, True)
    return mask


def select_kn(scores: torch.Tensor, t: float) -> torch.Tensor:
    """scores [N, n] -> bool [N, n]: Attr > t * max of the sample (knowledge-neurons rule)."""
    return scores > t * scores.max(1, keepdim=True).values


def select(scores: torch.Tensor, rule: str, value: float) -> torch.Tensor:
    if rule == "sigma":
        return select_sigma(scores, value)
    if rule == "topk":
        return select_topk(scores, int(value))
    if rule == "kn":
        return select_kn(scores, value)
    raise CaplocError(f"unknown selection rule {rule!r}; choose one of {', '.join(RULES)}")


def min_count(min_freq: float, n_samples: int) -> int:
    """The absolute threshold S for ``min_freq`` (a fraction in (0, 1], or a count > 1)."""
    if min_freq <= 0:
        raise CaplocError(f"min_freq must be > 0 (a fraction in (0, 1] or a sample count), got {min_freq}")
    if min_freq <= 1:
        return max(1, math.ceil(min_freq * n_samples - 1e-9))
    if min_freq != int(min_freq):
        raise CaplocError(f"min_freq > 1 must be a whole number of samples, got {min_freq}")
    if min_freq > n_samples:
        raise CaplocError(f"min_freq {int(min_freq)} exceeds the number of samples {n_samples}")
    return int(min_freq)


def commonality(mask: torch.Tensor, min_freq: float) -> tuple[np.ndarray, np.ndarray]:
    """mask [N, n] -> (selected flat indices, counts [n]) with counts >= S."""
    counts = mask.sum(0).numpy().astype(np.int64)
    S = min_count(min_freq, mask.shape[0])
    return np.nonzero(counts >= S)[0], counts


# ---------------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class LocateConfig:
    """How to localize: attribution settings, the per-sample rule and the dataset-level frequency rule."""

    attribution: AttributionConfig = setting(default_factory=AttributionConfig, help="How neurons are scored.")
    rule: str = setting("sigma", help="Per-sample selection rule: sigma (Attr > mean + sigma*sd) | topk | kn "
                        "(Attr > t*max).", choices=RULES)
    sigma: float = setting(6.0, help="sigma rule: keep Attr > mean + sigma*sd over the sample's neurons (paper: 6).",
                           min=0)
    topk: int = setting(50, help="topk rule: keep the k highest-scoring neurons of each sample.", min=1)
    kn_t: float = setting(0.2, help="kn rule: keep Attr > t*max (knowledge-neurons: 0.2).", min=0, min_exclusive=True,
                          max=1)
    min_freq: float = setting(0.5, help="Keep neurons selected in >= this fraction (<= 1) or count (> 1) of samples "
                              "(paper: 19 of 20).", min=0, min_exclusive=True)
    chat: bool = setting(False, help="Wrap prompts in the tokenizer's chat template.")
    max_length: int | None = setting(None, help="Refuse samples longer than this many tokens (default: the model's "
                                     "context).", min=1)
    shard_size: int = setting(16, help="Samples per score-store shard (the unit of resume).", min=1)

    def __post_init__(self):
        check(self)
        if not isinstance(self.attribution, AttributionConfig):
            raise CaplocError("LocateConfig.attribution must be an AttributionConfig")

    @property
    def rule_value(self) -> float:
        return {"sigma": self.sigma, "topk": self.topk, "kn": self.kn_t}[self.rule]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attribution"] = self.attribution.to_dict()
        return d


@dataclass
class LocateResult:
    neurons: NeuronSet
    store: ScoreStore
    out_dir: Path
    summary: dict


# ---------------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------------
def score_dataset(lm, dataset, cfg: LocateConfig, out_dir: Path | str, *, overwrite: bool = False,
                  rank: int = 0, world: int = 1, progress: bool | None = None) -> ScoreStore:
    """Attribute every sample and write the per-sample score store (resumable; shards split over ``world`` ranks)."""
    from tqdm.auto import tqdm

    from .data import encode_dataset

    if len(dataset) == 0:
        raise DataError(f"dataset {dataset.name!r} is empty: nothing to localize")
    out_dir = Path(out_dir)
    site = lm.site
    max_len = cfg.max_length or getattr(lm.model.config, "max_position_embeddings", None)
    encoded = encode_dataset(lm.tokenizer, dataset, chat=cfg.chat, max_length=max_len)
    store = ScoreStore(out_dir / "scores")
    spec = {
        "model": {k: lm.info.get(k) for k in ("model_id", "model_type", "n_layers", "d_mlp", "fingerprint", "dtype")},
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "source": dataset.source},
        "attribution": cfg.attribution.identity(), "chat": cfg.chat, "max_length": max_len,
    }
    if rank == 0:
        store.open(spec, len(encoded), cfg.shard_size, overwrite=overwrite)
    if world > 1:
        from .distributed import barrier

        barrier()
        if rank != 0:
            store.open(spec, len(encoded), cfg.shard_size, overwrite=False, clean_tmp=False)
    done = store.finished_shards()
    n_shards = -(-len(encoded) // cfg.shard_size)
    todo = [k for k in range(n_shards) if k % world == rank and k not in done]
    att = Attributor(site, cfg.attribution)
    n_todo = sum(min(cfg.shard_size, len(encoded) - k * cfg.shard_size) for k in todo)
    t0 = time.time()
    with tqdm(total=n_todo, desc=f"attribution ({cfg.attribution.method})", unit="sample", disable=progress is False
              if progress is not None else None, leave=False) as bar:
        for k in todo:
            idx = list(range(k * cfg.shard_size, min(len(encoded), (k + 1) * cfg.shard_size)))
            res = att.score_batch([(encoded[i].input_ids, encoded[i].prompt_len) for i in idx])
            L = site.n_layers
            gap = torch.stack([r.gap if r.gap is not None else torch.full((L,), float("nan")) for r in res])
            store.write_shard(k, idx, torch.stack([r.scores for r in res]), [r.f for r in res], gap)
            bar.update(len(idx))
    log.info("rank %d scored %d samples in %.1f s (%s)", rank, n_todo, time.time() - t0, att.stats)
    return store


def neuron_set_from_scores(scores: torch.Tensor, cfg: LocateConfig, meta: dict) -> NeuronSet:
    """scores [N, L, d] -> the commonality neuron set under ``cfg``'s rule and frequency threshold."""
    N, L, d = scores.shape
    flat_scores = scores.reshape(N, L * d)
    mask = select(flat_scores, cfg.rule, cfg.rule_value)
    sel, counts = commonality(mask, cfg.min_freq)
    mean = flat_scores.double().mean(0).numpy()
    return NeuronSet.from_flat(
        sel, L, d, frequency=counts[sel] / N, mean_score=mean[sel], counts=counts, n_samples=N,
        meta={**meta, "rule": cfg.rule, "rule_value": cfg.rule_value, "min_freq": cfg.min_freq,
              "min_count": min_count(cfg.min_freq, N), "per_sample_selected_mean": float(mask.sum(1).double().mean())},
    )


def locate(lm, dataset, cfg: LocateConfig, out_dir: Path | str, *, overwrite: bool = False,
           progress: bool | None = None, rank: int = 0, world: int = 1) -> LocateResult | None:
    """Score ``dataset`` on ``lm`` and write ``out_dir/neurons.{json,safetensors}`` + ``out_dir/scores/``.

    With ``world > 1`` every rank scores its shards; rank 0 then merges and returns the result (others return None).
    """
    out_dir = check_out_dir(out_dir)
    with OutLock(out_dir) if rank == 0 else contextlib.nullcontext():
        return _locate(lm, dataset, cfg, out_dir, overwrite=overwrite, progress=progress, rank=rank, world=world)


def _locate(lm, dataset, cfg: LocateConfig, out_dir: Path, *, overwrite: bool, progress: bool | None, rank: int,
            world: int) -> LocateResult | None:
    t0 = time.time()
    store = score_dataset(lm, dataset, cfg, out_dir, overwrite=overwrite, rank=rank, world=world, progress=progress)
    if world > 1:
        from .distributed import barrier

        barrier()
        if rank != 0:
            return None
    data = store.load()
    site = lm.site
    meta = {
        "model_id": lm.info.get("model_id"), "model_type": site.model_type, "neuron_site": site.describe()["neuron_site"],
        "model_fingerprint": lm.info.get("fingerprint"), "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(), "dataset_source": dataset.source,
        "seed": dataset.source.get("seed") if isinstance(dataset.source, dict) else None,
        "method": cfg.attribution.method, "config": cfg.to_dict(), "params_per_neuron": site.params_per_neuron(),
        "total_params": site.total_params(), "caploc_version": __version__,
    }
    ns = neuron_set_from_scores(data["scores"], cfg, meta)
    ns.save(out_dir)
    gap = data["gap"]
    f = data["f"]
    summary = {
        "n_neurons": len(ns), "share_of_neurons": ns.share_of_neurons(), "share_of_params": ns.share_of_params(),
        "per_layer": ns.per_layer_counts().tolist(), "n_samples": int(data["scores"].shape[0]),
        "min_count": ns.meta["min_count"], "mean_f": float(f.mean()),
        "completeness_gap_abs_mean": float(gap.abs().nanmean()) if torch.isfinite(gap).any() else None,
        "completeness_rel_gap_mean": _rel_gap(data), "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    log.info("located %d neurons (%.4f%% of MLP neurons)", len(ns), 100 * ns.share_of_neurons())
    return LocateResult(ns, store, out_dir, summary)


def _rel_gap(data) -> float | None:
    gap = data["gap"]
    if not torch.isfinite(gap).any():
        return None
    tot = data["scores"].sum(-1)  # [N, L]
    ok = torch.isfinite(gap)
    denom = (tot - gap).abs().clamp(min=1e-6)  # f(a) - f(0)
    return float((gap[ok].abs() / denom[ok]).median())


def load_scores(run_dir: Path | str) -> dict[str, torch.Tensor]:
    """The per-sample scores of a locate run directory (``run_dir/scores``)."""
    return ScoreStore(Path(run_dir) / "scores").load()


def relocalize(run_dir: Path | str, cfg: LocateConfig, indices=None) -> NeuronSet:
    """Recompute a neuron set from stored scores (optionally on a subset of samples) without new attributions."""
    run_dir = Path(run_dir)
    data = load_scores(run_dir)
    scores = data["scores"] if indices is None else data["scores"][torch.as_tensor(indices, dtype=torch.long)]
    old = NeuronSet.load(run_dir)
    return neuron_set_from_scores(scores, cfg, {k: v for k, v in old.meta.items() if k not in ("rule", "rule_value", "min_freq", "min_count")})
