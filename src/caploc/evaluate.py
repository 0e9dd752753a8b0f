"""Evaluation of a (possibly hooked) model on a dataset: teacher-forced NLL of gold targets and task accuracy.

* :func:`nll` — mean negative log-likelihood per target token of the gold targets, teacher-forced, in padded batches
  (right padding + attention mask, no grad). It runs under whatever hooks the caller has installed, so
  ``with scale_neurons(...): nll(lm, ds)`` measures an intervention.
* :func:`accuracy` — greedy generation (``model.generate``, left padding, pad token set, KV cache: neuron hooks
  apply at every generated step too) and answer parsing with :func:`parse_answer` / :func:`is_correct`.
* :func:`evaluate` — both, as one :class:`EvalResult`.
* :func:`run_eval` — the ``caploc eval`` pipeline: several datasets x {untouched, intervened}, ``report.json``.

Conventions (ours, documented because the paper does not say):

* ``nll_per_token`` is token-weighted: the sum of all target tokens' NLL over the total number of target tokens.
  ``nll_per_sample[i]`` is sample i's mean over its own target tokens (each sample weighs the same in it).
* Answer kinds: ``gsm`` (gsm_symbolic and numeric reasoning-gym tasks: the number after ``####``, else the last
  number; ``1,000`` -> ``1000``, ``3.0`` -> ``3``), ``facts`` (the generation starts with the attribute, ignoring case
  and whitespace runs, and the attribute is not cut inside a word), ``label`` (the first word that is one of the
  dataset's labels), ``exact`` (the generation starts with the target, whitespace runs collapsed).
"""
from __future__ import annotations

import inspect
import logging
import math
import re
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import CaplocError

log = logging.getLogger(__name__)

KINDS = ("gsm", "label", "facts", "exact")
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
        from .results import atomic_write_json

        path = Path(out_dir) / f"{name}.json"
        atomic_write_json(path, {"kind": "eval_result", "result": self.to_dict()})
        return path

    @classmethod
    def load(cls, path: Path | str, name: str = "eval") -> "EvalResult":
        from .results import read_json

        path = Path(path)
        d = read_json(path / f"{name}.json" if path.is_dir() else path)
        if d.get("kind") != "eval_result":
            raise CaplocError(f"{path} is not a caploc eval result (kind={d.get('kind')!r})")
        return cls.from_dict(d["result"])


def _f(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


# ---------------------------------------------------------------------------------------------------------------------
# answer parsing
# ---------------------------------------------------------------------------------------------------------------------
# a number: optional minus, digits with proper thousands separators or plain digits, optional decimals
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUM_RE = re.compile(_NUM)
_HASH_RE = re.compile(r"####\s*\$?\s*(" + _NUM + ")")


def normalize_number(text: str) -> str | None:
    """'1,000' -> '1000', '3.0' -> '3', '1687.50' -> '1687.5', '-0' -> '0', '.5' -> '0.5'; None if not a number."""
    t = text.strip().replace(",", "").replace("$", "")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    s = format(d.normalize(), "f")
    return s


def _norm_text(text: str) -> str:
    return " ".join(text.split()).lower()


def parse_answer(kind: str, text: str, labels: Sequence[str] | None = None) -> str | None:
    """The answer in generated ``text`` for answer ``kind`` (see module docstring); None when there is none.

    gsm: the number after the first ``####``, else the last number, normalised (:func:`normalize_number`).
    label: the first word (lowercased, punctuation stripped) that is one of ``labels`` (any word when None).
    facts: the text lowercased with whitespace runs collapsed (compared by prefix in :func:`is_correct`).
    exact: the text with whitespace runs collapsed.
    """
    if kind not in KINDS:
        raise CaplocError(f"unknown answer kind {kind!r}; choose one of {', '.join(KINDS)}")
    if text is None:
        return None
    if kind == "gsm":
        m = _HASH_RE.search(text)
        if m:
            return normalize_number(m.group(1))
        nums = _NUM_RE.findall(text)
        return normalize_number(nums[-1]) if nums else None
    if kind == "label":
        allowed = None if labels is None else {_norm_text(l) for l in labels}
        for w in text.split():
            w = w.strip(".,;:!?\"'()[]{}").lower()
            if not w:
                continue
            if allowed is None or w in allowed:
                return w
        return None
    if kind == "facts":
        t = _norm_text(text)
        return t or None
    t = " ".join(text.split())
    return t or None


def gold_answer(kind: str, sample) -> str | None:
    """The reference answer of ``sample`` for ``kind`` (from ``meta`` when the loader put it there)."""
    meta = sample.meta or {}
    if kind == "gsm":
        ans = meta.get("answer")
        if ans is not None:
            v = normalize_number(str(ans))
            if v is not None:
                return v
        return parse_answer("gsm", sample.target)
    if kind == "facts":
        return _norm_text(str(meta.get("attribute") or sample.target))
    if kind == "label":
        return _norm_text(str(meta.get("label") or sample.target))
    return " ".join(sample.target.split())


def is_correct(kind: str, generated: str, sample, labels: Sequence[str] | None = None) -> bool:
    """Whether the generated continuation answers ``sample`` correctly under answer ``kind``."""
    gold = gold_answer(kind, sample)
    if gold is None or gold == "":
        return False
    pred = parse_answer(kind, generated, labels=labels)
    if pred is None:
        return False
    if kind == "gsm":
        return Decimal(pred) == Decimal(gold)
    if kind in ("facts", "exact"):
        if not pred.startswith(gold):
            return False
        # do not accept an attribute cut inside a word ("Rome" vs "Romeo")
        return len(pred) == len(gold) or not (pred[len(gold)].isalnum() and gold[-1].isalnum())
    return pred == gold  # label


def answer_kind(dataset) -> str:
    """The answer kind for ``dataset``: gsm for gsm_symbolic and numeric reasoning-gym tasks, facts for facts,
    label for classification data (few distinct one-word targets), exact otherwise."""
    src = dataset.source if isinstance(dataset.source, dict) else {}
    while src.get("loader") in ("subset", "split") and isinstance(src.get("parent_source"), dict):
        src = src["parent_source"]
    loader = src.get("loader")
    if loader == "gsm_symbolic" or dataset.name.startswith("gsm_symbolic"):
        return "gsm"
    if loader == "facts" or dataset.name.startswith("facts"):
        return "facts"
    samples = list(dataset)
    if not samples:
        return "exact"
    golds = [str((s.meta or {}).get("answer", s.target)) for s in samples]
    if loader == "reasoning_gym" and all(normalize_number(g) is not None for g in golds):
        return "gsm"
    if any("label" in (s.meta or {}) for s in samples):
        return "label"
    targets = [_norm_text(s.target) for s in samples]
    distinct = set(targets)
    if 2 <= len(distinct) <= max(2, min(20, len(samples) // 3)) and all(len(t.split()) == 1 for t in distinct):
        return "label"
    return "exact"


def dataset_labels(dataset) -> list[str]:
    """The distinct gold labels of a classification dataset (sorted)."""
    return sorted({gold_answer("label", s) for s in dataset})


# ---------------------------------------------------------------------------------------------------------------------
# teacher-forced NLL
# ---------------------------------------------------------------------------------------------------------------------
def _pad_id(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    if pid is None:
        raise CaplocError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before evaluating")
    return int(pid)


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise CaplocError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _bar(total: int, desc: str, progress: bool | None, unit: str = "sample"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=(not progress) if progress is not None else None)


@torch.no_grad()
def nll_sums(lm, encoded, *, batch_size: int = 8, progress: bool | None = None, desc: str = "nll") -> tuple[np.ndarray, np.ndarray]:
    """Summed target NLL [n] (float64) and target token counts [n] of already-encoded samples (``Encoded``)."""
    batch_size = _check_batch_size(batch_size)
    model, tok = lm.model, lm.tokenizer
    pad = _pad_id(tok)
    device = lm.site.input_device()
    n = len(encoded)
    sums = np.zeros(n, dtype=np.float64)
    counts = np.array([e.target_len for e in encoded], dtype=np.int64)
    order = sorted(range(n), key=lambda i: -len(encoded[i]))  # similar lengths share a batch: less padding
    keep_ok = _accepts(model, "logits_to_keep")
    with _bar(n, desc, progress) as bar:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            T = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                L = len(encoded[i])
                ids[r, :L] = torch.tensor(encoded[i].input_ids, dtype=torch.long)
                mask[r, :L] = 1
            # logits are only needed from the first position that predicts a target token (prompt_len - 1) on
            first = min(encoded[i].prompt_len for i in idx) - 1
            kw: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
            if keep_ok and first > 0:
                kw["logits_to_keep"] = T - first
            logits = model(**kw).logits  # [B, T or T-first, V]
            offset = T - logits.shape[1]
            for r, i in enumerate(idx):
                e = encoded[i]
                L, p = len(e), e.prompt_len
                lg = logits[r, p - 1 - offset:L - 1 - offset].float()  # [n_target, V]: position t predicts t + 1
                tgt = ids[r, p:L].to(lg.device)
                lp = torch.log_softmax(lg, dim=-1).gather(1, tgt[:, None])[:, 0]
                sums[i] = float(-lp.double().sum())
            del logits
            bar.update(len(idx))
    return sums, counts


def nll(lm, dataset, *, chat: bool = False, batch_size: int = 8, max_length: int | None = None,
        progress: bool | None = None) -> EvalResult:
    """Teacher-forced NLL per target token of the gold targets of ``dataset`` under the model's current hooks.

    Batched with right padding and an attention mask, without gradients; sample order is kept in the result.
    """
    from .data import encode_dataset

    if len(dataset) == 0:
        raise CaplocError(f"dataset {dataset.name!r} is empty: nothing to evaluate")
    max_len = max_length or getattr(lm.model.config, "max_position_embeddings", None)
    encoded = encode_dataset(lm.tokenizer, dataset, chat=chat, max_length=max_len)
    sums, counts = nll_sums(lm, encoded, batch_size=batch_size, progress=progress, desc=f"nll {dataset.name}")
    return EvalResult(
        dataset=dataset.name, fingerprint=dataset.fingerprint(), n=len(dataset),
        nll_per_token=float(sums.sum() / counts.sum()), nll_per_sample=sums / counts, n_tokens=counts,
    )


# ---------------------------------------------------------------------------------------------------------------------
# generation + accuracy
# ---------------------------------------------------------------------------------------------------------------------
_STOP_MARKERS = ("\nQuestion:", "\n\n\n")
_GSM_DONE = re.compile(r"####\s*\$?\s*(?:" + _NUM + r")\s*\D")


def _truncate(text: str) -> str:
    cut = len(text)
    for m in _STOP_MARKERS:
        j = text.find(m)
        if j >= 0:
            cut = min(cut, j)
    return text[:cut]


def _done_fn(kind: str) -> Callable[[str], bool]:
    if kind == "gsm":
        return lambda t: any(m in t for m in _STOP_MARKERS) or _GSM_DONE.search(t) is not None
    if kind in ("facts", "label"):
        return lambda t: "\n" in t.lstrip()
    return lambda t: any(m in t for m in _STOP_MARKERS)


def _stopping_criteria(tokenizer, prompt_width: int, done: Callable[[str], bool]):
    from transformers import StoppingCriteria, StoppingCriteriaList

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
    from transformers import GenerationConfig

    batch_size = _check_batch_size(batch_size)
    model, tok = lm.model, lm.tokenizer
    pad = _pad_id(tok)
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
    from .data.encode import encode_prompt

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
    gens = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, done=_done_fn(kind),
                    progress=progress, desc=f"generate {dataset.name}")
    gens = [_truncate(g) for g in gens]
    labels = dataset_labels(dataset) if kind == "label" else None
    correct = np.array([is_correct(kind, g, s, labels=labels) for g, s in zip(gens, dataset)], dtype=bool)
    return float(correct.mean()), correct, gens


def evaluate(lm, dataset, *, metrics: Sequence[str] = ("nll",), chat: bool = False, batch_size: int = 8,
             max_length: int | None = None, max_new_tokens: int | None = None, parser: str | None = None,
             progress: bool | None = None) -> EvalResult:
    """:func:`nll` and/or :func:`accuracy` of ``dataset`` under the model's current hooks."""
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise CaplocError(f"unknown metrics {bad or metrics!r}; choose from {', '.join(METRICS)}")
    if "nll" in metrics:
        res = nll(lm, dataset, chat=chat, batch_size=batch_size, max_length=max_length, progress=progress)
    else:
        res = EvalResult(dataset.name, dataset.fingerprint(), len(dataset), float("nan"), np.zeros(0))
    if "accuracy" in metrics:
        kind = parser or answer_kind(dataset)
        acc, correct, gens = accuracy(lm, dataset, chat=chat, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                      parser=kind, progress=progress)
        res.accuracy, res.correct, res.generations, res.kind = acc, correct, gens, kind
    return res


# ---------------------------------------------------------------------------------------------------------------------
# held-out data relative to a localization run
# ---------------------------------------------------------------------------------------------------------------------
def rebuild_dataset(source: dict | None, fingerprint: str | None = None):
    """Re-create a dataset from its recorded ``source`` (built-in loaders and files); None if that is impossible or
    the content no longer matches ``fingerprint``."""
    from .data import load_dataset

    if not isinstance(source, dict):
        return None
    loader = source.get("loader")
    kw = {"n": source.get("n"), "seed": source.get("seed", 0), "few_shot": source.get("few_shot", 0) or 0}
    try:
        if loader == "gsm_symbolic":
            ds = load_dataset("gsm_symbolic", target=source.get("target", "cot"), **kw)
        elif loader == "reasoning_gym":
            ds = load_dataset(f"rg:{source['task']}", **kw)
        elif loader == "facts":
            ds = load_dataset("facts", **kw)
        elif loader == "humaneval":
            ds = load_dataset("humaneval", **kw)
        elif source.get("path"):
            ds = load_dataset(str(source["path"]), **kw)
        else:
            return None
    except (CaplocError, KeyError, TypeError) as e:
        log.warning("cannot rebuild the localization dataset from %s: %s", source, e)
        return None
    if fingerprint and ds.fingerprint() != fingerprint:
        log.warning("rebuilt localization dataset has fingerprint %s, not the recorded %s", ds.fingerprint(), fingerprint)
        return None
    return ds


def spec_of(source: dict | None) -> str | None:
    """The ``load_dataset`` spec of a recorded dataset source, if it has one."""
    if not isinstance(source, dict):
        return None
    loader = source.get("loader")
    if loader in ("gsm_symbolic", "facts", "humaneval"):
        return loader
    if loader == "reasoning_gym" and source.get("task"):
        return f"rg:{source['task']}"
    if source.get("path"):
        return str(source["path"])
    return None


def heldout_splits(dataset, exclude=None, *, test_fraction: float = 0.5, seed: int = 0):
    """Two in-domain held-out sets of ``dataset``: ``(samples, templates)``.

    With ``exclude`` (the dataset the neurons were localized on): samples whose prompt is in ``exclude`` are dropped;
    ``samples`` = the rest whose group (template) occurs in ``exclude`` (new problems, seen templates);
    ``templates`` = those whose group does not (unseen templates). Without ``exclude`` the groups of ``dataset`` are
    split with ``data.train_test_split(by_group=True)`` and the test part is the held-out-template set, while the
    train part is returned as "samples" (its templates are NOT guaranteed to be the localization's).
    Either part may be None when empty.
    """
    from .data import Dataset, train_test_split

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


# ---------------------------------------------------------------------------------------------------------------------
# the `caploc eval` pipeline
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EvalRun:
    """Several datasets, each evaluated untouched and (optionally) under an intervention on a neuron set."""

    results: dict[str, dict[str, EvalResult]]  # dataset label -> condition -> result
    meta: dict = field(default_factory=dict)

    def rows(self) -> list[list]:
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
        from .results import atomic_write_json

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "eval.json", {
            "kind": "eval_run", "meta": self.meta,
            "results": {lab: {c: r.to_dict() for c, r in conds.items()} for lab, conds in self.results.items()},
        })
        self.write_report(out_dir)
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> "EvalRun":
        from .results import read_json

        d = read_json(Path(out_dir) / "eval.json")
        if d.get("kind") != "eval_run":
            raise CaplocError(f"{out_dir} is not a caploc eval directory (kind={d.get('kind')!r})")
        res = {lab: {c: EvalResult.from_dict(r) for c, r in conds.items()} for lab, conds in d["results"].items()}
        return cls(res, d.get("meta", {}))

    def write_report(self, out_dir: Path) -> None:
        from .results import atomic_write_json

        m = self.meta
        text = [f"Model {m.get('model_id')} ({m.get('model_fingerprint')}); metrics {', '.join(m.get('metrics', []))}; "
                f"chat={m.get('chat')}; data seed {m.get('data_seed')}."]
        if m.get("neurons"):
            text.append(f"Intervention: {m.get('mode')} (gain {m.get('gain')}) on {m.get('n_neurons')} neurons from "
                        f"{m.get('neurons')}. Effects here are NOT compared with random neurons: use `caploc intervene`.")
        claims = {}
        for lab, conds in self.results.items():
            if "untouched" in conds:
                claims[f"nll_per_token[{lab}]"] = {"value": _f(conds["untouched"].nll_per_token)}
        atomic_write_json(Path(out_dir) / "report.json", {
            "kind": "eval", "title": f"Evaluation of {m.get('model_id')}", "text": text,
            "tables": [{"title": "NLL per target token and accuracy", "rows": self.rows(),
                        "columns": ["dataset", "condition", "n", "target tokens", "NLL/token", "ΔNLL/token",
                                    "accuracy", "Δaccuracy"],
                        "note": "NLL/token is token-weighted over all gold target tokens (teacher forced); Δ is "
                                "intervened minus untouched on the same samples."}],
            "figures": [], "claims": claims,
        })


def run_eval(lm, datasets: dict[str, Any], *, neurons=None, mode: str = "erase", k: float = 2.0,
             metrics: Sequence[str] = ("nll",), out_dir: Path | str | None = None, meta: dict | None = None,
             **kw) -> EvalRun:
    """Evaluate every dataset untouched and, with ``neurons``, under the intervention (``mode`` erase | enhance
    with gain ``k``). ``kw`` goes to :func:`evaluate`. Writes ``eval.json`` + ``report.json`` to ``out_dir``."""
    from .intervene import gain_for, intervention

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
        run.save(out_dir)
    return run


__all__ = [
    "EvalResult", "EvalRun", "nll", "nll_sums", "accuracy", "evaluate", "generate", "parse_answer", "is_correct",
    "gold_answer", "answer_kind", "normalize_number", "heldout_splits", "rebuild_dataset", "spec_of", "run_eval", "KINDS",
]


# ---------------------------------------------------------------------------------------------------------------------
# dataset assembly shared by `caploc eval` and `caploc intervene`
# ---------------------------------------------------------------------------------------------------------------------
DEFAULT_OFF_TARGET = ("facts", "rg:letter_counting", "gsm_symbolic")


def default_off_target(on_spec: str, n: int = 2) -> list[str]:
    """Off-target datasets used when none are given: facts and rg:letter_counting (gsm_symbolic when one of them
    is the on-target data)."""
    key = on_spec.strip().lower().replace("-", "_")
    return [s for s in DEFAULT_OFF_TARGET if s.replace("-", "_") != key][:n]


def build_datasets(specs: Sequence[str], *, n: int = 32, seed: int = 1, neuron_meta: dict | None = None,
                   heldout: bool = True, target: str = "cot", n_off: int | None = None) -> list[tuple[str, Any, str]]:
    """[(label, Dataset, role)]: the first spec is on-target, the others off-target (``n_off`` samples each,
    default ``n``).

    With ``heldout`` and a neuron set whose localization data can be rebuilt from its recorded source (same loader as
    the first spec), the on-target spec becomes two datasets of up to ``n`` samples each, drawn from a pool of
    ``4 n`` samples (seed ``seed``) minus the localization prompts: ``<spec>:heldout-samples`` (templates/groups seen
    during localization) and ``<spec>:heldout-templates`` (unseen groups). When the localization data is of the same
    kind but cannot be rebuilt, the pool is split with ``train_test_split(by_group=True)`` (labels
    ``:split-groups-a`` / ``:split-groups-b``) and a warning says the samples may overlap the localization data. A
    first spec other than the localization data's is used as is.
    """
    from .data import load_dataset

    if not specs:
        raise CaplocError("no datasets given: pass --data at least once")
    out: list[tuple[str, Any, str]] = []
    first = specs[0]
    src = (neuron_meta or {}).get("dataset_source")
    loc_spec = spec_of(src)
    same = loc_spec is None or loc_spec.replace("-", "_") == first.strip().replace("-", "_")
    if heldout and neuron_meta is not None and same:
        loc = rebuild_dataset(src, neuron_meta.get("dataset_fingerprint")) if loc_spec is not None else None
        pool = load_dataset(first, n=4 * n, seed=seed, target=target)
        if loc is None and len(pool.unique_groups()) < 2:
            raise CaplocError(f"{first} has no groups to hold out and its localization data cannot be rebuilt; "
                              "pass --no-heldout")
        if loc is not None:
            a, b = heldout_splits(pool, exclude=loc)
            names = ("heldout-samples", "heldout-templates")
        else:
            log.warning("the neurons' localization data cannot be rebuilt from its recorded source (%s): splitting "
                        "%s by group instead; these samples may overlap the localization data", src, first)
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
            raise CaplocError(f"no held-out samples of {first}: load more (--n) or pass --no-heldout")
    else:
        out.append((first, load_dataset(first, n=n, seed=seed, target=target), "on"))
    for spec in specs[1:]:
        label = spec
        if any(lab == label for lab, _, _ in out):
            raise CaplocError(f"dataset {spec!r} is given twice; pass each --data once")
        out.append((label, load_dataset(spec, n=n_off or n, seed=seed, target=target), "off"))
    return out
