"""Scorer fidelity and the stability gap, from stored per-sample scores (no attribution is recomputed).

Fidelity: several locate runs that scored the SAME samples (same dataset fingerprint) with different scorers (exact
IG, grad x activation, activation) are compared per sample against a reference scorer (IG): Spearman correlation
over all MLP neurons, Jaccard overlap of the per-sample sigma sets (pooled: the paper's rule; per layer: the
sigma_layer rule) and of the per-sample top-k sets; and the IoU of the commonality sets. Runs still in progress are
read shard by shard (only samples finished in every run are compared), so the numbers can be reported while a slow
IG run is resuming in the background.

Stability gap: split agreement (IoU of the commonality sets of disjoint halves) as a function of the number of
samples (``ScoreRun.head``-style prefixes of one run), of the selection rule (pooled vs per-layer sigma) and of the
thresholds sigma and S; computed with :mod:`caploc.stability`'s split functions on selection masks made here.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

# ---------------------------------------------------------------------------------------------------------------------
from .. import stats
from ..errors import CaplocError
from ..localize import commonality, select
from ..progress import track
from ..results import atomic_write_json, read_json
from ..scorestore import ScoreStore

# --- stage-layer imports (redirect after the stage refactor) ---------------------------------------------------------
from ..splits import StabilityConfig, split_pairs, summarize_pairs

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# reading (possibly unfinished) score stores
# ---------------------------------------------------------------------------------------------------------------------
def load_partial(run_dir: Path | str) -> dict:
    """The finished shards of a locate run's score store: ``index [n]``, ``scores [n, L, d]`` (sample order), the
    store's spec and whether it is complete. A run still being written is fine (unfinished shards are skipped)."""
    store = ScoreStore(Path(run_dir) / "scores")
    if not (store.root / "store.json").exists():
        raise CaplocError(f"{run_dir} has no scores/store.json: pass a directory written by `caploc locate`")
    meta = store.meta()
    done = sorted(store.finished_shards())
    if not done:
        raise CaplocError(f"{run_dir} has no finished score shard yet; wait for `caploc locate` to write one")
    parts = [load_file(str(store.shard_path(k))) for k in done]
    index = torch.cat([p["index"] for p in parts])
    scores = torch.cat([p["scores"] for p in parts])
    order = torch.argsort(index)
    return {"index": index[order], "scores": scores[order], "spec": meta.get("spec", {}),
            "n_total": int(meta["n_samples"]), "complete": len(done) >= store.n_shards()}


def align(runs: dict[str, dict]) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Common sample indices of runs over the same dataset -> (indices, {name: scores [n, L, d]})."""
    fps = {name: r["spec"].get("dataset", {}).get("fingerprint") for name, r in runs.items()}
    if len(set(fps.values())) != 1:
        raise CaplocError(f"the runs scored different datasets ({fps}); localize the same --data/--n/--seed/--target")
    shapes = {tuple(r["scores"].shape[1:]) for r in runs.values()}
    if len(shapes) != 1:
        raise CaplocError(f"the runs have different model shapes {shapes}")
    common = None
    for r in runs.values():
        ix = set(r["index"].tolist())
        common = ix if common is None else common & ix
    common_ix = np.array(sorted(common), dtype=np.int64)
    if common_ix.size == 0:
        raise CaplocError("the runs have no finished sample in common yet")
    out = {}
    for name, r in runs.items():
        pos = {int(v): i for i, v in enumerate(r["index"].tolist())}
        out[name] = r["scores"][torch.as_tensor([pos[int(i)] for i in common_ix])]
    return common_ix, out


# ---------------------------------------------------------------------------------------------------------------------
# pure comparisons
# ---------------------------------------------------------------------------------------------------------------------
def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of ``x`` with ties given their average rank."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.nonzero(new)[0]
    ends = np.r_[starts[1:], x.size]
    avg = (starts + ends - 1) / 2.0
    r = np.empty(x.size, dtype=np.float64)
    r[order] = avg[np.cumsum(new) - 1]
    return r


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks; nan if either is constant)."""
    ra, rb = average_ranks(np.asarray(a).ravel()), average_ranks(np.asarray(b).ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def jaccard_rows(A: torch.Tensor, B: torch.Tensor) -> np.ndarray:
    """Per-row Jaccard |A∩B| / |A∪B| of two boolean masks [N, n] (nan where both rows are empty)."""
    inter = (A & B).sum(1).double()
    union = (A | B).sum(1).double()
    out = inter / union
    out[union == 0] = float("nan")
    return out.numpy()


def _mean(v) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    return float(np.nanmean(v)) if np.any(~np.isnan(v)) else None


def compare_scorers(ref: torch.Tensor, other: torch.Tensor, *, sigma: float = 6.0, min_freq: float = 0.5,
                    topk: int = 100) -> dict:
    """Per-sample agreement of ``other`` with the reference scorer ``ref`` (both [N, L, d]), see the module docstring.
    Returns means over samples (and the per-sample values) plus commonality-set IoUs and the sets' sizes."""
    if ref.shape != other.shape:
        raise CaplocError(f"scores of different shapes {tuple(ref.shape)} vs {tuple(other.shape)}")
    N, L, d = ref.shape
    fr, fo = ref.reshape(N, -1), other.reshape(N, -1)
    rho = np.array([spearman(fr[i].numpy(), fo[i].numpy()) for i in range(N)])
    out = {"n_samples": N, "spearman": _mean(rho), "spearman_per_sample": rho.tolist()}
    for rule in ("sigma", "sigma_layer"):
        ma, mb = select(fr, rule, sigma, n_layers=L), select(fo, rule, sigma, n_layers=L)
        jac = jaccard_rows(ma, mb)
        sa, _ = commonality(ma, min_freq)
        sb, _ = commonality(mb, min_freq)
        ag = stats.agreement(sa, sb)
        out[rule] = {"sample_jaccard": _mean(jac), "sample_jaccard_per_sample": [None if np.isnan(v) else float(v)
                                                                                 for v in jac],
                     "sample_size_ref": float(ma.sum(1).double().mean()),
                     "sample_size_other": float(mb.sum(1).double().mean()),
                     "common_iou": ag["iou"], "common_size_ref": len(sa), "common_size_other": len(sb),
                     "common_ref_top_layer_share": _top_layer_share(sa, L, d),
                     "common_other_top_layer_share": _top_layer_share(sb, L, d)}
    ta, tb = select(fr, "topk", topk), select(fo, "topk", topk)
    out["topk"] = {"k": topk, "sample_jaccard": _mean(jaccard_rows(ta, tb))}
    return out


def _top_layer_share(flat: np.ndarray, L: int, d: int) -> float | None:
    if len(flat) == 0:
        return None
    c = stats.per_layer_counts(flat, L, d)
    return float(c.max() / c.sum())


def fidelity(run_dirs: dict[str, Path | str], reference: str, *, sigma: float = 6.0, min_freq: float = 0.5,
             topk: int = 100) -> dict:
    """Compare every run with the ``reference`` run on their common finished samples -> a JSON-safe dict."""
    if reference not in run_dirs:
        raise CaplocError(f"the reference scorer {reference!r} is not among the runs {sorted(run_dirs)}")
    runs = {name: load_partial(p) for name, p in run_dirs.items()}
    idx, scores = align(runs)
    methods = {name: r["spec"].get("attribution", {}) for name, r in runs.items()}
    comps = {name: compare_scorers(scores[reference], s, sigma=sigma, min_freq=min_freq, topk=topk)
             for name, s in scores.items() if name != reference}
    return {"kind": "fidelity", "reference": reference, "samples": idx.tolist(), "n_samples": int(idx.size),
            "complete": {n: r["complete"] for n, r in runs.items()}, "n_total": {n: r["n_total"] for n, r in runs.items()},
            "attribution": methods, "sigma": sigma, "min_freq": min_freq, "topk": topk, "comparisons": comps,
            "runs": {n: str(p) for n, p in run_dirs.items()}}


# ---------------------------------------------------------------------------------------------------------------------
# the stability gap
# ---------------------------------------------------------------------------------------------------------------------
def split_iou(scores: torch.Tensor, rule: str, sigma: float, min_freq: float, scfg: StabilityConfig,
              groups=None) -> dict:
    """Split agreement (random halves, ``scfg.seeds``) of the commonality sets of ``scores`` [N, L, d] under the
    per-sample ``rule`` (sigma | sigma_layer): IoU and overlap means with bootstrap CIs, the sets' mean size, chance."""
    N, L, d = scores.shape
    mask = select(scores.reshape(N, -1), rule, sigma, n_layers=L)
    recs, _ = split_pairs(mask, min_freq, L, d, groups, scfg, kinds=["random"])
    s = summarize_pairs(recs, scfg)["random"]
    return {"n_samples": N, "rule": rule, "sigma": sigma, "min_freq": min_freq, "iou": s["iou"]["mean"],
            "iou_lo": s["iou"]["lo"], "iou_hi": s["iou"]["hi"], "iou_chance": s["iou"]["chance"],
            "overlap": s["overlap"]["mean"], "size_mean": s["size_mean"], "n_empty_pairs": s["n_empty_pairs"]}


def stability_curve(scores: torch.Tensor, ns, *, rules=("sigma", "sigma_layer"), sigmas=(6.0,), min_freqs=(0.5,),
                    seeds: int = 5, progress: bool | None = None) -> list[dict]:
    """Split IoU for the first n samples of ``scores`` for every n in ``ns`` x rule x sigma x S (one row each)."""
    scfg = StabilityConfig(k=2, seeds=list(range(seeds)), kinds=["random"], null_draws=0, n_boot=500)
    ns = [int(n) for n in ns if 2 <= int(n) <= scores.shape[0]]
    jobs = [(n, r, s, f) for n in ns for r in rules for s in sigmas for f in min_freqs]
    rows = []
    for n, r, s, f in track(jobs, desc="stability curve", unit="point", progress=progress):
        rows.append(split_iou(scores[:n], r, s, f, scfg))
    return rows


def sample_counts(n_max: int, start: int = 8) -> list[int]:
    """8, 16, 32, ... up to n_max (and n_max itself)."""
    out, n = [], start
    while n < n_max:
        out.append(n)
        n *= 2
    return out + [n_max]


def save_json(obj: dict, path: Path | str) -> Path:
    atomic_write_json(path, obj)
    return Path(path)


def load_json(path: Path | str, kind: str) -> dict:
    js = read_json(path)
    if js.get("kind") != kind:
        raise CaplocError(f"{path} is not a caploc {kind} file (kind={js.get('kind')!r})")
    return js
