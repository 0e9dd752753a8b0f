"""The paper-claim table of a study: each claim of Huang et al. (ICLR 2025) next to what the run measured.

Rows are read from the ``claims`` of the stage reports under a study directory. A verdict is "reproduced", "differs"
(our measurement does not support the paper's number or conclusion on this model and these settings), "insufficient
controls" (a claim judged against fewer random sets than its stage requires), or "not run".
"""
from __future__ import annotations

import json
from pathlib import Path

INSUFFICIENT = "insufficient controls"


def _claims_by_kind(out: Path) -> dict[str, dict]:
    """All claims found in stage report.json files, keyed by stage name (first path component)."""
    found: dict[str, dict] = {}
    for p in sorted(out.rglob("report.json")):
        rel = p.relative_to(out).parts
        if rel[0] in ("report", "claims"):
            continue
        try:
            rep = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        key = "/".join(rel[:-1])
        found[key] = rep.get("claims") or {}
    return found


def _val(c):
    if isinstance(c, dict):
        for k in ("value", "mean", "estimate", "iou", "effect"):
            if k in c:
                return c[k]
        return None
    return c


def _num(x) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _ours(c) -> str:
    """A claim dict in one readable line: value [CI] vs the random/null distribution, z, p, sizes."""
    if not isinstance(c, dict):
        return _num(c)
    parts = [_num(_val(c))]
    ci = c.get("ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        parts[0] += f" [{_num(ci[0])}, {_num(ci[1])}]"
    mean = c.get("chance", c.get("null_mean"))
    sd = c.get("chance_sd", c.get("null_sd"))
    n = c.get("n_random", c.get("n_null"))
    if mean is not None:
        parts.append(f"random {_num(mean)}" + (f" ± {_num(sd)}" if sd is not None else "")
                     + (f" (n = {n})" if n is not None else ""))
    for key, label in (("z", "z"), ("z_on", "z on"), ("z_off", "z off"), ("p", "permutation p (one-sided)"),
                       ("p_two_sided", "two-sided permutation p"),
                       ("k", "k"), ("dataset", "on"), ("worst_off", "worst off-target"), ("best_method", "best")):
        if key in c and c[key] is not None:
            v = c[key]
            if isinstance(v, dict):  # e.g. {"method": ..., "iou": ..., "ci": [...]}
                v = ", ".join(f"{kk} {_num(vv) if not isinstance(vv, list) else '[' + ', '.join(map(_num, vv)) + ']'}"
                              for kk, vv in v.items())
            else:
                v = _num(v)
            parts.append(f"{label}: {v}" if isinstance(c[key], dict) else f"{label} {v}")
    return "; ".join(parts)


def _holds(c) -> bool:
    return _val(c) is True or (isinstance(c, dict) and (c.get("holds") is True or c.get("beats") is True))


def _verdict(c) -> str:
    """reproduced / differs, or the claim's own "insufficient controls" when it was not decided."""
    if isinstance(c, dict) and (c.get("verdict") == INSUFFICIENT or ("holds" in c and c.get("holds") is None
                                                                     and "beats" not in c)):
        return INSUFFICIENT
    return "reproduced" if _holds(c) else "differs"


def _pct(x):
    return "—" if x is None else f"{100 * float(x):.2f} %"


def _find(claims: dict[str, dict], stage_prefix: str, key: str):
    for k, c in claims.items():
        if k.split("/")[0] == stage_prefix and key in c:
            return c[key], k
    return None, None


def claim_table(out: Path) -> dict:
    """Paper claim -> our result, with a plain verdict per row."""
    claims = _claims_by_kind(out)
    rows = []

    def add(claim, paper, ours, verdict, source):
        rows.append([claim, paper, ours, verdict, source or "—"])

    ov, src = _find(claims, "stability", "split_overlap")
    io, _ = _find(claims, "stability", "split_iou")
    ch, _ = _find(claims, "stability", "chance_iou")
    if ov is not None or io is not None:
        v_io = _val(io)
        ci = io.get("ci") if isinstance(io, dict) else None
        ours = (f"overlap {_pct(_val(ov))}, IoU {_pct(v_io)}" + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")
                + f"; chance IoU {_pct(_val(ch))}")
        verdict = ("reproduced" if v_io is not None and v_io >= 0.9 else
                   "differs: agreement far above chance but below the paper" if v_io is not None and _val(ch) is not None
                   and v_io > 5 * max(_val(ch), 1e-9) else "differs")
        add("Neurons located on different splits agree", "overlap 96.42 %, IoU 95.95 % (GSM8K)", ours, verdict, src)
    else:
        add("Neurons located on different splits agree", "overlap 96.42 %, IoU 95.95 %", "not run", "not run", None)

    sp, src = _find(claims, "locate", "share_of_params")
    spv = _val(sp)
    add("Capability neurons are a small share of parameters", "~0.15 % of parameters", _pct(spv),
        "not run" if spv is None else ("same order" if 0.0005 <= spv <= 0.005 else
                                       "differs: smaller set" if spv < 0.0005 else "differs: larger set"), src)

    for key, claim in (("erase_beats_random", "Erasing the neurons hurts the capability more than random neurons"),
                       ("enhance_beats_random", "Enhancing the neurons helps the capability more than random neurons")):
        found = [(k, c[key]) for k, c in claims.items() if k.startswith("intervene") and key in c]
        if not found:
            add(claim, "yes", "not run", "not run", None)
        for k, c in found:
            add(claim + f" ({k.split('/')[-1]} set)", "yes", "ΔNLL/token " + _ours(c), _verdict(c), k)
    spec = [(k, c["specificity"]) for k, c in claims.items() if k.startswith("intervene") and "specificity" in c]
    for k, c in spec:
        add(f"The effect is specific to the capability ({k.split('/')[-1]} set)", "implied",
            "specificity index " + _ours(c), _verdict(c), k)

    ft, src = _find(claims, "finetune", "finetune_beats_random")
    add("Fine-tuning only the neurons beats random neurons", "yes",
        "not run" if ft is None else "ΔNLL/token after tuning " + _ours(ft),
        "not run" if ft is None else _verdict(ft),
        src)

    fl, src = _find(claims, "audit", "facts_localizable")
    add("Individual facts cannot be reliably localized", "low fidelity across paraphrases",
        "not run" if fl is None else f"facts localizable: {_ours(fl)}",
        "not run" if fl is None else ("reproduced" if _val(fl) is False or (isinstance(fl, dict) and fl.get("value") is False)
                                      else "differs"), src)

    fc, src = _find(claims, "decouple", "follows_commonality")
    cm, _ = _find(claims, "decouple", "decoupling_commonality_iou")
    ct, _ = _find(claims, "decouple", "decoupling_content_iou")
    add("Localized sets follow shared commonality, not shared content", "yes",
        "not run" if fc is None else (f"commonality IoU {_ours(cm)}; content IoU {_ours(ct)}; "
                                      f"difference {_ours({'value': fc.get('commonality_minus_content'), 'ci': fc.get('ci')}) if isinstance(fc, dict) else fc}"),
        "not run" if fc is None else ("reproduced" if _val(fc) is True else "differs"), src)
    return {"columns": ["paper claim", "paper", "ours", "verdict", "source"], "rows": rows}
