"""Neuron-set methods (KN, CNL per phrasing): refinement across phrasings, manipulation, summaries.

**Refinement across a fact's phrasings** (:func:`refine`): keep the neurons that are in the sets of at least a share
``p`` of the phrasings. Two comparison rules: ``"gt"`` (count > p * n: Dai et al.'s "shared by more than p% of
prompts", and ``count > n_prompts * p`` in EleutherAI's knowledge-neurons package; the DEFAULT here) and ``"ge"``
(count >= p * n). They differ exactly when p * n is a whole number: with p = 0.5 and 2 phrasings, "gt" keeps the
intersection and "ge" the union of the two sets; with 4 phrasings "gt" needs 3 and "ge" needs 2.

Manipulation (reliability): multiply a neuron set's activations by 0 (suppress) or by ``enhance`` and measure the
relative change of P(first target token) on every phrasing, next to layer-matched random neuron sets (same number
of neurons in every layer, drawn disjoint from the set). ``positions="last"`` intervenes only at the last prompt
position (where KN's attribution is measured and the knowledge-neurons package patches); ``"all"`` scales every
position (``caploc.hooks.scale_neurons``). Rows with different sets share forward passes (:func:`row_set_probs`).
"""
from __future__ import annotations

import contextlib
import math
from typing import ClassVar, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from ...blocks import rows_cache
from ...errors import CaplocError
from ...hooks import neuron_hooks, scale_neurons
from ...lmhead import position_probs
from ...models.layouts import Site
from ...stats import per_layer_counts, random_layer_matched_set
from .base import FactJob, Method, seed_parts
from .config import SHARE_RULES, AuditConfig
from .facts import prompt_batch
from .metrics import fidelity_summary, mean_ci, random_set_iou, set_iou


def share_threshold(n: int, p: float, rule: str = "gt") -> int:
    """Smallest count a neuron needs among ``n`` phrasings: rule gt -> floor(p*n) + 1, ge -> ceil(p*n) (min 1)."""
    if rule not in SHARE_RULES:
        raise CaplocError(f"share rule {rule!r}: choose gt or ge")
    x = p * n
    xr = round(x)
    if abs(x - xr) < 1e-9:  # whole number: exact comparison without float noise
        x = float(xr)
    k = math.floor(x) + 1 if rule == "gt" else math.ceil(x)
    return max(1, int(k))


def refine(sets: Sequence[np.ndarray], p: float, rule: str = "gt") -> np.ndarray:
    """Neurons present in a share ``p`` of the per-phrasing sets (rule ``gt``: count > p*n; ``ge``: >= p*n).
    Returns a sorted flat int64 array (empty if no set is given or none qualifies)."""
    if not sets:
        return np.zeros(0, dtype=np.int64)
    k = share_threshold(len(sets), p, rule)
    allv = np.concatenate([np.unique(np.asarray(s, dtype=np.int64)) for s in sets]) if sets else np.zeros(0, np.int64)
    if allv.size == 0:
        return np.zeros(0, dtype=np.int64)
    vals, counts = np.unique(allv, return_counts=True)
    return vals[counts >= k].astype(np.int64)


def flat_to_layers(flat: np.ndarray, d_mlp: int) -> dict[int, np.ndarray]:
    flat = np.asarray(flat, dtype=np.int64)
    out: dict[int, list[int]] = {}
    for f in flat.tolist():
        out.setdefault(f // d_mlp, []).append(f % d_mlp)
    return {l: np.asarray(v, dtype=np.int64) for l, v in out.items()}


@contextlib.contextmanager
def _scale_at(site: Site, neurons_flat: np.ndarray, factor: float, positions: str, last: torch.Tensor):
    if neurons_flat is None or len(neurons_flat) == 0 or factor == 1.0:
        yield
        return
    by_layer = flat_to_layers(neurons_flat, site.d_mlp)
    if positions == "all":
        with scale_neurons(site, {l: torch.as_tensor(ix) for l, ix in by_layer.items()}, factor):
            yield
        return

    def make(ix):
        ix_t = torch.as_tensor(ix, dtype=torch.long)

        def fn(_l, x):  # x [B, T, d_mlp]
            x = x.clone()
            b = torch.arange(x.shape[0], device=x.device)[:, None]
            p = last.to(x.device)[:, None]
            x[b, p, ix_t.to(x.device)[None, :]] *= factor
            return x
        return fn

    with neuron_hooks(site, {l: make(ix) for l, ix in by_layer.items()}):
        yield


def target_probs(site: Site, encoded, neurons_flat: np.ndarray | None = None, factor: float = 1.0,
                 positions: str = "last", pad_id: int = 0, batch_size: int = 32) -> np.ndarray:
    """P(first target token) at the last prompt position of each encoded phrasing [n], with the given neurons' (flat
    indices) activations multiplied by ``factor`` at the last prompt position (``positions="last"``) or everywhere
    (``"all"``, via :func:`caploc.hooks.scale_neurons`)."""
    model = site.model
    dev = site.input_device()
    out = []
    for b0 in range(0, len(encoded), batch_size):
        chunk = encoded[b0 : b0 + batch_size]
        ids, att, last, tgt = prompt_batch(chunk, pad_id)
        with torch.no_grad(), _scale_at(site, neurons_flat, factor, positions, last):
            p = position_probs(model, tgt.to(dev), last.to(dev), input_ids=ids.to(dev), attention_mask=att.to(dev),
                               use_cache=False)
        out.append(p.cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def relative_change(p_new, p_old) -> np.ndarray:
    """(p_new - p_old) / p_old elementwise (nan where p_old == 0)."""
    p_new = np.asarray(p_new, dtype=np.float64)
    p_old = np.asarray(p_old, dtype=np.float64)
    out = np.full(np.broadcast(p_new, p_old).shape, np.nan)
    ok = np.broadcast_to(p_old, out.shape) > 0
    out[ok] = (np.broadcast_to(p_new, out.shape)[ok] - np.broadcast_to(p_old, out.shape)[ok]) / np.broadcast_to(p_old, out.shape)[ok]
    return out


def row_set_probs(site, encoded_rows, row_sets, factor, positions: str, pad_id: int,
                  batch_size: int = 64) -> np.ndarray:
    """P(first target token) of each row (an encoded phrasing) with that row's neuron set (flat indices; None or
    empty = untouched) multiplied by ``factor`` at the last prompt position (``"last"``) or at every position.

    With ``"last"`` the untouched prefix of each distinct prompt runs once (KV cache) and the rows run only the last
    prompt token: the same numbers as full rows, since earlier positions never see the change."""
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
        ids, att, last, tgt = prompt_batch(enc, pad_id)
        gains = gains_for(row_sets[b0 : b0 + batch_size], len(enc), list(range(b0, b0 + len(enc))))

        def make_all(g):
            def fn(_l, x):  # x [B, T, d]
                return x * g.to(x.device, x.dtype)[:, None, :]
            return fn

        with torch.no_grad(), neuron_hooks(site, {l: make_all(g) for l, g in gains.items()}):
            p = position_probs(model, tgt.to(dev), last.to(dev), input_ids=ids.to(dev), attention_mask=att.to(dev),
                               use_cache=False)
        out.append(p.cpu().numpy())
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


class NeuronMethod(Method):
    """A neuron set per phrasing, refined across the fact's phrasings; reliability = suppress / enhance the sets."""

    seed_tag: ClassVar[int]  # seeds of the random controls: seed_parts(cfg, fact index, seed_tag)

    def manipulate(self, job: FactJob, sets: list[np.ndarray], refined: np.ndarray) -> dict:
        """Suppress / enhance the refined set and every phrasing's own set, next to random controls."""
        return manipulation(self.lm.site, job.encoded, sets, refined, self.cfg, seed_parts(self.cfg, job.index,
                            self.seed_tag), job.off_encoded, job.pad)

    @classmethod
    def summarize(cls, result, partners: list[dict]) -> dict | None:
        recs = result.records
        mr = [r[cls.name] for r in recs if cls.name in r]
        if not mr or len(mr) != len(recs):
            return None
        seed = int(result.config["seed"])
        L, d = int(result.model["n_layers"]), int(result.model["d_mlp"])
        return {"fidelity": neuron_fidelity(mr, partners, L, d, seed), "reliability": neuron_reliability(mr, seed)}
