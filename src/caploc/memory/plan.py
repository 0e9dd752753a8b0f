"""The IG planner: how many rows per micro-batch fit an accelerator, and the ``memory_mb`` that packs them."""
from __future__ import annotations

import math

import torch

from ..errors import CaplocError
from .formula import HEAD_CAP, HEAD_SHARE, GiB, MiB, ModelShape, _shape, engine_row_bytes, ig_peak_bytes


def _total_for_rows(rows_bytes: float) -> float:
    """The smallest total whose :func:`budgets` leave ``rows_bytes`` for the rows (inverse of the split)."""
    total = rows_bytes / (1 - HEAD_SHARE)
    return total if total * HEAD_SHARE <= HEAD_CAP else rows_bytes + HEAD_CAP

def plan(config, seq_len: int, dtype="bfloat16", gpu_mem_gb: float = 80.0, *, prefix_len: int = 0,
         n_scored: int | None = None, steps: int = 20, attn: str = "sdpa", reserve_gb: float = 1.0,
         safety: float = 0.9, max_rows: int = 256) -> dict:
    """The most IG rows per micro-batch that fit ``gpu_mem_gb`` for samples of ``seq_len`` tokens.

    ``prefix_len``: positions before the first scaled one (0 for ``positions=all``; the prompt for ``target``).
    Returns the row count, the predicted peak (GiB) with its terms, whether even one row fits, and the
    ``memory_mb`` to pass to ``AttributionConfig`` so the engine packs that many rows at the worst depth.
    """
    s = _shape(config)
    if seq_len < 2 or not 0 <= prefix_len < seq_len - 1:
        raise CaplocError(f"seq_len must be >= 2 and prefix_len in [0, seq_len - 1) (got {seq_len}, {prefix_len})")
    S = seq_len - 1 - prefix_len  # the last token is only a label
    n = S if n_scored is None else int(n_scored)
    budget = gpu_mem_gb * GiB * safety - reserve_gb * GiB
    peak = lambda r: ig_peak_bytes(s, r, S, prefix_len, dtype, n_scored=n, attn=attn, scaled_layers=max(1, math.ceil(r / steps)), memory_mb=1e9)
    lo = 0
    hi = max_rows
    if peak(1)["total"] <= budget:
        lo = 1
        while lo < hi:  # largest r with peak(r) <= budget (peak is increasing in r)
            mid = (lo + hi + 1) // 2
            if peak(mid)["total"] <= budget:
                lo = mid
            else:
                hi = mid - 1
    rows = lo
    at = peak(max(rows, 1))
    row_bytes = engine_row_bytes(s, S, n, dtype, prefix_len=prefix_len)
    rows_total = s.n_layers * (steps + 1)  # (layer, alpha) rows of one sample incl. the alpha = 0 completeness rows
    return {
        "model_type": s.model_type, "n_params": s.n_params, "dtype": str(dtype).removeprefix("torch."),
        "seq_len": seq_len, "prefix_len": prefix_len, "suffix_len": S, "n_scored": n, "gpu_mem_gb": gpu_mem_gb,
        "fits": rows >= 1, "rows": rows, "peak_gb": at["total"] / GiB,
        "terms_gb": {k: v / GiB for k, v in at.items() if k != "total"},
        "per_row_gb": (peak(2)["total"] - peak(1)["total"]) / GiB,
        "weights_gb": at["weights"] / GiB, "budget_gb": budget / GiB,
        "memory_mb": math.ceil(_total_for_rows((max(rows, 1) + 0.5) * row_bytes) / MiB),
        "micro_batches_per_sample": math.ceil(rows_total / max(rows, 1)),
    }


def auto_memory_mb(model, seq_len: int, *, prefix_len: int = 0, n_scored: int | None = None, steps: int = 20,
                   reserve_gb: float = 1.0, safety: float = 0.9) -> float | None:
    """``memory_mb`` for ``AttributionConfig`` from the free memory of the accelerator that holds ``model`` (its
    weights are already resident), for samples of up to ``seq_len`` tokens; None on the CPU (keep the default)."""
    dev = next(model.parameters()).device
    if dev.type in ("cpu", "meta"):
        return None
    free, _total = torch.accelerator.get_memory_info(dev)
    shape = ModelShape.from_model(model)
    weights = shape.n_params * next(model.parameters()).element_size()
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    p = plan(shape, seq_len, next(model.parameters()).dtype, (free + weights) / GiB, prefix_len=prefix_len,
             n_scored=n_scored, steps=steps, attn="eager" if attn == "eager" else "sdpa", reserve_gb=reserve_gb,
             safety=safety)
    if not p["fits"]:
        raise CaplocError(f"one attribution row of {seq_len} tokens needs ~{p['peak_gb'] - p['weights_gb']:.1f} GB "
                          f"beyond the weights but {free / GiB:.1f} GB are free on {dev}; shorten the samples "
                          "(--max-length), score fewer positions (--positions target) or split the model (--device-map)")
    return float(p["memory_mb"])


def format_plan(p: dict) -> str:
    """One line per plan for logs and docs."""
    return (f"{p['model_type']} {p['n_params'] / 1e9:.2f}B {p['dtype']} seq {p['seq_len']} on {p['gpu_mem_gb']:g} GB: "
            + (f"{p['rows']} rows/micro-batch, peak {p['peak_gb']:.1f} GB (weights {p['weights_gb']:.1f} GB, "
               f"{p['per_row_gb']:.2f} GB/row), memory_mb={p['memory_mb']}" if p["fits"] else
               f"does not fit: one row needs {p['peak_gb']:.1f} GB"))


__all__ = ["plan", "auto_memory_mb", "format_plan"]
