"""Causal tracing as an audit method: the peak site of each phrasing, and what restoring it does on a paraphrase.

Each phrasing is traced (:class:`caploc.stages.audit.tracer.Tracer`); its localization is the MLP at the peak layer
of the MLP indirect effect at the last subject token (ROME's edit site). Fidelity = the same-peak-layer rate between
paraphrases (the parameter IoU of single-MLP sets), next to 1/L, the pooled-histogram chance and |delta layer|.
Reliability = *cross-paraphrase restoration recovery*: restoring the clean MLP output (last subject token) at the
layer traced on phrasing i, on paraphrase j, recovers what share of the best single-layer restoration on j, next to
the mean share over all layers (a random layer). We restore rather than ROME-edit.
"""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch

from ...data.encode import chat_prompt_text
from .base import FactJob, Method, seed_int, seed_parts
from .metrics import fidelity_summary, layer_iou, mean_ci
from .tracer import PhrasingTrace, Tracer, subject_positions


class CausalTracing(Method):
    """``tracing``: ROME causal tracing of every phrasing (noise on the subject, restoration of one state)."""

    name = "tracing"
    needs_subject = True

    def __init__(self, lm, cfg):
        super().__init__(lm, cfg)
        self.tracer = Tracer(lm.site, cfg.tracing) if lm is not None else None

    def localize(self, job: FactJob) -> tuple[dict, dict[str, torch.Tensor]]:
        t0 = time.time()
        tok, fact, chat = self.lm.tokenizer, job.fact, self.cfg.chat
        traces, tensors = [], {}
        for j, (e, phr) in enumerate(zip(job.encoded, fact.phrasings)):
            prompt_ids = e.input_ids[: e.prompt_len]
            sp = subject_positions(tok, chat_prompt_text(tok, phr) if chat else phr, prompt_ids, fact.subject)
            tr = self.tracer.trace(prompt_ids, e.input_ids[e.prompt_len], sp,
                                   seed=seed_int(seed_parts(self.cfg, job.index, 3, j)))
            traces.append(tr.to_json())
            tensors[f"trace.p_restored.{j}"] = tr.p_restored
        job.timing["tracing"] = time.time() - t0
        return {"traces": traces}, tensors

    def run_info(self) -> dict:
        return {"tracing_noise_sd": self.tracer.noise_sd}

    @classmethod
    def summarize(cls, result, partners: list[dict]) -> dict | None:
        if result.traces is None:
            return None
        return tracing_summary(result.traces, partners, int(result.model["n_layers"]), int(result.config["seed"]))


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


def uniform_same_layer_chance(n_layers: int) -> float:
    """P(two independent uniform layers are equal) = 1 / L."""
    return 1.0 / n_layers


def uniform_abs_layer_diff(n_layers: int) -> float:
    """E|l1 - l2| for two independent uniform layers in 0..L-1: (L^2 - 1) / (3 L)."""
    L = n_layers
    return (L * L - 1) / (3.0 * L)


def abs_layer_diff_pmf(n_layers: int) -> np.ndarray:
    """P(|l1 - l2| = d), d = 0..L-1, for two independent uniform layers."""
    L = n_layers
    p = np.array([(L if d == 0 else 2 * (L - d)) / (L * L) for d in range(L)], dtype=np.float64)
    return p
