"""The comparative groups of the decoupling study (paper §4, :mod:`caploc.stages.decouple`), all built
deterministically from a seed; every group is checked to be what it claims:

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

Pure functions of the pools (Datasets); no model is needed.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("commonality", "content", "random")
_NUM_RE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?![\w])")


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


__all__ = ["Group", "KINDS", "content_items", "content_sharing", "fact_groups", "gsm_groups"]
