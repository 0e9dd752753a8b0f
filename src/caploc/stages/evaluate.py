"""``caploc eval``: several datasets, each measured untouched and (optionally) under an intervention on a neuron set.

:func:`run_eval` measures every dataset with :func:`caploc.measure.evaluate` (teacher-forced NLL per target token
and/or greedy-generation accuracy), untouched and inside :func:`caploc.neurons.intervention`, and returns an
:class:`EvalRun` written as ``eval.json`` + ``report.json`` (:mod:`caploc.report.evaluate`). Effects here are not
compared with random neurons: that is ``caploc intervene`` (:mod:`caploc.stages.intervene`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from ..config import check, setting
from ..errors import CaplocError
from ..measure import METRICS, EvalResult, evaluate
from ..memory import MEMORY_HELP
from ..neurons import MODES, gain_for, intervention
from ..report import evaluate as report_eval
from ..results import atomic_write_json, check_out_dir, read_json
from ..runs import commit

log = logging.getLogger(__name__)


def _f(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v



# ---------------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """Settings of ``caploc eval`` (the intervention and how every dataset is measured)."""

    metrics: tuple = setting(("nll",), help="nll, accuracy or both (accuracy generates: slow).", choices=METRICS,
                             item=str)
    mode: str = setting("erase", help="With neurons: erase (gain 0) or enhance (gain k).", choices=MODES)
    k: float = setting(2.0, help="Enhancement gain (mode enhance).", min=0.0)
    chat: bool = setting(False, help="Wrap prompts in the chat template.")
    batch_size: int = setting(8, help="At most this many samples per forward pass.", min=1)
    memory_mb: float | None = setting(None, min=0, min_exclusive=True, help=MEMORY_HELP)
    max_length: int | None = setting(None, help="Refuse samples longer than this many tokens (default: the model's "
                                     "context).", min=1)
    max_new_tokens: int | None = setting(None, help="Generation length for accuracy (default: longest target + 8).",
                                         min=1)

    def __post_init__(self):
        check(self)
        self.metrics = tuple(self.metrics)
        if not self.metrics:
            raise CaplocError("EvalConfig.metrics is empty; choose nll, accuracy or both")

    def measure_kw(self) -> dict:
        """The keyword arguments of :func:`evaluate` these settings give."""
        return {"chat": self.chat, "batch_size": self.batch_size, "max_length": self.max_length,
                "max_new_tokens": self.max_new_tokens, "memory_mb": self.memory_mb}


# ---------------------------------------------------------------------------------------------------------------------
# the `caploc eval` verb
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EvalRun:
    """Several datasets, each evaluated untouched and (optionally) under an intervention on a neuron set.

    ``provenance`` is the run's description (model, metrics, intervention, datasets; written as ``meta``)."""

    kind: ClassVar[str] = "eval"

    results: dict[str, dict[str, EvalResult]]  # dataset label -> condition -> result
    meta: dict = field(default_factory=dict)

    @property
    def provenance(self) -> dict:
        return self.meta

    def rows(self) -> list[list]:
        """One row per dataset x condition: label, condition, n, target tokens, NLL/tok, ΔNLL/tok, acc, Δacc."""
        rows = []
        for label, conds in self.results.items():
            base = conds.get("untouched")
            for cond, r in conds.items():
                d_nll = None if base is None or cond == "untouched" else r.nll_per_token - base.nll_per_token
                d_acc = (None if base is None or cond == "untouched" or r.accuracy is None or base.accuracy is None
                         else r.accuracy - base.accuracy)
                rows.append([label, cond, r.n, int(r.n_tokens.sum()) if r.n_tokens is not None else None,
                             _f(r.nll_per_token), None if d_nll is None else _f(d_nll), r.accuracy, d_acc])
        return rows

    def save(self, out_dir: Path | str) -> Path:
        """``eval.json`` (every per-sample result); the report is written by :meth:`commit`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "eval.json", {
            "kind": "eval_run", "meta": self.meta,
            "results": {lab: {c: r.to_dict() for c, r in conds.items()} for lab, conds in self.results.items()},
        })
        return out_dir

    def commit(self, out_dir: Path | str) -> Path:
        """``eval.json`` then ``report.json`` (last)."""
        return commit(self, out_dir)

    @classmethod
    def load(cls, out_dir: Path | str) -> "EvalRun":
        d = read_json(Path(out_dir) / "eval.json")
        if d.get("kind") != "eval_run":
            raise CaplocError(f"{out_dir} is not a caploc eval directory (kind={d.get('kind')!r})")
        res = {lab: {c: EvalResult.from_dict(r) for c, r in conds.items()} for lab, conds in d["results"].items()}
        return cls(res, d.get("meta", {}))

    def to_report(self, out_dir: Path | str | None = None) -> dict:
        """The ``report.json`` dict (:func:`caploc.report.evaluate.eval_report`); no figures."""
        return report_eval.eval_report(self)


def run_eval(lm, datasets: dict[str, Any], *, neurons=None, mode: str = "erase", k: float = 2.0,
             metrics: Sequence[str] = ("nll",), out_dir: Path | str | None = None, meta: dict | None = None,
             cfg: EvalConfig | None = None, **kw) -> EvalRun:
    """Evaluate every dataset untouched and, with ``neurons``, under the intervention (``mode`` erase | enhance
    with gain ``k``). ``kw`` goes to :func:`evaluate`. With ``cfg`` (an :class:`EvalConfig`), its settings replace
    ``mode``, ``k``, ``metrics`` and ``kw``. Writes ``eval.json`` + ``report.json`` to ``out_dir``."""
    if cfg is not None:
        mode, k, metrics, kw = cfg.mode, cfg.k, cfg.metrics, {**kw, **cfg.measure_kw()}
    if out_dir is not None:
        out_dir = check_out_dir(out_dir)  # before any computation
    t0 = time.time()
    results: dict[str, dict[str, EvalResult]] = {}
    gain = gain_for(mode, k) if neurons is not None else None
    for label, ds in datasets.items():
        results[label] = {"untouched": evaluate(lm, ds, metrics=metrics, **kw)}
        if neurons is not None:
            with intervention(lm.site, neurons, gain):
                results[label][f"{mode}(x{gain:g})"] = evaluate(lm, ds, metrics=metrics, **kw)
        log.info("evaluated %s", label)
    info = {
        "model_id": lm.info.get("model_id"), "model_fingerprint": lm.info.get("fingerprint"),
        "metrics": list(metrics), "chat": kw.get("chat", False), "mode": mode if neurons is not None else None,
        "gain": gain, "n_neurons": None if neurons is None else len(neurons), "seconds": round(time.time() - t0, 2),
        "datasets": {lab: {"name": ds.name, "fingerprint": ds.fingerprint(), "n": len(ds), "source": ds.source}
                     for lab, ds in datasets.items()},
        **(meta or {}),
    }
    run = EvalRun(results, info)
    if out_dir is not None:
        run.commit(out_dir)
    return run


__all__ = ["EvalConfig", "EvalRun", "run_eval"]
