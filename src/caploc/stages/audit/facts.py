"""Facts of the individual-knowledge audit, the known-fact filter and the fact selection.

A :class:`Fact` has phrasings ``[prompt, *meta["paraphrases"]]`` (a Sample's prompt and paraphrases), one target (the
attribute, scored by its FIRST token, as KN and ROME do), an optional subject (needed for causal tracing) and a
*template key* per phrasing: the phrasing with the subject replaced by ``{}`` (used to pair phrasings of two facts
that share a wording). :func:`select_facts` keeps the first ``n_facts`` known facts in a seeded order.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from ...data import Sample, collate, encode, pad_id
from ...errors import CaplocError, DataError
from ...lmhead import position_logits
from .config import KNOWN_MODES, AuditConfig

log = logging.getLogger(__name__)


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


def prompt_batch(encoded, pad: int):
    """Right-padded prompts of encoded phrasings: ids [B, T], attention mask [B, T], last prompt position [B] and
    first target token [B] (padding is masked, so the pad id never changes a probability)."""
    ids, att = collate([e.input_ids[: e.prompt_len] for e in encoded], pad)
    last = torch.tensor([e.prompt_len - 1 for e in encoded], dtype=torch.long)
    tgt = torch.tensor([e.input_ids[e.prompt_len] for e in encoded], dtype=torch.long)
    return ids, att, last, tgt


def knowledge_probe(site, tokenizer, facts: Sequence[Fact], batch_size: int = 32) -> list[dict]:
    """Per fact: P(first target token) and its rank (0 = top-1) on every phrasing."""
    model = site.model
    dev = site.input_device()
    pad = pad_id(tokenizer, model.config)
    items = []
    for fi, f in enumerate(facts):
        for j, e in enumerate(encode_fact(tokenizer, f)):
            items.append((fi, j, e))
    probs = [[None] * len(f.phrasings) for f in facts]
    ranks = [[None] * len(f.phrasings) for f in facts]
    for b0 in range(0, len(items), batch_size):
        chunk = items[b0 : b0 + batch_size]
        ids, att, last, tgt = prompt_batch([e for *_, e in chunk], pad)
        with torch.no_grad():  # the LM head on the last prompt position of each row only (caploc.lmhead)
            lg = position_logits(model, last.to(dev), input_ids=ids.to(dev), attention_mask=att.to(dev),
                                 use_cache=False)
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


def select_facts(lm, dataset, cfg: AuditConfig, *, need_subject: bool = False,
                 batch: int = 64) -> tuple[list[Fact], list[dict], dict]:
    """Eligible facts in a seeded order, known-filtered, the first ``n_facts``. Returns (facts, probes, selection).
    ``need_subject``: keep only facts whose subject occurs in every phrasing (causal tracing corrupts it)."""
    facts, dropped = facts_from_dataset(dataset, min_phrasings=cfg.min_phrasings, max_phrasings=cfg.max_phrasings)
    if not facts:
        raise DataError(f"no fact of '{dataset.name}' has >= {cfg.min_phrasings} distinct phrasings")
    if need_subject:
        ok = [f for f in facts if f.subject and all(f.subject in p for p in f.phrasings)]
        no_subject = len(facts) - len(ok)
        if not ok:
            raise DataError("causal tracing needs a 'subject' that occurs in every phrasing; add a subject field "
                            "or drop tracing from --methods")
        facts = ok
    else:
        no_subject = 0
    order = np.random.default_rng(cfg.seed).permutation(len(facts))
    kept, probes, scanned, n_known = [], [], 0, 0
    for b0 in range(0, len(order), batch):
        chunk = [facts[i] for i in order[b0 : b0 + batch]]
        pr = knowledge_probe(lm.site, lm.tokenizer, chunk)
        for f, p in zip(chunk, pr):
            scanned += 1
            if is_known(p, cfg.known, cfg.known_threshold, cfg.known_topk, cfg.known_on):
                n_known += 1
                if len(kept) < cfg.n_facts:
                    kept.append(f)
                    probes.append(p)
            if len(kept) >= cfg.n_facts:
                break
        if len(kept) >= cfg.n_facts:
            break
    sel = {"n_in_dataset": len(dataset), "dropped_few_phrasings": dropped, "dropped_no_subject": no_subject,
           "n_eligible": len(facts), "n_scanned": scanned, "n_known_scanned": n_known,
           "known_rate_scanned": n_known / scanned if scanned else float("nan"), "n_kept": len(kept),
           "known_filter": {"mode": cfg.known, "threshold": cfg.known_threshold, "topk": cfg.known_topk,
                            "on": cfg.known_on}}
    if not kept:
        raise DataError(f"no fact passed the known filter ({cfg.known}); lower --known-threshold or use --known none")
    if len(kept) < cfg.n_facts:
        log.warning("only %d of the requested %d facts are eligible and known", len(kept), cfg.n_facts)
    return kept, probes, sel
