"""Measurements of a (possibly hooked) model on a dataset: teacher-forced NLL of the gold targets and task accuracy.

* :func:`nll_sums` / :func:`nll` -- negative log-likelihood of the gold targets, teacher-forced, in padded batches
  (right padding + attention mask, no grad). They run under whatever hooks the caller has installed, so
  ``with intervention(site, neurons, 0.0): nll(lm, ds)`` measures an intervention.
* :func:`accuracy` -- greedy generation (:func:`generate`: ``model.generate``, left padding, KV cache; neuron hooks
  apply at every generated step too) and answer parsing (:mod:`caploc.answers`).
* :func:`evaluate` -- both, as one :class:`EvalResult`.

Every stage that measures a model (``eval``, ``intervene``, ``generic``, ``finetune``) uses these; the ``caploc eval``
verb itself is :mod:`caploc.stages.evaluate`.

Conventions (ours, documented because the paper does not say): ``nll_per_token`` is token-weighted: the sum of all
target tokens' NLL over the total number of target tokens. ``nll_per_sample[i]`` is sample i's mean over its own
target tokens (each sample weighs the same in it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from .answers import KINDS, answer_kind, dataset_labels, done_fn, is_correct, truncate
from .data import collate, encode_dataset, encode_prompt, pad_id
from .errors import CaplocError
from .lmhead import row_nll
from .memory import ModelShape, batches, eval_sample_bytes, model_budgets
from .progress import bar as progress_bar
from .results import atomic_write_json, read_json

METRICS = ("nll", "accuracy")


# ---------------------------------------------------------------------------------------------------------------------
# result type
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Evaluation of one model (state) on one dataset."""

    dataset: str
    fingerprint: str
    n: int
    nll_per_token: float  # token-weighted mean over all target tokens (nan when not computed)
    nll_per_sample: np.ndarray  # [n] mean NLL per target token of each sample (empty when not computed)
    accuracy: float | None = None  # None when not computed
    correct: np.ndarray | None = None  # [n] bool
    n_tokens: np.ndarray | None = None  # [n] target tokens per sample
    generations: list[str] | None = None  # [n] generated continuations (accuracy only)
    kind: str | None = None  # answer kind used for accuracy

    @property
    def nll_sum_per_sample(self) -> np.ndarray | None:
        """[n] summed NLL of each sample's target tokens (nll_per_sample * n_tokens)."""
        if self.n_tokens is None or len(self.nll_per_sample) != len(self.n_tokens):
            return None
        return self.nll_per_sample * self.n_tokens

    def to_dict(self) -> dict:
        """JSON-safe summary plus the per-sample arrays as lists."""
        return {
            "dataset": self.dataset, "fingerprint": self.fingerprint, "n": int(self.n),
            "nll_per_token": _f(self.nll_per_token),
            "nll_per_sample": [_f(v) for v in np.asarray(self.nll_per_sample, dtype=float).tolist()],
            "n_tokens": None if self.n_tokens is None else [int(v) for v in self.n_tokens],
            "accuracy": None if self.accuracy is None else float(self.accuracy),
            "correct": None if self.correct is None else [bool(v) for v in self.correct],
            "generations": self.generations, "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        return cls(
            dataset=d["dataset"], fingerprint=d["fingerprint"], n=int(d["n"]),
            nll_per_token=float("nan") if d.get("nll_per_token") is None else float(d["nll_per_token"]),
            nll_per_sample=np.asarray([np.nan if v is None else v for v in d.get("nll_per_sample") or []], dtype=np.float64),
            accuracy=d.get("accuracy"),
            correct=None if d.get("correct") is None else np.asarray(d["correct"], dtype=bool),
            n_tokens=None if d.get("n_tokens") is None else np.asarray(d["n_tokens"], dtype=np.int64),
            generations=d.get("generations"), kind=d.get("kind"),
        )

    def save(self, out_dir: Path | str, name: str = "eval") -> Path:
        """``name.json`` (everything, atomically written)."""
        path = Path(out_dir) / f"{name}.json"
        atomic_write_json(path, {"kind": "eval_result", "result": self.to_dict()})
        return path

    @classmethod
    def load(cls, path: Path | str, name: str = "eval") -> "EvalResult":
        path = Path(path)
        d = read_json(path / f"{name}.json" if path.is_dir() else path)
        if d.get("kind") != "eval_result":
            raise CaplocError(f"{path} is not a caploc eval result (kind={d.get('kind')!r})")
        return cls.from_dict(d["result"])


def _f(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


# ---------------------------------------------------------------------------------------------------------------------
# teacher-forced NLL
# ---------------------------------------------------------------------------------------------------------------------
def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise CaplocError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _bar(total: int, desc: str, progress: bool | None, unit: str = "sample"):
    return progress_bar(total, desc, unit, progress)


@torch.no_grad()
def nll_sums(lm, encoded, *, batch_size: int = 8, progress: bool | None = None, desc: str = "nll",
             memory_mb: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed target NLL [n] (float64) and target token counts [n] of already-encoded samples (``Encoded``).

    Samples go longest first; a batch holds at most ``batch_size`` of them and, padded to its longest, fits the
    rows' share of ``memory_mb`` (:func:`caploc.memory.budgets`; None: the automatic budget of the model's device)
    by :func:`caploc.memory.eval_sample_bytes`; the LM head's chunk is the budget's head share."""
    batch_size = _check_batch_size(batch_size)
    model, tok = lm.model, lm.tokenizer
    pad = pad_id(tok, model.config)
    device = lm.site.input_device()
    n = len(encoded)
    sums = np.zeros(n, dtype=np.float64)
    counts = np.array([e.target_len for e in encoded], dtype=np.int64)
    b = model_budgets(model, memory_mb)
    shape, dtype = ModelShape.from_model(model), next(model.parameters()).dtype
    attn = "eager" if getattr(model.config, "_attn_implementation", None) == "eager" else "sdpa"
    groups = batches([len(e) for e in encoded], batch_size, lambda T: eval_sample_bytes(shape, T, dtype, attn), b.rows,
                     longest_first=True)  # similar lengths share a batch: less padding
    with _bar(n, desc, progress) as bar:
        for idx in groups:
            ids, mask = collate([encoded[i].input_ids for i in idx], pad)
            tgt = torch.zeros_like(mask, dtype=torch.bool)
            for r, i in enumerate(idx):
                tgt[r, encoded[i].prompt_len:len(encoded[i])] = True
            # only the target positions go through the LM head, a chunk at a time (caploc.lmhead): no [B, T, vocab]
            sums[idx] = row_nll(model, ids.to(device), tgt.to(device), mask.to(device), budget_bytes=b.head,
                                use_cache=False).cpu().numpy()
            bar.update(len(idx))
    return sums, counts


def nll(lm, dataset, *, chat: bool = False, batch_size: int = 8, max_length: int | None = None,
        progress: bool | None = None, memory_mb: float | None = None) -> EvalResult:
    """Teacher-forced NLL per target token of the gold targets of ``dataset`` under the model's current hooks.

    Batched with right padding and an attention mask, without gradients; sample order is kept in the result.
    """
    if len(dataset) == 0:
        raise CaplocError(f"dataset {dataset.name!r} is empty: nothing to evaluate")
    max_len = max_length or getattr(lm.model.config, "max_position_embeddings", None)
    encoded = encode_dataset(lm.tokenizer, dataset, chat=chat, max_length=max_len)
    sums, counts = nll_sums(lm, encoded, batch_size=batch_size, progress=progress, desc=f"nll {dataset.name}",
                            memory_mb=memory_mb)
    return EvalResult(
        dataset=dataset.name, fingerprint=dataset.fingerprint(), n=len(dataset),
        nll_per_token=float(sums.sum() / counts.sum()), nll_per_sample=sums / counts, n_tokens=counts,
    )


# ---------------------------------------------------------------------------------------------------------------------
# generation + accuracy
# ---------------------------------------------------------------------------------------------------------------------
def _stopping_criteria(tokenizer, prompt_width: int, done: Callable[[str], bool]):
    class _TextStop(StoppingCriteria):
        """Per-row stop when the decoded continuation satisfies ``done`` (rows already stopped stay stopped)."""

        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, prompt_width:].tolist()
            flags = [done(tokenizer.decode(row, skip_special_tokens=True)) for row in new]
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_TextStop()])


@torch.no_grad()
def generate(lm, prompts_ids: list[list[int]], *, max_new_tokens: int, batch_size: int = 8,
             done: Callable[[str], bool] | None = None, progress: bool | None = None, desc: str = "generate") -> list[str]:
    """Greedy continuations (decoded, special tokens skipped) of token-id prompts, batched with LEFT padding.

    Runs under the caller's hooks: with the KV cache every generated token passes the neuron hooks once.
    """
    batch_size = _check_batch_size(batch_size)
    model, tok = lm.model, lm.tokenizer
    pad = pad_id(tok, model.config)
    eos = getattr(tok, "eos_token_id", None)
    device = lm.site.input_device()
    gcfg = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1, pad_token_id=pad,
                            eos_token_id=eos, bos_token_id=getattr(tok, "bos_token_id", None))
    n = len(prompts_ids)
    out: list[str] = [""] * n
    order = sorted(range(n), key=lambda i: -len(prompts_ids[i]))
    with _bar(n, desc, progress) as bar:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            W = max(len(prompts_ids[i]) for i in idx)
            ids = torch.full((len(idx), W), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), W), dtype=torch.long)
            for r, i in enumerate(idx):
                p = prompts_ids[i]
                ids[r, W - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[r, W - len(p):] = 1
            kw = {}
            if done is not None:
                kw["stopping_criteria"] = _stopping_criteria(tok, W, done)
            seq = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gcfg, **kw)
            for r, i in enumerate(idx):
                out[i] = tok.decode(seq[r, W:].tolist(), skip_special_tokens=True)
            bar.update(len(idx))
    return out


def accuracy(lm, dataset, *, chat: bool = False, batch_size: int = 8, max_new_tokens: int | None = None,
             parser: str | None = None, progress: bool | None = None) -> tuple[float, np.ndarray, list[str]]:
    """Greedy-generation accuracy: ``(accuracy, correct [n] bool, generations [n])``.

    ``parser``: an answer kind (gsm | label | facts | exact); default :func:`answer_kind`. ``max_new_tokens``:
    default the longest gold target in tokens + 8. Generations are cut at ``"\\nQuestion:"`` before parsing.
    """
    if len(dataset) == 0:
        raise CaplocError(f"dataset {dataset.name!r} is empty: nothing to evaluate")
    kind = parser or answer_kind(dataset)
    if kind not in KINDS:
        raise CaplocError(f"unknown answer parser {kind!r}; choose one of {', '.join(KINDS)}")
    tok = lm.tokenizer
    prompts = [encode_prompt(tok, s.prompt, chat=chat) for s in dataset]
    if max_new_tokens is None:
        max_new_tokens = max(len(tok.encode(s.target, add_special_tokens=False)) for s in dataset) + 8
    if max_new_tokens < 1:
        raise CaplocError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    gens = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, done=done_fn(kind),
                    progress=progress, desc=f"generate {dataset.name}")
    gens = [truncate(g) for g in gens]
    labels = dataset_labels(dataset) if kind == "label" else None
    correct = np.array([is_correct(kind, g, s, labels=labels) for g, s in zip(gens, dataset)], dtype=bool)
    return float(correct.mean()), correct, gens


def evaluate(lm, dataset, *, metrics: Sequence[str] = ("nll",), chat: bool = False, batch_size: int = 8,
             max_length: int | None = None, max_new_tokens: int | None = None, parser: str | None = None,
             progress: bool | None = None, memory_mb: float | None = None) -> EvalResult:
    """:func:`nll` and/or :func:`accuracy` of ``dataset`` under the model's current hooks."""
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise CaplocError(f"unknown metrics {bad or metrics!r}; choose from {', '.join(METRICS)}")
    if "nll" in metrics:
        res = nll(lm, dataset, chat=chat, batch_size=batch_size, max_length=max_length, progress=progress,
                  memory_mb=memory_mb)
    else:
        res = EvalResult(dataset.name, dataset.fingerprint(), len(dataset), float("nan"), np.zeros(0))
    if "accuracy" in metrics:
        kind = parser or answer_kind(dataset)
        acc, correct, gens = accuracy(lm, dataset, chat=chat, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                      parser=kind, progress=progress)
        res.accuracy, res.correct, res.generations, res.kind = acc, correct, gens, kind
    return res


__all__ = ["METRICS", "KINDS", "EvalResult", "nll_sums", "nll", "generate", "accuracy", "evaluate"]
