"""Knowledge circuits as an audit method: a circuit per phrasing by edge attribution patching (EAP).

Graph and per-head outputs: :mod:`caploc.stages.audit.circuit_graph`; EAP, metric and mean ablation:
:mod:`caploc.stages.audit.circuit_eap`; the result: :mod:`caploc.stages.audit.circuit_result`.

Corruption (ours; the paper's text is not available): ``noise`` (default, ROME's causal-tracing corruption) adds
Gaussian noise with sd ``noise_scale * sigma`` to the embedding-node output at the subject tokens, ``sigma`` = the sd
of the clean embedding-node outputs at subject tokens over all audited phrasings, seeded per phrasing; ``swap``
replaces the subject by another subject of the data set (different attribute) that tokenizes to the same number of
tokens with identical surrounding tokens, falling back to ``noise`` when none exists (recorded per phrasing).

Circuit: the ``top_k`` edges by ``|score|``. Fidelity: IoU of the edge sets of a fact's phrasings (the prompt and its
paraphrases), next to the exact IoU of two random edge sets of the same size, next to phrasings of *different* facts
(same relation / other relation). Size: share of edges, of nodes, and of parameters (the parameters the touched nodes
own: per head its q and o slices and the k/v slices of its key-value group; per MLP all its weights; embeddings and
unembedding are not counted); parameter-weighted IoU between paraphrases (:func:`param_sets` exports the parameter
sets for a common metric across audit methods).

Reliability (node-level; edge-level ablation is not implemented): run the phrasing with every head and MLP that the
circuit does not touch mean-ablated (its output replaced by its mean over the reference set = all audited clean
phrasings, averaged over positions), and report ``P_circuit / P_full`` of the first target token. Baselines: random
node sets with the same number of heads and MLPs (``random_draws`` per phrasing) and the empty circuit (everything
ablated). By default position 0 (the attention-sink / first token) is never ablated and not used for the means
(``keep_first_position``).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...data.encode import encode_prompt
from ...errors import CaplocError, DataError
from ...progress import bar as progress_bar
from .base import Method
from .circuit_eap import (
    ablated_metric,
    circuit_nodes,
    clean_embedding,
    edge_attribution,
    make_ablation,
    metric_inputs,
    node_means,
    stack_ablations,
)
from .circuit_graph import NodeGraph
from .circuit_result import CircuitAudit
from .config import CircuitConfig
from .metrics import fidelity_summary, random_weighted_iou, weighted_iou

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# phrasings of facts
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Phrasing:
    fact: int  # index of the fact in the audit
    text: str
    ids: list[int]  # prompt ids
    prompt_len: int
    target_ids: list[int]
    subject_span: tuple[int, int]  # token positions [start, stop)
    slot: int = 0  # index of this phrasing among the fact's phrasings (0 = the prompt)


def subject_span(tokenizer, ids: list[int], text: str, subject: str) -> tuple[int, int] | None:
    """Token positions [start, stop) covering ``subject`` in the prompt (via decoded prefix lengths)."""
    ends, prev = [], 0
    for k in range(len(ids)):
        prev = len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True))
        ends.append(prev)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    at = full.find(subject)
    if at < 0:
        at = full.find(subject.strip())
        if at < 0:
            return None
        subject = subject.strip()
    s, e = at, at + len(subject)
    starts = [0] + ends[:-1]
    toks = [k for k in range(len(ids)) if ends[k] > s and starts[k] < e and ends[k] > starts[k]]
    if not toks:
        return None
    return toks[0], toks[-1] + 1


def fact_rows(facts) -> list[dict]:
    """Facts as dicts {id, phrasings, target, subject, attribute, relation}: from a caploc Dataset (``meta['subject']``,
    ``meta['paraphrases']``) or from a sequence of objects with ``phrasings``/``target``/``subject`` (:class:`caploc.stages.audit.facts.Fact`)."""
    rows = []
    for s in facts:
        if hasattr(s, "phrasings"):
            meta = dict(getattr(s, "meta", None) or {})
            rows.append({"id": str(s.id), "phrasings": list(s.phrasings), "target": s.target, "subject": s.subject,
                         "attribute": meta.get("attribute", s.target.strip()),
                         "relation": getattr(s, "relation", None) or meta.get("relation_id")})
        else:
            meta = dict(s.meta or {})
            rows.append({"id": str(s.id), "phrasings": [s.prompt, *list(meta.get("paraphrases") or [])],
                         "target": s.target, "subject": meta.get("subject"),
                         "attribute": meta.get("attribute", s.target.strip()),
                         "relation": meta.get("relation_id", s.group)})
    return rows


def _phrasings(tokenizer, rows: list[dict], cfg: CircuitConfig) -> tuple[list[Phrasing], list[int]]:
    out: list[Phrasing] = []
    used: list[int] = []
    for i, f in enumerate(rows):
        subject = f["subject"]
        if not subject:
            raise DataError(f"fact '{f['id']}' has no subject; knowledge circuits corrupt the subject tokens "
                            "(use the facts data set or give meta['subject'])")
        target = f["target"][1:] if cfg.chat and f["target"].startswith(" ") else f["target"]
        tids = [int(t) for t in tokenizer.encode(target, add_special_tokens=False)]
        if not tids:
            continue
        cand = []
        for slot, text in enumerate(f["phrasings"]):
            if len(cand) >= cfg.max_phrasings:
                break
            ids = encode_prompt(tokenizer, text, chat=cfg.chat)
            span = subject_span(tokenizer, ids, text, subject)
            if span is None:
                log.debug("subject %r not found in the tokens of %r; phrasing skipped", subject, text)
                continue
            cand.append(Phrasing(len(used), text, ids, len(ids), tids, span, slot))
        if len(cand) >= cfg.min_phrasings:
            out.extend(cand)
            used.append(i)
    return out, used


def _swap_embedding(graph, tokenizer, ph: Phrasing, subject: str, attribute: str, pool: list[tuple[str, str]],
                    rng: np.random.Generator, chat: bool) -> torch.Tensor | None:
    a, b = ph.subject_span
    order = rng.permutation(len(pool))
    for j in order:
        other, attr = pool[j]
        if other == subject or attr == attribute or subject not in ph.text:
            continue
        ids2 = encode_prompt(tokenizer, ph.text.replace(subject, other, 1), chat=chat)
        if len(ids2) == len(ph.ids) and ids2[:a] == ph.ids[:a] and ids2[b:] == ph.ids[b:] and ids2[a:b] != ph.ids[a:b]:
            return clean_embedding(graph, ids2 + ph.ids[len(ids2):])
    return None


# ---------------------------------------------------------------------------------------------------------------------
# the audit
# ---------------------------------------------------------------------------------------------------------------------
def audit_circuits(lm, facts, cfg: CircuitConfig | None = None, progress: bool | None = None) -> CircuitAudit:
    """Build a circuit for every phrasing of every fact (prompt + paraphrases) and measure fidelity, reliability and
    size. ``lm``: a LoadedModel; ``facts``: a Dataset with ``meta['subject']`` and ``meta['paraphrases']``, or a
    sequence of :class:`caploc.stages.audit.facts.Fact` (phrasings, target, subject, relation). Facts with fewer than
    ``cfg.min_phrasings`` phrasings in which the subject is found are skipped; at most ``cfg.max_phrasings`` per fact."""
    cfg = cfg or CircuitConfig()
    t0 = time.time()
    model, tok = lm.model, lm.tokenizer
    graph = NodeGraph(model, lm.site)
    rows = fact_rows(facts)
    phr, used = _phrasings(tok, rows, cfg)
    if not used:
        raise DataError(f"no fact of '{getattr(facts, 'name', '?')}' has {cfg.min_phrasings} usable phrasings "
                        "(prompt + meta['paraphrases'] with the subject found in the tokens); use the facts data set")
    if cfg.top_k > graph.n_edges:
        raise CaplocError(f"top_k={cfg.top_k} exceeds the {graph.n_edges} edges of this model; lower --top-k")
    log.info("circuits: %d facts, %d phrasings, %d nodes, %d edges", len(used), len(phr), graph.n_nodes, graph.n_edges)
    first = 1 if cfg.keep_first_position else 0
    kind = cfg.metric
    seqs = [metric_inputs(p.ids, p.target_ids, p.prompt_len, kind) for p in phr]

    # clean embeddings; noise sd from the subject tokens of all phrasings
    embs = [clean_embedding(graph, s) for s in seqs]
    subj = torch.cat([e[0, p.subject_span[0]:p.subject_span[1]].float().flatten() for e, p in zip(embs, phr)])
    sigma = float(subj.std())
    pool = [(f["subject"], f["attribute"]) for f in rows]
    mean_z, mean_mlp = node_means(graph, seqs, first)
    L, H = graph.n_layers, graph.n_heads
    empty = make_ablation(graph, np.zeros(graph.n_nodes, dtype=bool), mean_z, mean_mlp, first)
    rng = np.random.default_rng(cfg.seed)
    head_nodes = np.array([graph.head_node(l, h) for l in range(L) for h in range(H)])
    mlp_nodes = np.array([graph.mlp_node(l) for l in range(L)])

    k = cfg.top_k
    P = len(phr)
    top_e = np.zeros((P, k), dtype=np.int64)
    top_s = np.zeros((P, k), dtype=np.float32)
    m_clean, m_cor, m_emp = np.zeros(P), np.zeros(P), np.zeros(P)
    r_circ, r_rand = np.zeros(P), np.zeros((P, cfg.random_draws))
    corr_used = []
    bar = progress_bar(P, desc="circuits (EAP)", unit="phrasing", progress=progress)
    for i, (p, seq, emb) in enumerate(zip(phr, seqs, embs)):
        cemb = None
        if cfg.corrupt == "swap":
            f = rows[used[p.fact]]
            cemb = _swap_embedding(graph, tok, p, f["subject"], f["attribute"], pool,
                                   np.random.default_rng([cfg.seed, i]), cfg.chat)
        if cemb is None:
            g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + i)
            noise = torch.randn(emb.shape, generator=g, dtype=torch.float32) * (cfg.noise_scale * sigma)
            mask = torch.zeros(emb.shape[1], 1)
            mask[p.subject_span[0]:p.subject_span[1]] = 1.0
            cemb = emb + (noise * mask).to(emb.device, emb.dtype)
            corr_used.append("noise")
        else:
            corr_used.append("swap")
        ea = edge_attribution(graph, seq, p.prompt_len, p.target_ids, cemb, kind)
        order = torch.argsort(ea.scores.abs(), descending=True)[:k]
        top_e[i], top_s[i] = order.numpy(), ea.scores[order].numpy()
        m_clean[i], m_cor[i] = ea.m_clean, ea.m_corrupt
        keep = circuit_nodes(graph, top_e[i])
        nh, nm = int(keep[head_nodes].sum()), int(keep[mlp_nodes].sum())
        abls = [make_ablation(graph, keep, mean_z, mean_mlp, first), empty]
        for r in range(cfg.random_draws):
            rk = np.zeros(graph.n_nodes, dtype=bool)
            rk[rng.choice(head_nodes, nh, replace=False)] = True
            rk[rng.choice(mlp_nodes, nm, replace=False)] = True
            abls.append(make_ablation(graph, rk, mean_z, mean_mlp, first))
        vals = np.concatenate([ablated_metric(graph, seq, p.prompt_len, p.target_ids, stack_ablations(abls[b:b + 16]), kind)
                               for b in range(0, len(abls), 16)])
        r_circ[i] = _ratio(vals[0], ea.m_clean, kind)
        m_emp[i] = vals[1]
        r_rand[i] = [_ratio(v, ea.m_clean, kind) for v in vals[2:]]
        bar.update(1)
    bar.close()

    units, sizes, node_units, ranges = graph.param_units()
    audited = [{"id": rows[i]["id"], "subject": rows[i]["subject"], "attribute": rows[i]["attribute"],
                "relation_id": rows[i]["relation"], "target": rows[i]["target"], "input_index": i,
                "n_phrasings": len(rows[i]["phrasings"])} for i in used]
    meta = {
        "model_id": lm.info.get("model_id"), "model_fingerprint": lm.info.get("fingerprint"),
        "graph": graph.describe(), "dataset": getattr(facts, "name", None),
        "dataset_fingerprint": facts.fingerprint() if hasattr(facts, "fingerprint") else None,
        "dataset_source": getattr(facts, "source", None), "noise_sigma": sigma, "seconds": round(time.time() - t0, 1),
        "param_shapes": {n: list(p.shape) for n, p in model.named_parameters()},
        "ablation": "node-level mean ablation" + (" (position 0 kept)" if first else ""),
    }
    res = CircuitAudit(
        nodes=graph.nodes, edges=graph.edges, node_units=node_units, unit_names=units, unit_sizes=sizes,
        unit_ranges=ranges, phrasing_fact=np.array([p.fact for p in phr], dtype=np.int64),
        phrasing_slot=np.array([p.slot for p in phr], dtype=np.int64),
        phrasing_text=[p.text for p in phr], phrasing_corruption=corr_used, facts=audited, top_edges=top_e,
        top_scores=top_s, m_clean=m_clean, m_corrupt=m_cor, m_empty=m_emp, ratio_circuit=r_circ, ratio_random=r_rand,
        total_params=int(sum(p.numel() for p in model.parameters())), config=cfg.to_dict(), meta=meta,
        n_input_facts=len(rows),
    )
    log.info("circuits done in %.1f s", time.time() - t0)
    return res


def _ratio(m_abl: float, m_full: float, kind: str) -> float:
    """P_ablated / P_full for log-prob metrics; for the raw logit metric the difference of logits is returned."""
    if kind == "logit":
        return m_abl - m_full
    return float(math.exp(m_abl - m_full))


def circuits_summary(circ: dict, partners, seed: int, facts=None) -> dict | None:
    """Common-metric fidelity (parameter-weighted IoU between paraphrases) of the stored circuit parameter sets."""
    ps = circ.get("param_sets")
    if not ps:
        return None
    if facts is not None:  # one entry per phrasing of each fact (None where the circuits module skipped it)
        ps = [(list(ps[i]) if i < len(ps) and ps[i] is not None else []) for i in range(len(facts))]
        ps = [row[: len(f.phrasings)] + [None] * (len(f.phrasings) - len(row)) for row, f in zip(ps, facts)]
    uni = circ.get("universe")
    rand = (lambda a, b: random_weighted_iou(a, b, uni, 200, seed)) if uni else None
    return fidelity_summary(ps, weighted_iou, partners, rand, seed)


class KnowledgeCircuits(Method):
    """``circuits``: a circuit per phrasing of every fact (:func:`audit_circuits`), set-level: the mean-ablation
    reference is the whole fact set. Its localization per phrasing = the parameter units its nodes own."""

    name = "circuits"
    per_fact = False
    needs_subject = True

    def localize_all(self, facts, out_dir: Path) -> dict:
        """Run :func:`audit_circuits`; store its result under ``out_dir/circuits`` and return the ``circuits`` entry of
        ``audit.json``: status, seconds, its own summary, per fact per phrasing ``param_sets`` {unit: parameter
        count} and the ``universe`` of all units (the random baseline)."""
        t0 = time.time()
        res = audit_circuits(self.lm, facts, self.cfg.circuit_config())
        out: dict = {"status": "ran", "seconds": time.time() - t0}
        try:
            res.save(out_dir / "circuits")
            out["saved"] = "circuits/"
        except (OSError, CaplocError, ValueError, TypeError) as e:  # a failed save must not lose the audit
            out["save_error"] = str(e).splitlines()[0][:200]
        out["their_summary"] = json.loads(json.dumps(res.summary(), default=str))
        out["param_sets"] = [[{str(k): float(v) for k, v in dict(s).items()} if s is not None else None for s in f]
                             for f in res.param_sets]
        uni = res.universe
        out["universe"] = {str(k): float(v) for k, v in dict(uni).items()} if uni else None
        return out

    @classmethod
    def summarize(cls, result, partners: list[dict]) -> dict | None:
        c = circuits_summary(result.circuits, partners, int(result.config["seed"]), result.facts)
        return {"fidelity": c} if c is not None else None


__all__ = ["CircuitConfig", "KnowledgeCircuits", "Phrasing", "audit_circuits", "circuits_summary", "fact_rows",
           "subject_span"]
