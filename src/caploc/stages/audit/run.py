"""The individual-knowledge audit (Huang et al., ICLR 2025, §3): can existing methods localize ONE fact?

For each fact (a prompt, its paraphrases, one target) every method localizes something per phrasing:

* ``kn`` — knowledge neurons (:mod:`caploc.audit.kn`): per-phrasing coarse neuron sets, refined across phrasings;
* ``tracing`` — ROME causal tracing (:mod:`caploc.audit.tracing`): per-phrasing peak sites / the peak MLP layer;
* ``cnl`` — caploc's own per-sample rule applied to single phrasings: ``grad_x_act`` (or KN-style IG) attribution of
  the target's log-probability at all positions, sigma rule (Attr > mean + sigma * sd), then the same refinement;
* ``circuits`` — knowledge circuits, delegated to ``caploc.audit.circuits.audit_circuits`` when that module exists.

**Fidelity** = agreement of the localizations between paraphrases of the same fact, as one common metric (IoU of the
localized parameter sets, :mod:`caploc.audit.common`) next to random, same-template/other-fact and unrelated-fact
controls. **Reliability** = the method's own manipulation does what it promises: KN/CNL suppress (x0) / enhance (xk)
the refined neurons and the relative change of P(target) on every phrasing, next to layer-matched random neuron sets
(``n_random`` seeds); tracing: *cross-paraphrase restoration recovery* — restoring the clean MLP output (last subject
token) at the layer traced on phrasing i, on paraphrase j, recovers what share of the best single-layer restoration
on j, next to the mean share over all layers (a random layer). We restore rather than ROME-edit.

Every fact is written to ``out/facts/`` as soon as it is finished (JSON + safetensors); rerunning the same command
resumes, and a larger ``n_facts`` with the same seed reuses the finished facts (the fact order is a seeded scan).
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .. import __version__
from ..attribution.engine import AttributionConfig, Attributor
from ..errors import CaplocError, DataError
from ..localize import select_sigma
from ..results import atomic_save_tensors, atomic_write_json, config_key, read_json
from ..stats import per_layer_counts, random_layer_matched_set
from .common import (
    KNOWN_MODES, Fact, control_partners, encode_fact, facts_from_dataset, fidelity_summary, is_known,
    knowledge_probe, layer_iou, mean_ci, random_set_iou, random_weighted_iou, set_iou, weighted_iou,
)
from .kn import KNConfig, _batch, flat_to_layers, kn_select, refine, relative_change
from .tracing import (
    PhrasingTrace, Tracer, TracingConfig, abs_layer_diff_pmf, subject_positions, uniform_abs_layer_diff,
)

log = logging.getLogger(__name__)

METHODS = ("kn", "tracing", "cnl", "circuits")
CNL_METHODS = ("grad_x_act", "ig")
FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class AuditConfig:
    """Settings of ``caploc audit`` (validated on construction)."""

    methods: tuple[str, ...] = ("kn", "tracing", "cnl")
    n_facts: int = 50
    seed: int = 0
    min_phrasings: int = 2
    max_phrasings: int | None = None  # keep the first k phrasings of each fact (cost control)
    known: str = "prob"  # none | prob | topk
    known_threshold: float = 0.05  # prob mode: P(first target token) >= this
    known_topk: int = 10  # topk mode: target token among the top k
    known_on: str = "prompt"  # prompt (the original prompt) | all (every phrasing)
    kn: KNConfig = field(default_factory=KNConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    cnl_method: str = "grad_x_act"  # grad_x_act | ig
    cnl_sigma: float = 6.0
    cnl_steps: int = 20  # IG steps when cnl_method == "ig"
    n_random: int = 5  # random-set seeds per fact (reliability baselines)
    fidelity_criterion: float = 0.5  # a method "localizes facts" if its paraphrase IoU CI lower bound >= this ...
    save_scores: bool = True  # KN scores per phrasing (float16) in facts/*.safetensors
    chat: bool = False
    circuits: dict = field(default_factory=dict)  # overrides for caploc.audit.circuits' config (e.g. top_k)

    def __post_init__(self):
        self.methods = tuple(m.strip() for m in self.methods if m.strip())
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise CaplocError(f"unknown audit method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
        if not isinstance(self.n_facts, int) or self.n_facts < 1:
            raise CaplocError(f"n_facts must be a positive integer, got {self.n_facts!r}")
        if self.known not in KNOWN_MODES:
            raise CaplocError(f"known filter {self.known!r}: choose one of {', '.join(KNOWN_MODES)}")
        if self.known_on not in ("prompt", "all"):
            raise CaplocError(f"known_on {self.known_on!r}: choose prompt or all")
        if self.cnl_method not in CNL_METHODS:
            raise CaplocError(f"cnl method {self.cnl_method!r}: choose one of {', '.join(CNL_METHODS)}")
        if self.n_random < 1:
            raise CaplocError(f"n_random must be >= 1, got {self.n_random}")
        if not 0 < self.fidelity_criterion <= 1:
            raise CaplocError(f"fidelity_criterion must be in (0, 1], got {self.fidelity_criterion}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["methods"] = list(self.methods)
        d["kn"] = self.kn.to_dict()
        d["tracing"] = self.tracing.to_dict()
        return d

    def fact_key(self) -> str:
        """Key of everything that changes a fact's stored record (resume check)."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("seed", "n_random", "chat", "save_scores")}
        if "kn" in self.methods:
            keep["kn"] = d["kn"]
        if "tracing" in self.methods:
            keep["tracing"] = {k: v for k, v in d["tracing"].items() if k not in ("reuse", "max_rows", "band_rows")}
        if "cnl" in self.methods:
            keep["cnl"] = [self.cnl_method, self.cnl_sigma, self.cnl_steps if self.cnl_method == "ig" else None,
                           d["kn"]["p"], d["kn"]["share_rule"], d["kn"]["enhance"], d["kn"]["positions"]]
        keep["methods"] = sorted(m for m in self.methods if m != "circuits")
        return config_key(keep)


# ---------------------------------------------------------------------------------------------------------------------
# fact selection
# ---------------------------------------------------------------------------------------------------------------------
def select_facts(lm, dataset, cfg: AuditConfig, batch: int = 64) -> tuple[list[Fact], list[dict], dict]:
    """Eligible facts in a seeded order, known-filtered, the first ``n_facts``. Returns (facts, probes, selection)."""
    facts, dropped = facts_from_dataset(dataset, min_phrasings=cfg.min_phrasings, max_phrasings=cfg.max_phrasings)
    if not facts:
        raise DataError(f"no fact of '{dataset.name}' has >= {cfg.min_phrasings} distinct phrasings")
    if "tracing" in cfg.methods:
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


# ---------------------------------------------------------------------------------------------------------------------
# manipulation with a different neuron set per row
# ---------------------------------------------------------------------------------------------------------------------
def row_set_probs(site, encoded_rows, row_sets, factor, positions: str, pad_id: int,
                  batch_size: int = 64) -> np.ndarray:
    """P(first target token) of each row (an encoded phrasing) with that row's neuron set (flat indices; None or
    empty = untouched) multiplied by ``factor`` at the last prompt position (``"last"``) or at every position.

    With ``"last"`` the untouched prefix of each distinct prompt runs once (KV cache) and the rows run only the last
    prompt token: the same numbers as full rows, since earlier positions never see the change."""
    from ..hooks import neuron_hooks

    model, d = site.model, site.d_mlp
    dev = site.input_device()
    # ``factor``: one multiplier for every row, or one per row (suppress and enhance rows share forward passes)
    factors = np.broadcast_to(np.asarray(factor, dtype=np.float64), (len(encoded_rows),))

    def gains_for(sets, B, row_ids):
        gains: dict[int, torch.Tensor] = {}
        for r, st in enumerate(sets):
            if st is None or len(st) == 0:
                continue
            for l, ix in flat_to_layers(np.asarray(st), d).items():
                g = gains.setdefault(l, torch.ones(B, d))
                g[r, torch.as_tensor(ix)] = float(factors[row_ids[r]])
        return gains

    if positions == "last":
        from transformers import DynamicCache

        from ..blocks import rows_cache

        out = np.zeros(len(encoded_rows))
        by_prompt: dict[tuple, list[int]] = {}
        for r, e in enumerate(encoded_rows):
            by_prompt.setdefault(tuple(e.input_ids[: e.prompt_len]), []).append(r)
        for prompt, rows in by_prompt.items():
            P = len(prompt)
            tgt = encoded_rows[rows[0]].input_ids[P]
            cache = None
            if P > 1:
                cache = DynamicCache(config=model.config)
                with torch.no_grad():
                    model(input_ids=torch.tensor([prompt[:-1]], device=dev), cache=cache, use_cache=True,
                          logits_to_keep=1)
            for b0 in range(0, len(rows), batch_size):
                rr = rows[b0 : b0 + batch_size]
                B = len(rr)
                gains = gains_for([row_sets[r] for r in rr], B, rr)

                def make(g):
                    def fn(_l, x):  # x [B, 1, d]: the last prompt token only
                        return x * g.to(x.device, x.dtype)[:, None, :]
                    return fn

                kw = {"use_cache": False}
                if cache is not None:
                    kw = {"cache": rows_cache(cache, [B] * site.n_layers), "use_cache": True,
                          "position_ids": torch.tensor([[P - 1]], device=dev)}
                with torch.no_grad(), neuron_hooks(site, {l: make(g) for l, g in gains.items()}):
                    logits = model(input_ids=torch.full((B, 1), prompt[-1], device=dev), logits_to_keep=1, **kw).logits
                out[rr] = logits[:, -1].float().softmax(-1)[:, tgt].cpu().numpy()
        return out.astype(np.float64)

    out = []
    for b0 in range(0, len(encoded_rows), batch_size):
        enc = encoded_rows[b0 : b0 + batch_size]
        ids, att, last, tgt = _batch(enc, pad_id)
        gains = gains_for(row_sets[b0 : b0 + batch_size], len(enc), list(range(b0, b0 + len(enc))))

        def make_all(g):
            def fn(_l, x):  # x [B, T, d]
                return x * g.to(x.device, x.dtype)[:, None, :]
            return fn

        with torch.no_grad(), neuron_hooks(site, {l: make_all(g) for l, g in gains.items()}):
            logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=False).logits
        lg = logits[torch.arange(len(enc), device=logits.device), last.to(logits.device)].float()
        out.append(lg.softmax(-1).gather(1, tgt.to(lg.device)[:, None])[:, 0].cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def manipulation(site, encs, own_sets, refined, cfg: AuditConfig, seed_base: list[int], off_encs=None,
                 pad_id: int = 0) -> dict:
    """Suppress (x0) / enhance (x cfg.kn.enhance) for one fact. Keys (lists; P = P(first target token)):

    p_clean [k]; refined_{suppress,enhance} [k]: the fact's refined set on each phrasing;
    rand_{suppress,enhance} [n_random][k]: layer-matched random sets (disjoint from the refined set) on each phrasing;
    own_{suppress,enhance} [k][k]: set of phrasing i applied to phrasing j (diagonal = own);
    own_rand_{suppress,enhance} [n_random][k]: phrasing i's own-set random control on phrasing i;
    off_* : the refined set on an unrelated fact's phrasings (specificity).
    """
    L, d = site.n_layers, site.d_mlp
    k = len(encs)
    rows, sets, tags = [], [], []

    def add(enc_list, set_list, tag):
        rows.extend(enc_list)
        sets.extend(set_list)
        tags.append((tag, len(enc_list)))

    refined = np.asarray(refined, dtype=np.int64)
    add(encs, [None] * k, "p_clean")
    if len(refined):
        add(encs, [refined] * k, "refined")
    for i in range(k):
        if len(own_sets[i]):
            add(encs, [own_sets[i]] * k, f"own{i}")
    for s in range(cfg.n_random):
        rng = np.random.default_rng([*seed_base, s])
        if len(refined):
            r = random_layer_matched_set(per_layer_counts(refined, L, d), d, rng, exclude=refined)
            add(encs, [r] * k, f"rand{s}")
        own_r = [random_layer_matched_set(per_layer_counts(np.asarray(o, np.int64), L, d), d, rng, exclude=o)
                 if len(o) else None for o in own_sets]
        add(encs, own_r, f"ownrand{s}")
    if off_encs:
        add(off_encs, [None] * len(off_encs), "off_clean")
        if len(refined):
            add(off_encs, [refined] * len(off_encs), "off_refined")
    out: dict = {}
    # one batched pass: every row suppressed (x0), plus the rows with a set enhanced (untouched rows do not depend
    # on the factor and are computed once)
    keep = [i for i, s_ in enumerate(sets) if s_ is not None and len(s_)]
    both = row_set_probs(site, rows + [rows[i] for i in keep], sets + [sets[i] for i in keep],
                         [0.0] * len(rows) + [cfg.kn.enhance] * len(keep), cfg.kn.positions, pad_id)
    p_enh = np.full(len(rows), np.nan)
    p_enh[keep] = both[len(rows):]
    for p, name in ((both[: len(rows)], "suppress"), (p_enh, "enhance")):
        pos = 0
        for tag, n in tags:
            v = p[pos : pos + n].tolist()
            pos += n
            if tag in ("p_clean", "off_clean"):
                if name == "suppress":
                    out[tag] = v  # factor-independent (not recomputed for enhance)
            elif tag == "refined":
                out[f"refined_{name}"] = v
            elif tag == "off_refined":
                out[f"off_{name}"] = v
            elif tag.startswith("ownrand"):
                out.setdefault(f"own_rand_{name}", []).append(v)
            elif tag.startswith("own"):
                out.setdefault(f"own_{name}", [None] * k)[int(tag[3:])] = v
            elif tag.startswith("rand"):
                out.setdefault(f"rand_{name}", []).append(v)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# one fact
# ---------------------------------------------------------------------------------------------------------------------
def _seed(cfg: AuditConfig, fact_index: int, *more) -> list[int]:
    return [int(cfg.seed), int(fact_index), *[int(x) for x in more]]


def _seed_int(parts: list[int]) -> int:
    return int(np.random.SeedSequence(parts).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def audit_fact(lm, fact: Fact, index: int, cfg: AuditConfig, off_fact: Fact | None, tools: dict) -> tuple[dict, dict]:
    """All per-phrasing measurements of one fact -> (JSON record, tensors)."""
    site, tok = lm.site, lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    encs = encode_fact(tok, fact, chat=cfg.chat)
    off_encs = encode_fact(tok, off_fact, chat=cfg.chat) if off_fact is not None else None
    rec: dict = {"index": index, "fact": fact.to_json(), "n_phrasings": len(encs), "timing": {}}
    tensors: dict[str, torch.Tensor] = {}
    L, d = site.n_layers, site.d_mlp

    if "kn" in cfg.methods:
        t0 = time.time()
        att = tools["kn_attributor"]
        sets, fs, gaps = [], [], []
        for j, e in enumerate(encs):
            sc = att.score(e.input_ids, e.prompt_len)
            sets.append(kn_select(sc.scores, cfg.kn.t))
            fs.append(sc.f)
            gaps.append(float(sc.gap.abs().nanmean()) if sc.gap is not None else None)  # mean |gap| per layer
            if cfg.save_scores:
                tensors[f"kn.scores.{j}"] = sc.scores.half()
        refined = refine(sets, cfg.kn.p, cfg.kn.share_rule)
        rec["timing"]["kn_attribution"] = time.time() - t0
        t0 = time.time()
        man = manipulation(site, encs, sets, refined, cfg, _seed(cfg, index, 1), off_encs, pad)
        rec["kn"] = {"sets": [s.tolist() for s in sets], "refined": refined.tolist(), "f": fs,
                     "completeness_gap": gaps, **man}
        rec["timing"]["kn_manipulation"] = time.time() - t0

    if "cnl" in cfg.methods:
        t0 = time.time()
        att = tools["cnl_attributor"]
        res = att.score_batch([(e.input_ids, e.prompt_len) for e in encs])
        sets = []
        for r in res:
            flat = r.scores.reshape(1, -1)
            sets.append(np.nonzero(select_sigma(flat, cfg.cnl_sigma)[0].numpy())[0].astype(np.int64))
        refined = refine(sets, cfg.kn.p, cfg.kn.share_rule)
        man = manipulation(site, encs, sets, refined, cfg, _seed(cfg, index, 2), off_encs, pad)
        rec["cnl"] = {"sets": [s.tolist() for s in sets], "refined": refined.tolist(), **man}
        rec["timing"]["cnl"] = time.time() - t0

    if "tracing" in cfg.methods:
        t0 = time.time()
        tracer: Tracer = tools["tracer"]
        traces = []
        for j, (e, phr) in enumerate(zip(encs, fact.phrasings)):
            prompt_ids = e.input_ids[: e.prompt_len]
            sp = subject_positions(tok, phr if not cfg.chat else _chat_text(tok, phr), prompt_ids, fact.subject)
            tr = tracer.trace(prompt_ids, e.input_ids[e.prompt_len], sp, seed=_seed_int(_seed(cfg, index, 3, j)))
            traces.append(tr.to_json())
            tensors[f"trace.p_restored.{j}"] = tr.p_restored
        rec["tracing"] = {"traces": traces}
        rec["timing"]["tracing"] = time.time() - t0
    return rec, tensors


def _chat_text(tok, prompt):
    from ..data.encode import chat_prompt_text

    return chat_prompt_text(tok, prompt)


# ---------------------------------------------------------------------------------------------------------------------
# circuits (another module)
# ---------------------------------------------------------------------------------------------------------------------
def run_circuits(lm, facts: list[Fact], cfg: AuditConfig, out_dir: Path) -> dict:
    """Call ``caploc.audit.circuits.audit_circuits(lm, facts, cfg)`` if that module exists.

    Consumed from its result (duck-typed): ``param_sets`` — per fact, per phrasing, a mapping {unit: parameter count}
    (the circuit's localized parameters) — and optionally ``universe`` {unit: parameter count} (all candidate units,
    for the random baseline), ``summary``/``to_dict()`` (stored verbatim) and ``save(dir)``."""
    try:
        mod = importlib.import_module("caploc.audit.circuits")
    except ModuleNotFoundError as e:
        if e.name in ("caploc.audit.circuits",):
            return {"status": "absent", "note": "caploc.audit.circuits is not installed in this tree; circuits skipped"}
        raise
    fn = getattr(mod, "audit_circuits", None)
    if fn is None:
        return {"status": "absent", "note": "caploc.audit.circuits has no audit_circuits(); circuits skipped"}
    ccfg = None
    for name in ("CircuitConfig", "CircuitsConfig", "CircuitAuditConfig"):
        cls = getattr(mod, name, None)
        if cls is not None:
            want = {"seed": cfg.seed, "chat": cfg.chat, "max_phrasings": cfg.max_phrasings,
                    "min_phrasings": cfg.min_phrasings, **cfg.circuits}
            params = inspect.signature(cls).parameters
            unknown = [k for k in cfg.circuits if k not in params]
            if unknown:
                raise CaplocError(f"unknown circuits option(s) {', '.join(unknown)}; {name} takes "
                                  f"{', '.join(params)}")
            ccfg = cls(**{k: v for k, v in want.items() if k in params and v is not None})
            break
    t0 = time.time()
    res = fn(lm, facts, ccfg)
    out: dict = {"status": "ran", "seconds": time.time() - t0}
    if hasattr(res, "save"):
        try:
            res.save(out_dir / "circuits")
            out["saved"] = "circuits/"
        except Exception as e:  # their result's save failing must not lose the audit
            out["save_error"] = str(e).splitlines()[0][:200]
    for attr in ("summary", "to_dict"):
        v = getattr(res, attr, None)
        if v is not None:
            try:
                out["their_summary"] = json.loads(json.dumps(v() if callable(v) else v, default=str))
            except (TypeError, ValueError):
                pass
            break
    ps = getattr(res, "param_sets", None)
    if ps is None:
        out["status"] = "no_param_sets"
        out["note"] = "the circuits result has no param_sets (per fact, per phrasing {unit: parameter count})"
        return out
    out["param_sets"] = [[{str(k): float(v) for k, v in dict(s).items()} if s is not None else None for s in f]
                         for f in ps]
    uni = getattr(res, "universe", None)
    out["universe"] = {str(k): float(v) for k, v in dict(uni).items()} if uni else None
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class AuditResult:
    """Everything the audit measured, its summary, and the report. ``save``/``load`` a directory."""

    config: dict
    model: dict
    selection: dict
    facts: list[Fact]
    probes: list[dict]
    records: list[dict]
    traces: list[list[PhrasingTrace]] | None
    circuits: dict
    summary: dict = field(default_factory=dict)
    out_dir: Path | None = None
    complete: bool = True  # False: loaded from an unfinished run (only its finished facts)

    # ---- save / load ------------------------------------------------------------------------------------------------
    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        fdir = out_dir / "facts"
        for rec in self.records:
            p = fdir / f"fact_{rec['index']:05d}.json"
            if not p.exists():
                atomic_write_json(p, rec)
        if self.traces is not None:
            for rec, trs in zip(self.records, self.traces):
                t = fdir / f"fact_{rec['index']:05d}.safetensors"
                if not t.exists() and trs:
                    atomic_save_tensors(t, {f"trace.p_restored.{j}": tr.p_restored for j, tr in enumerate(trs)})
        circ = {k: v for k, v in self.circuits.items() if k not in ("param_sets", "universe")}
        if "param_sets" in self.circuits:
            atomic_write_json(out_dir / "circuits_sets.json", {"param_sets": self.circuits["param_sets"],
                                                              "universe": self.circuits.get("universe")})
        self._write_meta(out_dir, self.records[0].get("config_key") if self.records else None)
        self.out_dir = out_dir
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str, allow_partial: bool = False) -> "AuditResult":
        """Load a finished audit; ``allow_partial=True`` also loads a running/interrupted one (its finished facts, in
        order, with ``complete=False``; the summary is then recomputed by :func:`summarize`)."""
        out_dir = Path(out_dir)
        meta = read_json(out_dir / "audit.json")
        if meta.get("kind") != "audit":
            raise CaplocError(f"{out_dir}/audit.json is not a caploc audit result (kind={meta.get('kind')!r})")
        complete = bool(meta.get("complete", True))
        if not complete and not allow_partial:
            raise CaplocError(f"{out_dir} holds an unfinished audit; rerun the same command to finish it, or load it "
                              "with allow_partial=True (CLI: --report-only)")
        facts = [Fact.from_json(f) for f in meta["facts"]]
        key = meta.get("fact_key")
        records, traces = [], []
        for i in range(len(facts)):
            p = out_dir / "facts" / f"fact_{i:05d}.json"
            rec = read_json(p) if p.exists() else None
            if rec is not None and key is not None and rec.get("config_key") != key:
                rec = None  # a stale record of another configuration
            if rec is None:
                if not allow_partial:
                    raise CaplocError(f"{p} is missing: the audit directory is incomplete; rerun the same audit command")
                complete = False
                break
            records.append(rec)
            traces.append(_load_traces(out_dir, rec))
        if not records:
            raise CaplocError(f"{out_dir} has no finished fact yet")
        n = len(records)
        circ = dict(meta.get("circuits", {}))
        cs = out_dir / "circuits_sets.json"
        if cs.exists():
            circ.update(read_json(cs))
        res = cls(meta["config"], meta["model"], meta["selection"], facts[:n], meta["probes"][:n], records,
                  traces if any(t is not None for t in traces) else None, circ, meta.get("summary", {}), out_dir,
                  complete)
        if not complete:
            res.summary = summarize(res)
        return res

    def _write_meta(self, out_dir: Path, fact_key: str) -> None:
        circ = {k: v for k, v in self.circuits.items() if k not in ("param_sets", "universe")}
        atomic_write_json(Path(out_dir) / "audit.json", {
            "kind": "audit", "format": FORMAT, "caploc_version": __version__, "config": self.config,
            "model": self.model, "selection": self.selection, "facts": [f.to_json() for f in self.facts],
            "probes": self.probes, "circuits": _json_clean(circ), "summary": _json_clean(self.summary),
            "complete": self.complete, "fact_key": fact_key,
        })

    # ---- reporting --------------------------------------------------------------------------------------------------
    def report(self) -> dict:
        """The report.json dict (tables, figure entries, claims); see docs/DEVELOPING.md."""
        return build_report(self)

    def write_report(self, out_dir: Path | str | None = None) -> Path:
        """Write report.json and its PNG figures into ``out_dir`` (default: where the result was saved)."""
        return write_report(self, Path(out_dir or self.out_dir))


def _load_traces(out_dir: Path, rec: dict) -> list[PhrasingTrace] | None:
    if "tracing" not in rec:
        return None
    t = load_file(str(out_dir / "facts" / f"fact_{rec['index']:05d}.safetensors"))
    return [PhrasingTrace.from_json(d, t[f"trace.p_restored.{j}"]) for j, d in enumerate(rec["tracing"]["traces"])]


# ---------------------------------------------------------------------------------------------------------------------
# summary (pure: records -> numbers)
# ---------------------------------------------------------------------------------------------------------------------
def _per_fact_rel(p_new_lists, p_clean_lists) -> list[float]:
    out = []
    for pn, pc in zip(p_new_lists, p_clean_lists):
        if pn is None:
            out.append(float("nan"))
            continue
        rc = relative_change(pn, pc)
        out.append(float(np.nanmean(rc)) if np.isfinite(rc).any() else float("nan"))
    return out


def _per_fact_ratio(p_new_lists, p_clean_lists) -> list[float]:
    """Per fact: median over phrasings of P_new / P_clean."""
    out = []
    for pn, pc in zip(p_new_lists, p_clean_lists):
        if pn is None:
            out.append(float("nan"))
            continue
        pc = np.asarray(pc, float)
        r = np.asarray(pn, float)[pc > 0] / pc[pc > 0]
        out.append(float(np.median(r)) if r.size else float("nan"))
    return out


def neuron_reliability(recs: list[dict], seed: int) -> dict:
    """Suppress / enhance summary for a neuron method's records (``rec["kn"]`` or ``rec["cnl"]``)."""
    out: dict = {}
    pcs = [r["p_clean"] for r in recs]
    out["n_facts"] = len(recs)
    out["n_empty_refined"] = sum(1 for r in recs if not r["refined"])
    for name in ("suppress", "enhance"):
        eff = _per_fact_rel([r.get(f"refined_{name}") for r in recs], pcs)
        rnd = []
        per_seed: list[list[float]] = []
        for r in recs:
            rs = r.get(f"rand_{name}")
            if not rs:
                rnd.append(float("nan"))
                continue
            vals = [float(np.nanmean(relative_change(x, r["p_clean"]))) for x in rs]
            rnd.append(float(np.nanmean(vals)))
            for s, v in enumerate(vals):
                while len(per_seed) <= s:
                    per_seed.append([])
                per_seed[s].append(v)
        # own set on own phrasing (diagonal) and on the other phrasings (off-diagonal), own-set random controls
        own_diag, own_off, own_rand = [], [], []
        for r in recs:
            M = r.get(f"own_{name}")
            k = len(r["p_clean"])
            dvals, ovals = [], []
            if M:
                for i in range(k):
                    if M[i] is None:
                        continue
                    rc = relative_change(M[i], r["p_clean"])
                    dvals.append(rc[i])
                    ovals += [rc[j] for j in range(k) if j != i]
            own_diag.append(float(np.nanmean(dvals)) if dvals else float("nan"))
            own_off.append(float(np.nanmean(ovals)) if ovals else float("nan"))
            R = r.get(f"own_rand_{name}") or []
            rv = []
            for row in R:
                for i in range(k):
                    if M and M[i] is not None:
                        rv.append(relative_change([row[i]], [r["p_clean"][i]])[0])
            own_rand.append(float(np.nanmean(rv)) if rv else float("nan"))
        off = _per_fact_rel([r.get(f"off_{name}") for r in recs], [r.get("off_clean") for r in recs])
        out[name] = {
            "refined": mean_ci(eff, seed), "refined_median_ratio": mean_ci(
                _per_fact_ratio([r.get(f"refined_{name}") for r in recs], pcs), seed),
            "random": mean_ci(rnd, seed), "random_per_seed": [float(np.nanmean(v)) for v in per_seed],
            "own_on_own": mean_ci(own_diag, seed), "own_on_other_phrasings": mean_ci(own_off, seed),
            "own_random": mean_ci(own_rand, seed), "off_target": mean_ci(off, seed),
            "per_fact_refined": eff, "per_fact_random": rnd,
        }
    return out


def neuron_fidelity(recs, partners, n_layers, d_mlp, seed) -> dict:
    locs = [[np.asarray(s, dtype=np.int64) for s in r["sets"]] for r in recs]
    fid = fidelity_summary(locs, set_iou, partners, lambda a, b: random_set_iou(a, b, n_layers, d_mlp), seed)
    sizes = [len(s) for r in recs for s in r["sets"]]
    fid["set_size"] = {"mean": float(np.mean(sizes)) if sizes else float("nan"),
                       "median": float(np.median(sizes)) if sizes else float("nan"),
                       "n_empty": int(sum(1 for s in sizes if s == 0))}
    ref = [len(r["refined"]) for r in recs]
    fid["refined_size"] = {"mean": float(np.mean(ref)) if ref else float("nan"),
                           "n_empty": int(sum(1 for s in ref if s == 0))}
    return fid


def tracing_summary(traces: list[list[PhrasingTrace]], partners, n_layers: int, seed: int) -> dict:
    L = n_layers
    out: dict = {}
    pc = [t.p_clean for trs in traces for t in trs]
    pk = [t.p_corrupt for trs in traces for t in trs]
    drop = [t.p_clean - t.p_corrupt for trs in traces for t in trs]
    out["p_clean_mean"] = float(np.mean(pc)) if pc else float("nan")
    out["p_corrupt_mean"] = float(np.mean(pk)) if pk else float("nan")
    out["n_phrasings"] = len(pc)
    out["n_corruption_ineffective"] = int(sum(1 for x, c in zip(drop, pc) if x <= 0.1 * c))
    out["fallbacks"] = int(sum(1 for trs in traces for t in trs if t.fallback))
    # peak layers per kind at the ROME positions: mlp / hidden at the last subject token, attn at the last token
    sites = {"mlp": ("mlp", "last_subject"), "hidden": ("hidden", "last_subject"), "attn": ("attn", "last")}
    kinds = traces[0][0].kinds if traces and traces[0] else []
    for name, (kind, cls) in sites.items():
        if kind not in kinds:
            continue
        locs = [[t.peak_layer(kind, cls) for t in trs] for trs in traces]
        fid = fidelity_summary(locs, layer_iou, partners, lambda a, b: 1.0 / L, seed)
        # |delta layer|
        d_same = []
        for ls in locs:
            v = [abs(ls[a] - ls[b]) for a in range(len(ls)) for b in range(a + 1, len(ls))
                 if ls[a] is not None and ls[b] is not None]
            d_same.append(float(np.mean(v)) if v else float("nan"))
        hist = np.zeros(L, dtype=np.int64)
        dhist = np.zeros(L, dtype=np.int64)
        for ls in locs:
            for x in ls:
                if x is not None:
                    hist[x] += 1
            for a in range(len(ls)):
                for b in range(a + 1, len(ls)):
                    if ls[a] is not None and ls[b] is not None:
                        dhist[abs(ls[a] - ls[b])] += 1
        p = hist / max(hist.sum(), 1)
        fid["abs_layer_diff"] = mean_ci(d_same, seed)
        fid["abs_layer_diff_uniform"] = uniform_abs_layer_diff(L)
        fid["abs_layer_diff_hist"] = dhist.tolist()
        fid["abs_layer_diff_uniform_pmf"] = abs_layer_diff_pmf(L).tolist()
        fid["peak_hist"] = hist.tolist()
        fid["same_layer_chance_marginal"] = float((p * p).sum())  # two independent draws from the pooled histogram
        out[name] = fid
    # overall peak site (kind, layer, class) across everything traced
    locs = [[(lambda pk: (pk["kind"], pk["layer"], pk["class"]) if pk else None)(t.peak()) for t in trs]
            for trs in traces]
    out["overall_peak"] = fidelity_summary(locs, lambda a, b: 1.0 if a == b else 0.0, partners, None, seed)
    from collections import Counter

    out["overall_peak"]["counts"] = dict(Counter(f"{x[0]}/{x[2]}" for ls in locs for x in ls if x).most_common())
    # reliability: cross-paraphrase restoration recovery (MLP at the last subject token)
    if "mlp" in kinds:
        rec_own, rec_rand, norm_other, pct = [], [], [], []
        for trs in traces:
            curves = [t.layer_curve("mlp", "last_subject") for t in trs]
            peaks = [t.peak_layer("mlp", "last_subject") for t in trs]
            share, share_r, nrm, rank = [], [], [], []
            for j, t in enumerate(trs):
                c = curves[j]
                if c is None or not float(torch.nan_to_num(c, nan=-1).max()) > 0:
                    continue
                best = float(c.max())
                for i in range(len(trs)):
                    if i == j or peaks[i] is None:
                        continue
                    v = float(c[peaks[i]])
                    share.append(v / best)
                    share_r.append(float(c.mean()) / best)
                    dd = t.p_clean - t.p_corrupt
                    if dd > 0:
                        nrm.append(v / dd)
                    rank.append(float((c < v).float().mean()))
            rec_own.append(float(np.mean(share)) if share else float("nan"))
            rec_rand.append(float(np.mean(share_r)) if share_r else float("nan"))
            norm_other.append(float(np.mean(nrm)) if nrm else float("nan"))
            pct.append(float(np.mean(rank)) if rank else float("nan"))
        out["restoration_transfer"] = {
            "share_of_best": mean_ci(rec_own, seed), "random_layer_share": mean_ci(rec_rand, seed),
            "normalized_recovery": mean_ci(norm_other, seed), "layer_percentile": mean_ci(pct, seed),
        }
        # mean normalised IE over layers per kind and token class (ROME-style picture)
        ie_mean = {}
        for kind in kinds:
            for cls in ("last_subject", "last", "other"):
                acc = []
                for trs in traces:
                    for t in trs:
                        c = t.layer_curve(kind, cls)
                        dd = t.p_clean - t.p_corrupt
                        if c is not None and dd > 0:
                            acc.append((c / dd).numpy())
                if acc:
                    ie_mean[f"{kind}/{cls}"] = np.nanmean(np.stack(acc), 0).tolist()
        out["mean_normalized_ie"] = ie_mean
    return out


def circuits_summary(circ: dict, partners, seed: int, facts: list[Fact] | None = None) -> dict | None:
    ps = circ.get("param_sets")
    if not ps:
        return None
    if facts is not None:  # one entry per phrasing of each fact (None where the circuits module skipped it)
        ps = [(list(ps[i]) if i < len(ps) and ps[i] is not None else []) for i in range(len(facts))]
        ps = [row[: len(f.phrasings)] + [None] * (len(f.phrasings) - len(row)) for row, f in zip(ps, facts)]
    uni = circ.get("universe")
    rand = (lambda a, b: random_weighted_iou(a, b, uni, 200, seed)) if uni else None
    return fidelity_summary(ps, weighted_iou, partners, rand, seed)


def summarize(result: AuditResult) -> dict:
    cfg = result.config
    seed = int(cfg["seed"])
    L, d = int(result.model["n_layers"]), int(result.model["d_mlp"])
    partners = control_partners(result.facts, seed)
    recs = result.records
    s: dict = {"n_facts": len(recs), "n_phrasings": int(sum(r["n_phrasings"] for r in recs)),
               "phrasings_per_fact": float(np.mean([r["n_phrasings"] for r in recs])) if recs else float("nan"),
               "n_same_template_partners": sum(1 for p in partners if p["same_template"]),
               "n_unrelated_partners": sum(1 for p in partners if p["unrelated"])}
    probes = result.probes
    s["p_target_prompt_mean"] = float(np.mean([p["p"][0] for p in probes])) if probes else float("nan")
    s["p_target_paraphrases_mean"] = float(np.mean([x for p in probes for x in p["p"][1:]])) if probes else float("nan")
    s["top1_paraphrases_rate"] = float(np.mean([x == 0 for p in probes for x in p["rank"][1:]])) if probes else float("nan")
    for m in ("kn", "cnl"):
        mr = [r[m] for r in recs if m in r]
        if mr and len(mr) == len(recs):
            s[m] = {"fidelity": neuron_fidelity(mr, partners, L, d, seed), "reliability": neuron_reliability(mr, seed)}
            if m == "kn":
                gaps = [g for r in mr for g, f in zip(r["completeness_gap"], r["f"]) if g is not None]
                s[m]["completeness_gap_mean_abs"] = float(np.mean(np.abs(gaps))) if gaps else None
    if result.traces is not None:
        s["tracing"] = tracing_summary(result.traces, partners, L, seed)
    c = circuits_summary(result.circuits, partners, seed, result.facts)
    if c is not None:
        s["circuits"] = {"fidelity": c}
    s["timing_s"] = {k: float(sum(r["timing"].get(k, 0.0) for r in recs))
                     for k in ("kn_attribution", "kn_manipulation", "cnl", "tracing")}
    return s


# ---------------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------------
def run_audit(lm, dataset, cfg: AuditConfig, out_dir: Path | str, *, overwrite: bool = False,
              progress: bool | None = None) -> AuditResult:
    """Run the audit of ``dataset``'s facts on ``lm`` into ``out_dir`` (resumable) and write its report."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir / "facts", ignore_errors=True)
    t_start = time.time()
    facts, probes, selection = select_facts(lm, dataset, cfg)
    log.info("selected %d facts (%d of %d scanned facts known)", len(facts), selection["n_known_scanned"],
             selection["n_scanned"])
    site = lm.site
    model_info = {k: lm.info.get(k) for k in ("model_id", "model_type", "fingerprint", "dtype")}
    model_info.update(n_layers=site.n_layers, d_mlp=site.d_mlp, params_per_neuron=site.params_per_neuron(),
                      neuron_site=site.describe()["neuron_site"])
    key = cfg.fact_key()
    tools: dict = {}
    if "kn" in cfg.methods:
        tools["kn_attributor"] = Attributor(site, cfg.kn.attribution())
    if "cnl" in cfg.methods:
        acfg = AttributionConfig(method=cfg.cnl_method, steps=cfg.cnl_steps, objective="logprob", positions="all",
                                 layers=cfg.kn.layers, memory_mb=cfg.kn.memory_mb)
        tools["cnl_attributor"] = Attributor(site, acfg)
    if "tracing" in cfg.methods:
        tools["tracer"] = Tracer(site, cfg.tracing)
    partners = control_partners(facts, cfg.seed)
    fdir = out_dir / "facts"
    AuditResult(config=cfg.to_dict(), model=model_info, selection=selection, facts=facts, probes=probes, records=[],
                traces=None, circuits={}, complete=False)._write_meta(out_dir, key)
    records, traces = [], []
    reused = 0
    with tqdm(total=len(facts), desc="audit", unit="fact", disable=progress is False if progress is not None else None,
              leave=False) as bar:
        for i, f in enumerate(facts):
            jp, tp = fdir / f"fact_{i:05d}.json", fdir / f"fact_{i:05d}.safetensors"
            rec = None
            if jp.exists():
                try:
                    old = json.loads(jp.read_text())
                    if old.get("config_key") == key and old.get("fact", {}).get("id") == f.id and (
                            tp.exists() or not old.get("has_tensors")):
                        rec = old
                        reused += 1
                except (OSError, ValueError):
                    rec = None
            if rec is None:
                off = partners[i]["unrelated"]
                off_fact = facts[off["fact"]] if off else (facts[(i + 1) % len(facts)] if len(facts) > 1 else None)
                rec, tensors = audit_fact(lm, f, i, cfg, off_fact, tools)
                rec["config_key"] = key
                rec["has_tensors"] = bool(tensors)
                if tensors:
                    atomic_save_tensors(tp, tensors)
                elif tp.exists():
                    tp.unlink()
                atomic_write_json(jp, rec)
                log.info("fact %d/%d (%s, %d phrasings) done: %s", i + 1, len(facts), f.id, len(f.phrasings),
                         ", ".join(f"{k} {v:.1f}s" for k, v in rec["timing"].items()))
            records.append(rec)
            traces.append(_load_traces(out_dir, rec) if "tracing" in rec else None)
            bar.update(1)
    # remove records beyond n_facts from an earlier, larger run so load() sees exactly this audit
    for p in fdir.glob("fact_*.json"):
        try:
            if int(p.stem.split("_")[1]) >= len(facts):
                p.unlink()
                p.with_suffix(".safetensors").unlink(missing_ok=True)
        except ValueError:
            pass
    circuits = run_circuits(lm, facts, cfg, out_dir) if "circuits" in cfg.methods else {"status": "not requested"}
    result = AuditResult(config=cfg.to_dict(), model=model_info, selection=selection, facts=facts, probes=probes,
                         records=records, traces=traces if "tracing" in cfg.methods else None, circuits=circuits,
                         out_dir=out_dir)
    result.summary = summarize(result)
    result.summary["reused_facts"] = reused
    result.summary["seconds_this_run"] = round(time.time() - t_start, 1)
    if "tracing" in cfg.methods:
        result.summary["tracing_noise_sd"] = tools["tracer"].noise_sd
    result.save(out_dir)
    result.write_report(out_dir)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# report.json and figures
# ---------------------------------------------------------------------------------------------------------------------
def _fmt(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}" if abs(x) >= 10 ** (-nd) or x == 0 else f"{x:.2e}"


def _ci(m: dict | None, nd=3) -> str:
    if not m or m.get("n", 0) == 0:
        return "n/a"
    lo, hi = m["ci"]
    return f"{_fmt(m['mean'], nd)} [{_fmt(lo, nd)}, {_fmt(hi, nd)}]"


def _fidelity_rows(s: dict, L: int) -> list[tuple[str, str, dict]]:
    rows = []
    if "kn" in s:
        rows.append(("KN", "per-phrasing knowledge neurons (Attr > t*max)", s["kn"]["fidelity"]))
    if "cnl" in s:
        rows.append(("CNL per phrasing", "per-phrasing sigma-rule neurons", s["cnl"]["fidelity"]))
    tr = s.get("tracing", {})
    if "mlp" in tr:
        rows.append(("causal tracing", "MLP of the peak layer (last subject token)", tr["mlp"]))
    if "circuits" in s:
        rows.append(("knowledge circuits", "circuit parameters (parameter-weighted)", s["circuits"]["fidelity"]))
    return rows


def localizable_claim(s: dict, criterion: float) -> dict:
    """facts_localizable: true iff some method's paraphrase IoU CI lower bound is >= ``criterion`` AND above the upper
    CI bound of its same-template other-fact control (the unrelated-fact control when there is none)."""
    text = (f"a method localizes individual facts if the 95% CI lower bound of its paraphrase IoU (common metric) is "
            f">= {criterion} and exceeds the upper CI bound of the same-template/other-fact control "
            f"(unrelated-fact control if no same-template pairs)")
    best, value, any_data = None, False, False
    for name, _unit, fid in _fidelity_rows(s, 0):
        sf = fid["same_fact"]
        if sf["n"] == 0:
            continue
        any_data = True
        ctrl = fid["same_template"] if fid["same_template"]["n"] else fid["unrelated"]
        ok = sf["ci"][0] >= criterion and (ctrl["n"] == 0 or sf["ci"][0] > ctrl["ci"][1])
        value = value or ok
        if best is None or sf["mean"] > best["iou"]:
            best = {"method": name, "iou": sf["mean"], "ci": sf["ci"]}
    return {"value": bool(value) if any_data else None, "criterion": text, "best_method": best}


def build_report(res: AuditResult) -> dict:
    s = res.summary or summarize(res)
    cfg = res.config
    L = int(res.model["n_layers"])
    sel = res.selection
    kn_cfg = cfg["kn"]
    tables, claims, text = [], {}, []
    text.append(
        f"Individual-knowledge audit (Huang et al. 2025 §3) of {res.model.get('model_id')} on {s['n_facts']} facts "
        f"({s['n_phrasings']} phrasings, {s['phrasings_per_fact']:.1f} per fact), seed {cfg['seed']}. "
        f"Known filter: {sel['known_filter']['mode']} (threshold {sel['known_filter']['threshold']}, "
        f"top-k {sel['known_filter']['topk']}, on {sel['known_filter']['on']}): {sel['n_known_scanned']} of "
        f"{sel['n_scanned']} scanned facts known; {sel['n_kept']} kept. Mean P(target) on the original prompt "
        f"{_fmt(s['p_target_prompt_mean'])}, on the paraphrases {_fmt(s['p_target_paraphrases_mean'])} "
        f"(target top-1 on {_fmt(100 * s['top1_paraphrases_rate'], 1)}% of paraphrases).")
    text.append(
        "Fidelity = IoU of the localized parameter sets between paraphrases of the same fact (all pairs; per-fact mean; "
        "95% percentile bootstrap over facts). Controls: 'same template, other fact' pairs a phrasing with the SAME "
        "wording filled with another subject of the same relation (if the sets follow the wording rather than the "
        "fact, this is as high as the paraphrase IoU); 'unrelated fact' = a fact of another relation; 'random' = "
        "independent random sets of the same per-layer sizes (exact expectation; 1/L for a layer).")
    if "kn" in s:
        text.append(
            f"KN: IG with m={kn_cfg['steps']} steps ({kn_cfg['alphas']} points) of P(first target token) at the last "
            f"prompt position; coarse neurons Attr > {kn_cfg['t']}*max; refined = neurons in a share of phrasings "
            f"{'>' if kn_cfg['share_rule'] == 'gt' else '>='} p={kn_cfg['p']}; suppress = x0, enhance = "
            f"x{kn_cfg['enhance']} at {kn_cfg['positions']} position(s); effect = mean relative change of P(target) "
            f"over the fact's phrasings; random = layer-matched random sets disjoint from the set, {cfg['n_random']} "
            "seeds per fact.")
    if "tracing" in s:
        tc = cfg["tracing"]
        text.append(
            f"Causal tracing: subject embeddings + Gaussian noise (sd = {tc['noise_mult']} x sd of the embedding "
            f"entries = {_fmt(s.get('tracing_noise_sd'), 4)}), {tc['n_noise']} noise samples, restoring one "
            f"state (kinds {', '.join(tc['kinds'])}; window {tc['window']}) at the subject tokens and the last token. "
            "Peak MLP layer = argmax over layers of the MLP indirect effect at the last subject token (ROME's site). "
            "Reliability = cross-paraphrase restoration recovery: restoring the MLP at the layer traced on phrasing i, "
            "on paraphrase j, as a share of j's best single-layer MLP restoration, vs the mean share over all layers "
            "(a random layer). This is restoration, not a ROME edit.")

    # fidelity table
    rows = []
    for name, unit, fid in _fidelity_rows(s, L):
        sf = fid["same_fact"]
        rows.append([name, unit, _ci(sf), _ci(fid["same_template"]), _ci(fid["unrelated"]),
                     _fmt(fid["random"]["mean"]) if fid.get("random") else "n/a", f"{sf['n']} ({fid['n_pairs']})"])
    tables.append({"title": "Fidelity: IoU of localized parameter sets between paraphrases of one fact",
                   "columns": ["method", "localized parameters", "paraphrase IoU [95% CI]",
                               "same template, other fact", "unrelated fact", "random (same sizes)",
                               "facts (pairs)"], "rows": rows,
                   "note": "tracing: IoU of single-MLP parameter sets = 1 for the same layer, else 0 (all MLPs have "
                           "equal size), i.e. the same-peak-layer rate; random = 1/L."})
    # reliability table
    rows = []
    for m, label in (("kn", "KN"), ("cnl", "CNL per phrasing")):
        if m not in s:
            continue
        rel = s[m]["reliability"]
        for name in ("suppress", "enhance"):
            r = rel[name]
            fac = "x0" if name == "suppress" else f"x{kn_cfg['enhance']}"
            rows.append([label, f"{name} ({fac}) refined set, on the fact's phrasings", _ci(r["refined"]),
                         _ci(r["random"]), ", ".join(_fmt(v) for v in r["random_per_seed"]),
                         r["refined"]["n"], f"median P ratio {_fmt(r['refined_median_ratio']['mean'])}; "
                                            f"{rel['n_empty_refined']} facts with an empty refined set"])
            rows.append([label, f"{name} a phrasing's own set, on that phrasing", _ci(r["own_on_own"]),
                         _ci(r["own_random"]), "", r["own_on_own"]["n"], ""])
            rows.append([label, f"{name} a phrasing's own set, on its paraphrases", _ci(r["own_on_other_phrasings"]),
                         "", "", r["own_on_other_phrasings"]["n"], "transfer across paraphrases"])
            rows.append([label, f"{name} refined set, on an unrelated fact", _ci(r["off_target"]), "", "",
                         r["off_target"]["n"], "specificity (0 = no effect)"])
    tr = s.get("tracing", {})
    if "restoration_transfer" in tr:
        rt = tr["restoration_transfer"]
        rows.append(["causal tracing", "restore MLP at the layer traced on a paraphrase (share of best layer)",
                     _ci(rt["share_of_best"]), _ci(rt["random_layer_share"]), "", rt["share_of_best"]["n"],
                     f"normalized recovery {_ci(rt['normalized_recovery'])}; layer percentile "
                     f"{_ci(rt['layer_percentile'])}"])
    their = (res.circuits.get("their_summary") or {}).get("reliability") if isinstance(res.circuits, dict) else None
    if isinstance(their, dict) and "circuit" in their:
        c_, r_ = their["circuit"], their.get("random", {})
        rows.append(["knowledge circuits", "circuit-only run (all other heads/MLPs mean-ablated): P_circuit / P_full",
                     f"{_fmt(c_.get('mean_ratio'))} [{_fmt(c_['ci'][0])}, {_fmt(c_['ci'][1])}]",
                     f"{_fmt(r_.get('mean_ratio'))} [{_fmt(r_.get('ci', [None, None])[0])}, "
                     f"{_fmt(r_.get('ci', [None, None])[1])}]" if r_ else "n/a", "", their.get("n_phrasings"),
                     "from caploc.audit.circuits (per phrasing, random = node sets of the same size)"])
    tables.append({"title": "Reliability: does the method's own manipulation change the fact as promised?",
                   "columns": ["method", "manipulation", "effect [95% CI]", "random control [95% CI]",
                               "random, per seed", "facts", "note"], "rows": rows,
                   "note": "KN/CNL effect = mean over phrasings of (P_after - P_before) / P_before, averaged over "
                           "facts; random = layer-matched random neurons (same count per layer)."})
    if tr:
        rows = []
        for kind in ("mlp", "hidden", "attn"):
            if kind not in tr:
                continue
            f = tr[kind]
            rows.append([kind, _ci(f["same_fact"]), _fmt(1.0 / L), _fmt(f["same_layer_chance_marginal"]),
                         _ci(f["same_template"]), _ci(f["abs_layer_diff"], 2), _fmt(f["abs_layer_diff_uniform"], 2)])
        op = tr["overall_peak"]
        rows.append(["overall peak (kind, layer, token class)", _ci(op["same_fact"]), "", "",
                     _ci(op["same_template"]), "", ""])
        tables.append({"title": "Causal tracing: same peak layer across paraphrases",
                       "columns": ["state", "same peak layer [95% CI]", "chance (uniform layer)",
                                   "chance (pooled peak histogram)", "same template, other fact",
                                   "mean |delta layer|", "uniform |delta layer|"], "rows": rows,
                       "note": f"mlp/hidden at the last subject token, attn at the last token. P(target) clean "
                               f"{_fmt(tr['p_clean_mean'])}, corrupted {_fmt(tr['p_corrupt_mean'])}; "
                               f"{tr['n_corruption_ineffective']} of {tr['n_phrasings']} phrasings lose < 10% of "
                               f"P under corruption. Overall peak classes: {op.get('counts')}."})
    rows = []
    for m in ("kn", "cnl"):
        if m in s:
            f = s[m]["fidelity"]
            rows.append([m, _fmt(f["set_size"]["mean"], 1), _fmt(f["set_size"]["median"], 1), f["set_size"]["n_empty"],
                         _fmt(f["refined_size"]["mean"], 1), f["refined_size"]["n_empty"]])
    if rows:
        tables.append({"title": "Neuron set sizes", "columns": ["method", "per-phrasing mean", "median",
                                                                 "empty phrasing sets", "refined mean",
                                                                 "empty refined sets"], "rows": rows})
    tables.append({"title": "Fact selection", "columns": list(k for k in sel if k != "known_filter"),
                   "rows": [[sel[k] if not isinstance(sel[k], float) else round(sel[k], 4)
                             for k in sel if k != "known_filter"]]})
    if res.circuits.get("status") not in (None, "ran"):
        text.append(f"Circuits: {res.circuits.get('status')} — {res.circuits.get('note', '')}")

    # claims
    claims["facts_localizable"] = localizable_claim(s, float(cfg["fidelity_criterion"]))
    if "kn" in s:
        f = s["kn"]["fidelity"]
        claims["kn_paraphrase_iou"] = {"value": f["same_fact"]["mean"], "ci": f["same_fact"]["ci"],
                                       "chance": f["random"]["mean"], "same_template": f["same_template"]["mean"],
                                       "unrelated": f["unrelated"]["mean"], "n_facts": f["same_fact"]["n"]}
        for name in ("suppress", "enhance"):
            r = s["kn"]["reliability"][name]
            claims[f"kn_{name}_rel_change"] = {"value": r["refined"]["mean"], "ci": r["refined"]["ci"],
                                               "chance": r["random"]["mean"]}
    if "cnl" in s:
        f = s["cnl"]["fidelity"]
        claims["cnl_paraphrase_iou"] = {"value": f["same_fact"]["mean"], "ci": f["same_fact"]["ci"],
                                        "chance": f["random"]["mean"]}
    if "mlp" in tr:
        f = tr["mlp"]
        claims["tracing_same_layer"] = {"value": f["same_fact"]["mean"], "ci": f["same_fact"]["ci"],
                                        "chance": 1.0 / L, "chance_marginal": f["same_layer_chance_marginal"],
                                        "same_template": f["same_template"]["mean"]}
    if "restoration_transfer" in tr:
        rt = tr["restoration_transfer"]
        claims["tracing_restoration_transfer"] = {"value": rt["share_of_best"]["mean"],
                                                  "ci": rt["share_of_best"]["ci"],
                                                  "chance": rt["random_layer_share"]["mean"]}
    if "circuits" in s:
        f = s["circuits"]["fidelity"]
        claims["circuits_paraphrase_iou"] = {"value": f["same_fact"]["mean"], "ci": f["same_fact"]["ci"],
                                             "chance": f["random"]["mean"] if f.get("random") else None}
    fl = claims["facts_localizable"]
    text.append(f"Claim facts_localizable = {fl['value']} (criterion: {fl['criterion']}).")
    figures = [
        {"title": "Knowledge neurons of one fact, per phrasing", "file": "fig_kn_layers.png",
         "caption": "Per-layer counts of the KN neurons found on each phrasing of the same fact (small multiples)."},
        {"title": "Peak layers of causal tracing", "file": "fig_tracing_peaks.png",
         "caption": "Histogram over all facts and phrasings of the peak layer per state kind."},
        {"title": "Peak-layer distance between paraphrases", "file": "fig_tracing_layer_diff.png",
         "caption": "Distribution of |delta peak MLP layer| over paraphrase pairs of the same fact vs two independent "
                    "uniform layers."},
        {"title": "Paraphrase IoU by method", "file": "fig_iou.png",
         "caption": "Common-metric IoU between paraphrases vs the same-template/other-fact, unrelated-fact and "
                    "random controls (95% CI)."},
        {"title": "Mean normalized indirect effect", "file": "fig_tracing_ie.png",
         "caption": "Causal-tracing indirect effect over layers, by state kind and token class, averaged over phrasings."},
    ]
    return {"kind": "audit", "title": f"Individual-knowledge audit of {res.model.get('model_id')}", "text": text,
            "tables": tables, "figures": figures, "claims": claims}


def _figures(res: AuditResult, rep: dict, out_dir: Path) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res.summary
    L = int(res.model["n_layers"])
    d = int(res.model["d_mlp"])
    made = []
    # 1. KN per-layer distribution of one fact's neurons per phrasing
    if "kn" in s:
        recs = res.records
        idx = max(range(len(recs)), key=lambda i: (sum(1 for x in recs[i]["kn"]["sets"] if x), recs[i]["n_phrasings"]))
        sets = recs[idx]["kn"]["sets"]
        phr = res.facts[idx].phrasings
        n = len(sets)
        fig, axes = plt.subplots(n, 1, figsize=(7, 1.3 * n + 0.6), sharex=True, squeeze=False)
        for j, (ax, st) in enumerate(zip(axes[:, 0], sets)):
            c = per_layer_counts(np.asarray(st, np.int64), L, d)
            ax.bar(range(L), c, color="C0" if j == 0 else "C1")
            ax.set_ylabel("n", fontsize=7)
            ax.set_title(f"{phr[j]!r} → {res.facts[idx].target!r}: {len(st)} neurons", fontsize=7, loc="left")
            ax.tick_params(labelsize=6)
        axes[-1, 0].set_xlabel("layer")
        fig.tight_layout()
        fig.savefig(out_dir / "fig_kn_layers.png", dpi=110)
        plt.close(fig)
        made.append("fig_kn_layers.png")
    tr = s.get("tracing", {})
    kinds = [k for k in ("mlp", "hidden", "attn") if k in tr]
    if kinds:
        fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3), squeeze=False)
        for ax, k in zip(axes[0], kinds):
            ax.bar(range(L), tr[k]["peak_hist"], color={"mlp": "C2", "hidden": "C0", "attn": "C3"}[k])
            ax.set_title(f"{k} peak layer ({'last token' if k == 'attn' else 'last subject token'})", fontsize=8)
            ax.set_xlabel("layer")
        axes[0, 0].set_ylabel("phrasings")
        fig.tight_layout()
        fig.savefig(out_dir / "fig_tracing_peaks.png", dpi=110)
        plt.close(fig)
        made.append("fig_tracing_peaks.png")
        if "mlp" in tr and sum(tr["mlp"]["abs_layer_diff_hist"]):
            h = np.asarray(tr["mlp"]["abs_layer_diff_hist"], float)
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.bar(range(L), h / h.sum(), color="C2", label="paraphrase pairs (same fact)")
            ax.plot(range(L), tr["mlp"]["abs_layer_diff_uniform_pmf"], "k.-", lw=1, ms=3, label="two uniform layers")
            ax.set_xlabel("|peak layer(i) - peak layer(j)|, MLP at the last subject token")
            ax.set_ylabel("share of pairs")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / "fig_tracing_layer_diff.png", dpi=110)
            plt.close(fig)
            made.append("fig_tracing_layer_diff.png")
        ie = tr.get("mean_normalized_ie", {})
        if ie:
            ks = sorted({k.split("/")[0] for k in ie})
            fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3), squeeze=False, sharey=True)
            for ax, k in zip(axes[0], ks):
                for cls, sty in (("last_subject", "-"), ("last", "--"), ("other", ":")):
                    if f"{k}/{cls}" in ie:
                        ax.plot(range(L), ie[f"{k}/{cls}"], sty, label=cls)
                ax.set_title(k, fontsize=9)
                ax.set_xlabel("layer")
            axes[0, 0].set_ylabel("normalized IE")
            axes[0, 0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / "fig_tracing_ie.png", dpi=110)
            plt.close(fig)
            made.append("fig_tracing_ie.png")
    rows = _fidelity_rows(s, L)
    if rows:
        fig, ax = plt.subplots(figsize=(1.9 * len(rows) + 2, 3.2))
        w = 0.2
        for g, (key, lab, col) in enumerate((("same_fact", "paraphrases, same fact", "C0"),
                                             ("same_template", "same template, other fact", "C1"),
                                             ("unrelated", "unrelated fact", "C7"), ("random", "random", "k"))):
            xs, ys, lo, hi = [], [], [], []
            for i, (_n, _u, fid) in enumerate(rows):
                m = fid.get(key)
                if not m or m.get("n", 0) == 0 or m["mean"] != m["mean"]:
                    continue
                xs.append(i + (g - 1.5) * w)
                ys.append(m["mean"])
                lo.append(m["mean"] - m["ci"][0])
                hi.append(m["ci"][1] - m["mean"])
            if xs:
                ax.bar(xs, ys, w, yerr=[lo, hi], label=lab, color=col, capsize=2)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r[0] for r in rows], fontsize=8)
        ax.set_ylabel("IoU of localized parameters")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "fig_iou.png", dpi=110)
        plt.close(fig)
        made.append("fig_iou.png")
    return made


def write_report(res: AuditResult, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = build_report(res)
    made = set(_figures(res, rep, out_dir))
    rep["figures"] = [f for f in rep["figures"] if f["file"] in made]
    atomic_write_json(out_dir / "report.json", _json_clean(rep))
    return out_dir / "report.json"


def _json_clean(o):
    """nan/inf -> None so report.json is strict JSON."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_clean(v) for v in o]
    if isinstance(o, (np.floating,)):
        return _json_clean(float(o))
    if isinstance(o, (np.integer,)):
        return int(o)
    return o
