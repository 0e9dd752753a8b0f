"""What caploc holds in memory, predicted from a model's shape, and the budgets (``--memory-mb``) that bound it.

* :mod:`.formula` -- the terms, tensor by tensor (its docstring has the table): one IG micro-batch, one grad x act /
  evaluation / fine-tuning sample, the chunked LM head; the budget split and the automatic budget; the one batching
  rule (:func:`fit_count`) every batched loop uses.
* :mod:`.runs` -- whole-run peaks, batched exactly as the code they predict (engine, evaluation NLL, fine-tuning step).
* :mod:`.plan` -- the IG planner for an accelerator.
"""
from __future__ import annotations

from .formula import (
    CPU_AUTO_CAP_MB,
    HEAD_CAP,
    HEAD_SHARE,
    MEMORY_HELP,
    Budgets,
    GiB,
    MiB,
    ModelShape,
    activation_bytes_per_token_layer,
    auto_budget_mb,
    bare_forward_backward_bytes,
    batches,
    budgets,
    bytes_per_logit,
    chunk_tokens,
    count_params,
    engine_row_bytes,
    eval_sample_bytes,
    fit_count,
    gxa_peak_bytes,
    gxa_sample_bytes,
    ig_peak_bytes,
    micro_batches,
    model_budgets,
    train_sample_bytes,
)
from .plan import auto_memory_mb, format_plan, plan
from .runs import eval_run_peak_bytes, gxa_run_peak_bytes, ig_sample_peak_bytes, train_step_peak_bytes

__all__ = [
    "ModelShape", "count_params", "Budgets", "budgets", "auto_budget_mb", "model_budgets", "activation_bytes_per_token_layer", "ig_peak_bytes", "engine_row_bytes", "fit_count", "batches", "micro_batches", "gxa_sample_bytes", "eval_sample_bytes", "train_sample_bytes", "gxa_peak_bytes", "bare_forward_backward_bytes", "MEMORY_HELP", "HEAD_SHARE", "HEAD_CAP", "CPU_AUTO_CAP_MB", "GiB", "MiB", "chunk_tokens", "bytes_per_logit",
    "plan", "auto_memory_mb", "format_plan", "ig_sample_peak_bytes", "gxa_run_peak_bytes",
           "eval_run_peak_bytes", "train_step_peak_bytes"]
