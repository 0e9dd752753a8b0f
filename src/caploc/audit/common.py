"""Facts, the known-fact filter, and the common fidelity metric of the individual-knowledge audit.

Facts
-----
A :class:`Fact` has phrasings ``[prompt, *meta["paraphrases"]]`` (a Sample's prompt and paraphrases), one target (the
attribute, scored by its FIRST token, as KN and ROME do), an optional subject (needed for causal tracing) and a
*template key* per phrasing: the phrasing with the subject replaced by ``{}`` (used to pair phrasings of two facts
that share a wording).

Common metric
-------------
For every method, each phrasing gets a *localized parameter set*; fidelity is the IoU of those sets between the
paraphrases of one fact, over all unordered pairs:

* KN and CNL: the neuron set (a neuron = its parameter slice, all neurons own the same number of parameters, so the
  parameter-weighted IoU equals the neuron IoU);
* causal tracing: the parameters of the MLP at the peak layer (ROME's edit site). All MLPs have the same size, so the
  IoU is 1 for the same layer and 0 otherwise (the same-layer rate);
* circuits: a parameter-weighted IoU ``sum_{u in A∩B} w_u / sum_{u in A∪B} w_u`` over the circuit's units (weights =
  parameter counts), :func:`weighted_iou`.

Every value is reported next to controls that share the method's set sizes:
``random`` = independent random sets with the same per-layer sizes (exact expectation for neurons, 1/L for a layer,
Monte Carlo for weighted units); ``same_template`` = the same phrasing template filled with ANOTHER fact's subject
(same relation): high values there mean the sets follow the wording rather than the fact; ``unrelated`` = phrasings
of a fact of another relation. Confidence intervals are percentile bootstraps over facts of the per-fact mean (pairs
within a fact are not independent).
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..data import Sample, encode
from ..errors import CaplocError, DataError
from ..stats import bootstrap_ci, expected_random_agreement, iou, per_layer_counts

log = logging.getLogger(__name__)

KNOWN_MODES = ("none", "prob", "topk")


# ---------------------------------------------------------------------------------------------------------------------
# facts
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Fact:
    """One fact and its phrasings (``phrasings[0]`` is the original prompt)."""

    id: str
    phrasings: list[str]
    target: str
    subject: str | None = None
    relation: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.phrasings[0]

    @property
    def paraphrases(self) -> list[str]:
        return self.phrasings[1:]

    def template_keys(self) -> list[str | None]:
        if not self.subject:
            return [None] * len(self.phrasings)
        return [p.replace(self.subject, "{}") if self.subject in p else None for p in self.phrasings]

    def samples(self) -> list[Sample]:
        return [Sample(prompt=p, target=self.target, group=self.relation or "", id=f"{self.id}#{j}",
                       meta={"subject": self.subject}) for j, p in enumerate(self.phrasings)]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Fact":
        return cls(**d)


def facts_from_dataset(ds, *, min_phrasings: int = 2, max_phrasings: int | None = None) -> tuple[list[Fact], int]:
    """Facts from a Dataset whose samples carry ``meta["paraphrases"]`` (built-in ``facts`` or a user file with a
    ``paraphrases`` field; ``subject`` from ``meta["subject"]`` if present). Facts with fewer than ``min_phrasings``
    distinct phrasings are dropped (returned count); ``max_phrasings`` keeps the first k phrasings."""
    if min_phrasings < 2:
        raise CaplocError("min_phrasings must be >= 2: fidelity compares the phrasings of one fact")
    if max_phrasings is not None and max_phrasings < min_phrasings:
        raise CaplocError(f"max_phrasings ({max_phrasings}) must be >= min_phrasings ({min_phrasings})")
    facts, dropped, with_para = [], 0, 0
    for s in ds:
        paras = s.meta.get("paraphrases")
        if paras is None:
            paras = []
        else:
            with_para += 1
        phr = []
        for p in [s.prompt, *paras]:
            if isinstance(p, str) and p.strip() and p not in phr:
                phr.append(p)
        if max_phrasings is not None:
            phr = phr[:max_phrasings]
        if len(phr) < min_phrasings:
            dropped += 1
            continue
        subj = s.meta.get("subject")
        facts.append(Fact(id=s.id, phrasings=phr, target=s.target, subject=str(subj) if subj else None,
                          relation=str(s.group) if s.group not in (None, "") else s.meta.get("relation_id"),
                          meta={k: v for k, v in s.meta.items() if k in ("attribute", "relation_id", "known_id")}))
    if with_para == 0:
        raise DataError(f"dataset '{getattr(ds, 'name', '?')}' has no 'paraphrases' field; the audit needs facts "
                        "with paraphrases (use --facts facts or a file with prompt, target, paraphrases[, subject])")
    return facts, dropped


def encode_fact(tokenizer, fact: Fact, chat: bool = False):
    """Encoded phrasings (prompt + target tokens) of a fact."""
    return [encode(tokenizer, s, chat=chat) for s in fact.samples()]


def knowledge_probe(site, tokenizer, facts: Sequence[Fact], batch_size: int = 32) -> list[dict]:
    """Per fact: P(first target token) and its rank (0 = top-1) on every phrasing."""
    from .kn import _batch

    model = site.model
    dev = site.input_device()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = []
    for fi, f in enumerate(facts):
        for j, e in enumerate(encode_fact(tokenizer, f)):
            items.append((fi, j, e))
    probs = [[None] * len(f.phrasings) for f in facts]
    ranks = [[None] * len(f.phrasings) for f in facts]
    for b0 in range(0, len(items), batch_size):
        chunk = items[b0 : b0 + batch_size]
        ids, att, last, tgt = _batch([e for *_, e in chunk], pad)
        with torch.no_grad():
            logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=False).logits
        lg = logits[torch.arange(len(chunk), device=logits.device), last.to(logits.device)].float()
        pr = lg.softmax(-1)
        pt = pr.gather(1, tgt.to(pr.device)[:, None])
        rk = (pr > pt).sum(1)
        for k, (fi, j, _) in enumerate(chunk):
            probs[fi][j] = float(pt[k, 0])
            ranks[fi][j] = int(rk[k])
    return [{"p": p, "rank": r} for p, r in zip(probs, ranks)]


def is_known(probe: dict, mode: str, threshold: float, topk: int, on: str = "prompt") -> bool:
    """Known = P(first target token) >= threshold (mode prob) or rank < topk (mode topk) on the original prompt
    (``on="prompt"``) or on every phrasing (``on="all"``)."""
    if mode == "none":
        return True
    idx = [0] if on == "prompt" else range(len(probe["p"]))
    if mode == "prob":
        return all(probe["p"][j] >= threshold for j in idx)
    if mode == "topk":
        return all(probe["rank"][j] < topk for j in idx)
    raise CaplocError(f"known filter {mode!r}: choose one of {', '.join(KNOWN_MODES)}")


# ---------------------------------------------------------------------------------------------------------------------
# pair metrics
# ---------------------------------------------------------------------------------------------------------------------
def pairs(n: int) -> list[tuple[int, int]]:
    """All unordered pairs i < j of n phrasings."""
    return list(itertools.combinations(range(n), 2))


def set_iou(a, b) -> float:
    """Neuron-set IoU (nan when both sets are empty)."""
    return iou(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))


def random_set_iou(a, b, n_layers: int, d_mlp: int) -> float:
    """Exact expected IoU of two independent random sets with the per-layer sizes of ``a`` and ``b``."""
    sa = per_layer_counts(np.asarray(a, dtype=np.int64), n_layers, d_mlp)
    sb = per_layer_counts(np.asarray(b, dtype=np.int64), n_layers, d_mlp)
    if sa.sum() + sb.sum() == 0:
        return float("nan")
    return float(expected_random_agreement(sa, sb, d_mlp)["iou"])


def layer_iou(la: int | None, lb: int | None) -> float:
    """Parameter IoU of two single-layer MLP sets: 1 if the same layer, 0 otherwise (nan if either is missing)."""
    if la is None or lb is None:
        return float("nan")
    return 1.0 if int(la) == int(lb) else 0.0


def weighted_iou(a: dict, b: dict) -> float:
    """Parameter-weighted IoU of two unit sets {unit: parameter count}: sum over A∩B / sum over A∪B (nan if the
    union weighs 0). A unit's weight is taken from whichever set holds it (they must agree)."""
    keys = set(a) | set(b)
    w = {k: float(a.get(k, b.get(k, 0.0))) for k in keys}
    union = sum(w.values())
    if union <= 0:
        return float("nan")
    return sum(w[k] for k in set(a) & set(b)) / union


def random_weighted_iou(a: dict, b: dict, universe: dict, n_draws: int = 200, seed: int = 0) -> float:
    """Monte Carlo expected weighted IoU of two random unit sets with the same NUMBER of units as ``a`` and ``b``,
    drawn uniformly from ``universe`` {unit: weight}."""
    keys = list(universe)
    if not keys or (not a and not b):
        return float("nan")
    w = np.array([float(universe[k]) for k in keys])
    rng = np.random.default_rng(seed)
    na, nb = min(len(a), len(keys)), min(len(b), len(keys))
    vals = []
    for _ in range(n_draws):
        ia = rng.choice(len(keys), size=na, replace=False)
        ib = rng.choice(len(keys), size=nb, replace=False)
        inter = np.intersect1d(ia, ib)
        union = np.union1d(ia, ib)
        den = w[union].sum()
        vals.append(w[inter].sum() / den if den > 0 else np.nan)
    return float(np.nanmean(vals)) if vals else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# control partners
# ---------------------------------------------------------------------------------------------------------------------
def control_partners(facts: Sequence[Fact], seed: int = 0) -> list[dict]:
    """For every fact: a ``same_template`` partner (another fact of the same relation with different subject and at
    least one shared template key; with the matched phrasing pairs) and an ``unrelated`` partner (a fact of another
    relation, or of unknown relation with a different subject), chosen with a seeded RNG."""
    rng = np.random.default_rng(seed)
    keys = [f.template_keys() for f in facts]
    out = []
    for i, f in enumerate(facts):
        same, other = [], []
        for j, g in enumerate(facts):
            if j == i or (f.subject and g.subject == f.subject):
                continue
            if f.relation is not None and g.relation == f.relation:
                m = [(a, b) for a, ka in enumerate(keys[i]) for b, kb in enumerate(keys[j]) if ka is not None and ka == kb]
                if m:
                    same.append((j, m))
            elif f.relation is None or g.relation != f.relation:
                other.append(j)
        rec: dict = {"same_template": None, "unrelated": None}
        if same:
            j, m = same[int(rng.integers(len(same)))]
            rec["same_template"] = {"fact": j, "pairs": m}
        if other:
            j = other[int(rng.integers(len(other)))]
            rec["unrelated"] = {"fact": j, "pairs": [(a, b) for a in range(len(f.phrasings))
                                                     for b in range(len(facts[j].phrasings))]}
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------------------------------
def mean_ci(per_fact: Sequence[float], seed: int = 0, n_boot: int = 2000) -> dict:
    """Mean over facts with a percentile-bootstrap 95% CI (nan entries dropped)."""
    v = np.asarray([x for x in per_fact if x is not None], dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": float("nan"), "ci": [float("nan"), float("nan")], "n": 0}
    est, lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
    return {"mean": est, "ci": [lo, hi], "n": int(v.size)}


def _nanmean(xs) -> float:
    v = np.asarray([x for x in xs], dtype=np.float64)
    v = v[~np.isnan(v)] if v.size else v
    return float(v.mean()) if v.size else float("nan")


def fidelity_summary(locs: Sequence[Sequence], metric: Callable, partners: Sequence[dict],
                     random_pair: Callable | None = None, seed: int = 0) -> dict:
    """Common-metric fidelity of one method.

    locs[f][j]: the localization of phrasing j of fact f (None = missing); metric(a, b) -> float (nan = undefined);
    random_pair(a, b) -> the metric's expectation for random localizations with the sizes of a and b.
    Returns {"same_fact", "same_template", "unrelated", "random"} each {"mean", "ci", "n"} (per-fact means
    bootstrapped over facts), plus "n_pairs" and "per_fact" (the same-fact per-fact means).
    """
    same, rand, per_fact, n_pairs = [], [], [], 0
    for f, L in enumerate(locs):
        vals, rvals = [], []
        for a, b in pairs(len(L)):
            if L[a] is None or L[b] is None:
                continue
            v = metric(L[a], L[b])
            if not math.isnan(v):
                vals.append(v)
                n_pairs += 1
            if random_pair is not None:
                rvals.append(random_pair(L[a], L[b]))
        m = _nanmean(vals) if vals else float("nan")
        per_fact.append(m)
        same.append(m)
        rand.append(_nanmean(rvals) if rvals else float("nan"))
    ctrl = {"same_template": [], "unrelated": []}
    for f, pr in enumerate(partners):
        for kind in ctrl:
            p = pr.get(kind)
            if not p:
                continue
            g = p["fact"]
            vals = []
            for a, b in p["pairs"]:
                A, B = locs[f][a], locs[g][b]
                if A is None or B is None:
                    continue
                v = metric(A, B)
                if not math.isnan(v):
                    vals.append(v)
            if vals:
                ctrl[kind].append(_nanmean(vals))
    out = {"same_fact": mean_ci(same, seed), "same_template": mean_ci(ctrl["same_template"], seed),
           "unrelated": mean_ci(ctrl["unrelated"], seed),
           "random": mean_ci(rand, seed) if random_pair is not None else None,
           "n_pairs": n_pairs, "per_fact": per_fact}
    return out
