"""Decoupling (paper §4): do per-sample neuron sets follow shared *commonality* (problem type) or shared *content*?

Comparative groups (all built deterministically from a seed; every group is checked to be what it claims):

gsm_symbolic (reasoning-gym, a pool of ``pool_size`` generated problems):
  * ``commonality``: ``group_size`` problems of ONE template (the problem type), with pairwise different variables
    and, as far as the pool allows, no shared string content (names, objects);
  * ``content``: ``group_size`` problems of pairwise DIFFERENT templates that share content. reasoning-gym cannot
    render a template with given variable values (each template samples its own inside a closure), so content groups
    are *searched* in the pool: an anchor string that appears in the question (a person's name such as "James", an
    object, a currency) shared by at least ``group_size`` templates, plus, where the pool allows, a second shared
    item (another string or a number that appears in every question). The shared items of every group are recorded
    and the measured amount of shared content is reported for every kind of group;
  * ``random``: ``group_size`` random problems of the pool.

facts (ROME known facts, 1209):
  * ``commonality``: facts of ONE relation with pairwise different subjects AND different attributes (so the group
    does not share the answer);
  * ``content``: facts that share the attribute (answer), e.g. "London", across pairwise different relations. Only
    14 subjects occur in two relations and none in more, so same-subject groups of 5 do not exist in this data.
    Confound: content groups share the TARGET tokens, which the attribution objective scores directly, so shared
    output-side neurons favour content here; a commonality win on facts is therefore the harder test;
  * ``random``: random facts.

Per sample: attribution (``grad_x_act`` by default: one forward/backward; or exact per-layer ``ig``), per-sample
selection (``sigma``: Attr > mean + sigma * sd over the sample's neurons, or ``topk``). Per group: the mean pairwise
IoU (and overlap rate) of its members' sets. Per kind: mean over groups with a percentile bootstrap CI over groups;
the difference commonality - content with a bootstrap CI (groups resampled within each kind); the exact chance IoU
of independent random sets with the same per-layer sizes. ``follows_commonality`` = commonality IoU > content IoU
with the 95% CI of the difference above 0.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import CaplocError, DataError
from .results import atomic_save_tensors, atomic_write_json

log = logging.getLogger(__name__)

DOMAINS = ("gsm_symbolic", "facts")
KINDS = ("commonality", "content", "random")
_NUM_RE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?![\w])")


# ---------------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class DecoupleConfig:
    domains: list[str] = field(default_factory=lambda: ["gsm_symbolic", "facts"])
    n_groups: int = 8  # groups per kind and domain
    group_size: int = 5
    pool_size: int = 2000  # gsm_symbolic problems generated to search groups in
    seed: int = 0
    gsm_target: str = "cot"  # cot | answer
    method: str = "grad_x_act"  # grad_x_act | ig
    steps: int = 8  # IG steps (method=ig)
    objective: str = "logprob"
    positions: str = "all"
    rule: str = "sigma"  # sigma | topk
    sigma: float = 6.0
    topk: int = 200
    batch_size: int = 4
    n_boot: int = 2000
    chat: bool = False
    max_length: int | None = None

    def __post_init__(self):
        self.domains = list(self.domains)
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad or not self.domains:
            raise CaplocError(f"unknown decoupling domain(s) {bad or self.domains}; choose from {', '.join(DOMAINS)}")
        if self.n_groups < 2 or self.group_size < 2:
            raise CaplocError("n_groups and group_size must both be >= 2 (a CI needs groups, an IoU needs pairs)")
        if self.rule not in ("sigma", "topk"):
            raise CaplocError(f"unknown selection rule {self.rule!r}; use sigma or topk")
        if self.method not in ("grad_x_act", "ig"):
            raise CaplocError(f"unknown method {self.method!r}; use grad_x_act or ig")
        if self.gsm_target not in ("cot", "answer"):
            raise CaplocError(f"gsm_target must be cot or answer, not {self.gsm_target!r}")
        if self.pool_size < self.n_groups * self.group_size * 3:
            raise CaplocError(f"pool_size={self.pool_size} is too small for {self.n_groups} groups x {self.group_size} "
                              "x 3 kinds; raise --pool-size")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def full(cls, **kw) -> "DecoupleConfig":
        """Paper scale: 50 groups of 20 = 1000 samples per kind. The facts data cannot give content groups of 20 (an
        attribute occurs in at most 9 relations), so at this size the facts domain is skipped (reported)."""
        base = dict(n_groups=50, group_size=20, pool_size=20000)
        base.update(kw)
        return cls(**base)


# ---------------------------------------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Group:
    kind: str  # commonality | content | random
    key: str  # e.g. "tpl-12", "name=james+num=4", "P17", "attr=London", "random-3"
    indices: list[int]  # into the domain's pool
    shared: list[str] = field(default_factory=list)  # the content items every member shares (measured)

    def to_json(self) -> dict:
        return asdict(self)


def _num_str(v: float) -> str:
    return str(int(v)) if float(v) == int(v) else repr(float(v))


def content_items(question: str, variables: dict) -> set[str]:
    """Content of a gsm problem: variable values that literally occur in the question text.

    Strings -> ``"str=<lowercased>"`` (whole-word match), numbers -> ``"num=<value>"`` (a number token of the question
    with the same value). Derived variables that the question does not show (intermediate results) are not content."""
    q = question.lower()
    nums = set()
    for tok in _NUM_RE.findall(question):
        try:
            nums.add(_num_str(float(tok.replace(",", ""))))
        except ValueError:
            pass
    out: set[str] = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, bool):
            return
        elif isinstance(v, str):
            s = v.strip().lower()
            if s and re.search(r"(?<!\w)" + re.escape(s) + r"(?!\w)", q):
                out.add(f"str={s}")
        elif isinstance(v, (int, float)) and math.isfinite(float(v)):
            s = _num_str(float(v))
            if s in nums:
                out.add(f"num={s}")

    walk(variables)
    return out


def _question(sample) -> str:
    return sample.prompt


def gsm_groups(pool, n_groups: int, group_size: int, seed: int) -> tuple[dict[str, list[Group]], list[set[str]]]:
    """Commonality / content / random groups over a gsm_symbolic pool (a Dataset with meta template + variables)."""
    samples = list(pool)
    items = [content_items(_question(s), s.meta.get("variables") or {}) for s in samples]
    tpl = [int(s.meta["template"]) for s in samples]
    rng = random.Random(seed)
    used: set[int] = set()

    # commonality: one template, pairwise different variables, minimal shared strings
    by_tpl: dict[int, list[int]] = {}
    for i, t in enumerate(tpl):
        by_tpl.setdefault(t, []).append(i)
    cand_t = sorted(t for t, ix in by_tpl.items() if len(ix) >= group_size)
    rng.shuffle(cand_t)
    common: list[Group] = []
    for t in cand_t:
        if len(common) >= n_groups:
            break
        pick: list[int] = []
        seen_vars: set[str] = set()
        strs: set[str] = set()
        ix = list(by_tpl[t])
        rng.shuffle(ix)
        # first pass: no string shared with the members so far; second pass: any different variables
        for strict in (True, False):
            for i in ix:
                if len(pick) >= group_size or i in pick:
                    continue
                key = json.dumps(samples[i].meta.get("variables"), sort_keys=True, default=str)
                s_i = {x for x in items[i] if x.startswith("str=")}
                if key in seen_vars or (strict and s_i & strs):
                    continue
                pick.append(i)
                seen_vars.add(key)
                strs |= s_i
        if len(pick) == group_size:
            common.append(Group("commonality", f"tpl-{t}", pick, sorted(set.intersection(*(items[i] for i in pick)))))
            used.update(pick)

    # content: pairwise different templates sharing an anchor string (+ a second item where possible)
    content: list[Group] = []
    anchors: dict[str, set[int]] = {}
    for i, its in enumerate(items):
        for x in its:
            if x.startswith("str="):
                anchors.setdefault(x, set()).add(i)
    order = sorted(anchors, key=lambda a: (-len({tpl[i] for i in anchors[a]}), a))
    progress = True
    while len(content) < n_groups and progress:  # several rounds: an anchor may seed disjoint groups
        progress = False
        for a in order:
            if len(content) >= n_groups:
                break
            free = sorted(i for i in anchors[a] if i not in used)
            if len({tpl[i] for i in free}) < group_size:
                continue
            # greedily add further shared items (another string, a number of the question) while at least
            # group_size templates still have a problem holding all of them; most templates first, strings first
            shared_keys = [a]
            members = list(free)
            while True:
                co: dict[str, set[int]] = {}
                for i in members:
                    for x in items[i]:
                        if x not in shared_keys:
                            co.setdefault(x, set()).add(tpl[i])
                best = sorted((x for x, ts in co.items() if len(ts) >= group_size),
                              key=lambda x: (-len(co[x]), not x.startswith("str="), x))
                if not best:
                    break
                shared_keys.append(best[0])
                members = [i for i in members if best[0] in items[i]]
            members = [i for i in free if all(k in items[i] for k in shared_keys)]
            rng.shuffle(members)
            pick, tpls = [], set()
            for i in members:
                if tpl[i] not in tpls:
                    pick.append(i)
                    tpls.add(tpl[i])
                if len(pick) == group_size:
                    break
            if len(pick) < group_size:
                continue
            content.append(Group("content", "+".join(shared_keys), pick,
                                 sorted(set.intersection(*(items[i] for i in pick)))))
            used.update(pick)
            progress = True

    rand = _random_groups(len(samples), n_groups, group_size, used, rng, items)
    for kind, gs in (("commonality", common), ("content", content)):
        if len(gs) < n_groups:
            log.warning("gsm_symbolic: only %d %s groups of %d found in a pool of %d (wanted %d); raise --pool-size",
                        len(gs), kind, group_size, len(samples), n_groups)
    return {"commonality": common, "content": content, "random": rand}, items


def _random_groups(n: int, n_groups: int, group_size: int, used: set[int], rng: random.Random,
                   items: list[set[str]] | None) -> list[Group]:
    free = [i for i in range(n) if i not in used]
    if len(free) < n_groups * group_size:
        free = list(range(n))
    pick = rng.sample(free, n_groups * group_size)
    out = []
    for g in range(n_groups):
        ix = sorted(pick[g * group_size:(g + 1) * group_size])
        shared = sorted(set.intersection(*(items[i] for i in ix))) if items else []
        out.append(Group("random", f"random-{g}", ix, shared))
    return out


def fact_groups(pool, n_groups: int, group_size: int, seed: int) -> tuple[dict[str, list[Group]], list[set[str]]]:
    """Commonality (same relation, different subjects and answers) / content (same answer, different relations) /
    random groups over the facts."""
    samples = list(pool)
    rel = [str(s.meta.get("relation_id", s.group)) for s in samples]
    attr = [str(s.meta.get("attribute", s.target.strip())) for s in samples]
    subj = [str(s.meta.get("subject")) for s in samples]
    items = [{f"attr={a}", f"subj={b}"} for a, b in zip(attr, subj)]
    rng = random.Random(seed)
    used: set[int] = set()

    by_rel: dict[str, list[int]] = {}
    for i, r in enumerate(rel):
        by_rel.setdefault(r, []).append(i)
    cand = sorted(by_rel)
    rng.shuffle(cand)
    common = []
    for r in cand:
        if len(common) >= n_groups:
            break
        ix = list(by_rel[r])
        rng.shuffle(ix)
        pick, attrs, subjs = [], set(), set()
        for i in ix:
            if attr[i] not in attrs and subj[i] not in subjs:
                pick.append(i)
                attrs.add(attr[i])
                subjs.add(subj[i])
            if len(pick) == group_size:
                break
        if len(pick) == group_size:
            common.append(Group("commonality", r, pick, []))
            used.update(pick)

    by_attr: dict[str, list[int]] = {}
    for i, a in enumerate(attr):
        by_attr.setdefault(a, []).append(i)
    cand = sorted(by_attr, key=lambda a: (-len({rel[i] for i in by_attr[a]}), a))
    content = []
    for a in cand:
        if len(content) >= n_groups:
            break
        ix = list(by_attr[a])
        rng.shuffle(ix)
        pick, rels = [], set()
        for i in ix:
            if rel[i] not in rels:
                pick.append(i)
                rels.add(rel[i])
            if len(pick) == group_size:
                break
        if len(pick) == group_size:
            content.append(Group("content", f"attr={a}", pick, [f"attr={a}"]))
            used.update(pick)
    rand = _random_groups(len(samples), n_groups, group_size, used, rng, items)
    for kind, gs in (("commonality", common), ("content", content)):
        if len(gs) < n_groups:
            log.warning("facts: only %d %s groups of %d exist (wanted %d)", len(gs), kind, group_size, n_groups)
    return {"commonality": common, "content": content, "random": rand}, items


def build_groups(domain: str, cfg: DecoupleConfig):
    """(pool Dataset, {kind: [Group]}, per-sample content items) for one domain."""
    from .data import load_dataset

    if domain == "gsm_symbolic":
        pool = load_dataset("gsm_symbolic", n=cfg.pool_size, seed=cfg.seed, target=cfg.gsm_target)
        groups, items = gsm_groups(pool, cfg.n_groups, cfg.group_size, cfg.seed)
    else:
        pool = load_dataset("facts")
        groups, items = fact_groups(pool, cfg.n_groups, cfg.group_size, cfg.seed)
    return pool, groups, items


def content_sharing(groups: dict[str, list[Group]], items: list[set[str]]) -> dict[str, dict]:
    """Measured shared content per kind: mean number of items shared by ALL members, and the mean pairwise Jaccard
    of the members' content items (strings and numbers separately for gsm)."""
    out = {}
    for kind, gs in groups.items():
        n_all, jac, jac_s = [], [], []
        for g in gs:
            sets = [items[i] for i in g.indices]
            n_all.append(len(set.intersection(*sets)) if sets else 0)
            for a, b in itertools.combinations(sets, 2):
                jac.append(len(a & b) / max(1, len(a | b)))
                sa, sb = {x for x in a if not x.startswith("num=")}, {x for x in b if not x.startswith("num=")}
                jac_s.append(len(sa & sb) / max(1, len(sa | sb)))
        out[kind] = {"shared_by_all_mean": float(np.mean(n_all)) if n_all else float("nan"),
                     "pairwise_content_jaccard": float(np.mean(jac)) if jac else float("nan"),
                     "pairwise_string_jaccard": float(np.mean(jac_s)) if jac_s else float("nan")}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# within-group agreement (pure functions)
# ---------------------------------------------------------------------------------------------------------------------
def _iou(a: np.ndarray, b: np.ndarray) -> float:
    if a.size + b.size == 0:
        return float("nan")
    x = np.intersect1d(a, b, assume_unique=True).size
    return x / (a.size + b.size - x)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetrised overlap rate (|A∩B|/|A| + |A∩B|/|B|) / 2; nan if a set is empty."""
    if a.size == 0 or b.size == 0:
        return float("nan")
    x = np.intersect1d(a, b, assume_unique=True).size
    return 0.5 * (x / a.size + x / b.size)


def group_agreement(sets: list[np.ndarray], metric: str = "iou") -> float:
    """Mean over all unordered pairs of the group's sets (nan pairs dropped)."""
    fn = _iou if metric == "iou" else _overlap
    vals = [fn(np.unique(a), np.unique(b)) for a, b in itertools.combinations(sets, 2)]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def diff_ci(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) with a percentile bootstrap CI (a and b resampled independently)."""
    a = np.asarray([x for x in a if not math.isnan(x)], dtype=np.float64)
    b = np.asarray([x for x in b if not math.isnan(x)], dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    ba = a[rng.integers(0, a.size, (n_boot, a.size))].mean(1)
    bb = b[rng.integers(0, b.size, (n_boot, b.size))].mean(1)
    d = ba - bb
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return float(a.mean() - b.mean()), float(lo), float(hi)


def chance_iou(sets: list[np.ndarray], n_layers: int, d_mlp: int, max_pairs: int = 40) -> float:
    """Mean exact expected IoU of independent random sets with the per-layer sizes of each pair (first max_pairs)."""
    from .stats import expected_random_agreement, per_layer_counts

    vals = []
    for a, b in itertools.islice(itertools.combinations(sets, 2), max_pairs):
        if a.size + b.size == 0:
            continue
        vals.append(expected_random_agreement(per_layer_counts(a, n_layers, d_mlp), per_layer_counts(b, n_layers, d_mlp),
                                              d_mlp)["iou"])
    return float(np.mean(vals)) if vals else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class DomainResult:
    domain: str
    groups: dict[str, list[Group]]
    sample_ids: list[str]  # aligned with sets
    sets: list[np.ndarray]  # per scored sample: flat neuron indices (layer * d_mlp + index)
    f: np.ndarray  # per scored sample: objective
    sharing: dict  # measured content sharing per kind
    pool_index: list[int]  # per scored sample: index in the pool

    def _sets_of(self, g: Group) -> list[np.ndarray]:
        pos = {p: k for k, p in enumerate(self.pool_index)}
        return [self.sets[pos[i]] for i in g.indices]

    def per_group(self, metric: str = "iou") -> dict[str, list[float]]:
        return {kind: [group_agreement(self._sets_of(g), metric) for g in gs] for kind, gs in self.groups.items()}


@dataclass
class DecoupleResult:
    """Per domain: groups, per-sample neuron sets, within-group agreement; plus config and provenance."""

    domains: dict[str, DomainResult]
    n_layers: int
    d_mlp: int
    config: dict
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        seed, n_boot = int(self.config.get("seed", 0)), int(self.config.get("n_boot", 2000))
        from .stats import bootstrap_ci

        out = {}
        for name, dr in self.domains.items():
            d: dict[str, Any] = {"sharing": dr.sharing, "n_groups": {k: len(v) for k, v in dr.groups.items()},
                                 "set_size_mean": float(np.mean([s.size for s in dr.sets])) if dr.sets else float("nan")}
            for metric in ("iou", "overlap"):
                pg = dr.per_group(metric)
                m = {}
                for kind in KINDS:
                    v = pg.get(kind, [])
                    est, lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed) if v else (float("nan"),) * 3
                    m[kind] = {"mean": est, "ci": [lo, hi], "per_group": v}
                dd, dlo, dhi = diff_ci(pg.get("commonality", []), pg.get("content", []), n_boot, seed)
                m["commonality_minus_content"] = {"mean": dd, "ci": [dlo, dhi]}
                dd, dlo, dhi = diff_ci(pg.get("content", []), pg.get("random", []), n_boot, seed)
                m["content_minus_random"] = {"mean": dd, "ci": [dlo, dhi]}
                d[metric] = m
            chance = []
            for gs in dr.groups.values():
                for g in gs[:4]:
                    chance.append(chance_iou(dr._sets_of(g), self.n_layers, self.d_mlp, max_pairs=4))
            d["chance_iou"] = float(np.nanmean(chance)) if chance else float("nan")
            c = d["iou"]
            d["follows_commonality"] = bool(c["commonality_minus_content"]["ci"][0] > 0)
            out[name] = d
        return out

    # ---- report ----------------------------------------------------------------------------------------------------
    def report(self, out_dir: Path | str | None = None) -> dict:
        s = self.summary()
        rows, figs, claims, text = [], [], {}, []
        cfg = self.config
        sel = f"sigma={cfg['sigma']}" if cfg["rule"] == "sigma" else f"top-{cfg['topk']}"
        text.append(
            f"Decoupling on {self.meta.get('model_id', '?')}: per-sample neuron sets ({cfg['method']}, {sel} per sample), "
            f"{cfg['n_groups']} groups x {cfg['group_size']} samples per kind; within-group mean pairwise IoU, mean over "
            f"groups with 95% bootstrap CIs over groups (seed {cfg['seed']}, {cfg['n_boot']} resamples).")
        for dom, d in s.items():
            for kind in KINDS:
                v = d["iou"][kind]
                o = d["overlap"][kind]
                sh = d["sharing"].get(kind, {})
                rows.append([dom, kind, d["n_groups"].get(kind, 0), _r(v["mean"]), f"[{_r(v['ci'][0])}, {_r(v['ci'][1])}]",
                             _r(o["mean"]), _r(d["chance_iou"]), _r(sh.get("shared_by_all_mean")),
                             _r(sh.get("pairwise_content_jaccard"))])
            diff = d["iou"]["commonality_minus_content"]
            text.append(
                f"{dom}: commonality IoU {d['iou']['commonality']['mean']:.3f} vs content {d['iou']['content']['mean']:.3f} "
                f"vs random {d['iou']['random']['mean']:.3f} (chance for independent random sets of the same sizes "
                f"{d['chance_iou']:.4f}); commonality - content = {diff['mean']:.3f} [{diff['ci'][0]:.3f}, "
                f"{diff['ci'][1]:.3f}] -> follows commonality: {d['follows_commonality']}. Mean per-sample set size "
                f"{d['set_size_mean']:.1f} neurons.")
            pre = "" if dom == "gsm_symbolic" else "facts_"
            for kind in KINDS:
                v = d["iou"][kind]
                claims[f"{pre}decoupling_{kind}_iou"] = {"value": v["mean"], "ci": v["ci"], "chance": d["chance_iou"]}
            claims[f"{pre}follows_commonality"] = {
                "value": d["follows_commonality"], "commonality_minus_content": diff["mean"], "ci": diff["ci"],
                "criterion": "95% bootstrap CI of (commonality IoU - content IoU) above 0"}
            if out_dir is not None:
                figs.extend(self._figure(Path(out_dir), dom, d))
        for dom, why in (self.meta.get("skipped_domains") or {}).items():
            text.append(f"{dom} was skipped: {why}.")
        if "facts" in s:
            text.append("facts: content groups share the answer (attribute) and commonality groups do not, so the "
                        "target tokens that the attribution objective scores favour content; same-subject groups "
                        "cannot be built (14 subjects occur in 2 relations, none in more).")
        if "gsm_symbolic" in s:
            sh = s["gsm_symbolic"]["sharing"]
            text.append(
                "gsm_symbolic content groups are searched in the generated pool (reasoning-gym cannot render a template "
                "with given values); measured content shared by all members: "
                + ", ".join(f"{k} {v['shared_by_all_mean']:.2f} items (pairwise Jaccard {v['pairwise_content_jaccard']:.2f})"
                            for k, v in sh.items()) + ".")
        return {
            "kind": "decouple", "title": "Decoupling: commonality vs content (paper §4)", "text": text,
            "tables": [{"title": "Within-group agreement of per-sample neuron sets",
                        "columns": ["domain", "groups", "n", "IoU", "95% CI", "overlap", "chance IoU",
                                    "content items shared by all", "pairwise content Jaccard"], "rows": rows,
                        "note": "IoU/overlap: mean over groups of the mean pairwise value; chance: independent random "
                                "sets with the same per-layer sizes (exact expectation)."}],
            "figures": figs, "claims": claims,
        }

    def _figure(self, out_dir: Path, dom: str, d: dict) -> list[dict]:
        from .report.figures import bars_with_ci

        try:
            name = f"fig_decouple_{dom}.png"
            bars_with_ci(list(KINDS), [d["iou"][k]["mean"] for k in KINDS], [d["iou"][k]["ci"][0] for k in KINDS],
                         [d["iou"][k]["ci"][1] for k in KINDS], out_dir / name, chance=d["chance_iou"],
                         title=f"{dom}: within-group IoU", ylabel="mean pairwise IoU")
            return [{"title": f"Decoupling ({dom})", "file": name,
                     "caption": "Within-group IoU of per-sample neuron sets for groups sharing the problem type "
                                "(commonality), sharing content across types, and random groups (95% bootstrap CI)."}]
        except Exception as e:
            log.warning("decoupling figure not written: %s", str(e).splitlines()[0])
            return []

    # ---- save / load ----------------------------------------------------------------------------------------------
    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        t = {}
        js: dict[str, Any] = {"kind": "decouple_result", "caploc_version": __version__, "n_layers": self.n_layers,
                              "d_mlp": self.d_mlp, "config": self.config, "meta": self.meta, "domains": {}}
        for name, dr in self.domains.items():
            sizes = np.array([s.size for s in dr.sets], dtype=np.int64)
            t[f"{name}.offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
            t[f"{name}.flat"] = torch.from_numpy(np.concatenate(dr.sets).astype(np.int64) if dr.sets else
                                                 np.zeros(0, np.int64))
            t[f"{name}.f"] = torch.from_numpy(np.asarray(dr.f, dtype=np.float64))
            js["domains"][name] = {"groups": {k: [g.to_json() for g in v] for k, v in dr.groups.items()},
                                   "sample_ids": dr.sample_ids, "pool_index": dr.pool_index, "sharing": dr.sharing}
        atomic_save_tensors(out_dir / "decouple.safetensors", t)
        atomic_write_json(out_dir / "decouple.json", js)
        atomic_write_json(out_dir / "report.json", self.report(out_dir))
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> "DecoupleResult":
        from .results import read_result

        js, t = read_result(out_dir, "decouple.json", "decouple_result", "decoupling result", "decouple.safetensors")
        doms = {}
        for name, d in js["domains"].items():
            off = t[f"{name}.offsets"].numpy()
            flat = t[f"{name}.flat"].numpy()
            sets = [flat[off[k]:off[k + 1]] for k in range(len(off) - 1)]
            groups = {k: [Group(**g) for g in v] for k, v in d["groups"].items()}
            doms[name] = DomainResult(name, groups, d["sample_ids"], sets, t[f"{name}.f"].numpy(), d["sharing"],
                                      [int(i) for i in d["pool_index"]])
        return cls(doms, int(js["n_layers"]), int(js["d_mlp"]), js["config"], js["meta"])


def _r(v, nd: int = 4):
    if isinstance(v, (float, np.floating)):
        return round(float(v), nd) if math.isfinite(v) else None
    return v


# ---------------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------------
def per_sample_sets(lm, samples, cfg: DecoupleConfig, progress: bool | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Attribute every sample and select its neurons; returns (flat index sets, objectives)."""
    from tqdm.auto import tqdm

    from .attribution.engine import AttributionConfig, Attributor
    from .data import encode
    from .localize import select_sigma, select_topk

    acfg = AttributionConfig(method=cfg.method, steps=cfg.steps, objective=cfg.objective, positions=cfg.positions,
                             batch_size=cfg.batch_size, completeness=False)
    att = Attributor(lm.site, acfg)
    max_len = cfg.max_length or getattr(lm.model.config, "max_position_embeddings", None)
    enc = [encode(lm.tokenizer, s, chat=cfg.chat, max_length=max_len) for s in samples]
    sets, fs = [], []
    with tqdm(total=len(enc), desc=f"decouple ({cfg.method})", unit="sample", leave=False,
              disable=progress is False if progress is not None else None) as bar:
        step = cfg.batch_size if cfg.method != "ig" else 1
        for b in range(0, len(enc), step):
            chunk = enc[b:b + step]
            res = att.score_batch([(e.input_ids, e.prompt_len) for e in chunk])
            scores = torch.stack([r.scores.flatten() for r in res])  # [B, L*d]
            mask = select_sigma(scores, cfg.sigma) if cfg.rule == "sigma" else select_topk(scores, cfg.topk)
            for k, r in enumerate(res):
                sets.append(np.nonzero(mask[k].numpy())[0].astype(np.int64))
                fs.append(r.f)
            bar.update(len(chunk))
    return sets, np.asarray(fs, dtype=np.float64)


def decouple(lm, cfg: DecoupleConfig | None = None, out_dir: Path | str | None = None,
             progress: bool | None = None) -> DecoupleResult:
    """Build the comparative groups of every domain, localize every member, and measure within-group agreement."""
    cfg = cfg or DecoupleConfig()
    t0 = time.time()
    doms = {}
    timing = {}
    skipped: dict[str, str] = {}
    for domain in cfg.domains:
        t1 = time.time()
        pool, groups, items = build_groups(domain, cfg)
        missing = [k for k in ("commonality", "content") if len(groups[k]) < 2]
        if missing:
            why = (f"fewer than 2 {' / '.join(missing)} groups of {cfg.group_size} can be built from this data "
                   f"({ {k: len(v) for k, v in groups.items()} })")
            log.warning("%s skipped: %s", domain, why)
            skipped[domain] = why
            continue
        idx = sorted({i for gs in groups.values() for g in gs for i in g.indices})
        samples = [pool[i] for i in idx]
        log.info("%s: %d groups, %d samples to localize", domain, sum(len(v) for v in groups.values()), len(samples))
        sets, fs = per_sample_sets(lm, samples, cfg, progress)
        doms[domain] = DomainResult(domain, groups, [s.id for s in samples], sets, fs,
                                    content_sharing(groups, items), idx)
        timing[domain] = round(time.time() - t1, 1)
    if not doms:
        raise DataError(f"no domain has enough comparative groups ({'; '.join(f'{k}: {v}' for k, v in skipped.items())}); "
                        "lower --group-size or raise --pool-size")
    meta = {"model_id": lm.info.get("model_id"), "model_fingerprint": lm.info.get("fingerprint"),
            "model_type": lm.site.model_type, "neuron_site": lm.site.describe()["neuron_site"],
            "seconds": round(time.time() - t0, 1), "seconds_per_domain": timing, "skipped_domains": skipped}
    res = DecoupleResult(doms, lm.site.n_layers, lm.site.d_mlp, cfg.to_dict(), meta)
    if out_dir is not None:
        res.save(out_dir)
    return res


__all__ = [
    "DecoupleConfig", "DecoupleResult", "DomainResult", "Group", "decouple", "build_groups", "gsm_groups",
    "fact_groups", "content_items", "content_sharing", "group_agreement", "diff_ci", "chance_iou", "per_sample_sets",
]
