"""``caploc audit``: can KN, causal tracing, CNL or circuits localize ONE fact? (fidelity and reliability)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..stages.audit.config import AuditConfig, CircuitConfig, KNConfig, TracingConfig
from .app import app, console, load_model_from_opts, parse_layers, print_table
from .options import opt, split_list

A, K, T = AuditConfig, KNConfig, TracingConfig


@app.command()
def audit(
    model: str = typer.Option("smollm2-135m", help="Built-in 'smollm2-135m', a local HF model dir, a cached HF id, or tiny:<arch>."),
    facts: str = typer.Option("facts", help="Built-in 'facts' (ROME known facts + paraphrases) or a .json/.jsonl/.csv/.parquet file with prompt, target, paraphrases[, subject]."),
    n_facts: int = opt(A, "n_facts"),
    methods: str = opt(A, "methods"),
    seed: int = opt(A, "seed"),
    prompt_field: Optional[str] = typer.Option(None, help="Prompt column of a facts file."),
    target_field: Optional[str] = typer.Option(None, help="Target column of a facts file."),
    max_phrasings: Optional[int] = opt(A, "max_phrasings"),
    known: str = opt(A, "known"),
    known_threshold: float = opt(A, "known_threshold"),
    known_topk: int = opt(A, "known_topk"),
    known_on: str = opt(A, "known_on"),
    steps: int = opt(K, "steps"),
    alphas: str = opt(K, "alphas"),
    kn_t: float = opt(K, "t", "--kn-t"),
    kn_p: float = opt(K, "p", "--kn-p"),
    share_rule: str = opt(K, "share_rule"),
    layers: Optional[str] = opt(K, "layers"),
    enhance: float = opt(K, "enhance"),
    intervene_positions: str = opt(K, "positions", "--intervene-positions"),
    n_random: int = opt(A, "n_random"),
    cnl_method: str = opt(A, "cnl_method"),
    cnl_sigma: float = opt(A, "cnl_sigma"),
    noise_samples: int = opt(T, "n_noise", "--noise-samples"),
    noise_mult: float = opt(T, "noise_mult"),
    trace_kinds: str = opt(T, "kinds", "--trace-kinds"),
    trace_tokens: str = opt(T, "tokens", "--trace-tokens"),
    window: int = opt(T, "window"),
    # default None: keep the circuit settings' own default unless the flag is given
    circuit_top_k: Optional[int] = opt(CircuitConfig, "top_k", "--circuit-top-k", default=None),
    criterion: float = opt(A, "fidelity_criterion", "--criterion"),
    save_scores: bool = opt(A, "save_scores"),
    chat: bool = opt(A, "chat"),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu", help="cpu | auto | an accelerator name"),
    layout: Optional[str] = typer.Option(None, help="Custom MLP layout for unknown architectures."),
    out: Path = typer.Option(Path("runs/audit"), help="Output directory."),
    overwrite: bool = typer.Option(False, help="Recompute every fact instead of resuming."),
    report_only: bool = typer.Option(False, help="Only (re)write report.json + figures from the facts finished in --out (also while a run is going)."),
):
    """Audit individual-fact localization: fidelity across paraphrases and reliability of each method's manipulation."""
    from ..data import load_dataset
    from ..stages.audit import AuditResult, run_audit

    if report_only:
        res = AuditResult.load(out, allow_partial=True)
        res.write_report(out)
        print_audit(res)
        console.print(f"{'finished' if res.complete else 'UNFINISHED'} audit: {len(res.records)} facts; "
                      f"wrote {out}/report.json and figures")
        return
    kcfg = KNConfig(steps=steps, alphas=alphas, t=kn_t, p=kn_p, share_rule=share_rule, layers=parse_layers(layers),
                    enhance=enhance, positions=intervene_positions)
    tcfg = TracingConfig(noise_mult=noise_mult, n_noise=noise_samples, kinds=tuple(split_list(trace_kinds)),
                         tokens=trace_tokens, window=window)
    cfg = AuditConfig(methods=tuple(split_list(methods)), n_facts=n_facts, seed=seed, max_phrasings=max_phrasings,
                      known=known, known_threshold=known_threshold, known_topk=known_topk, known_on=known_on, kn=kcfg,
                      tracing=tcfg, cnl_method=cnl_method, cnl_sigma=cnl_sigma, n_random=n_random,
                      fidelity_criterion=criterion, save_scores=save_scores, chat=chat,
                      circuits={"top_k": circuit_top_k} if circuit_top_k else {})
    ds = load_dataset(facts, seed=seed, prompt_field=prompt_field, target_field=target_field)
    lm = load_model_from_opts(model, dtype, device, None, layout)
    res = run_audit(lm, ds, cfg, out, overwrite=overwrite)
    print_audit(res)
    console.print(f"wrote {out}/audit.json, report.json, facts/ and figures")


def print_audit(res) -> None:
    from rich.table import Table

    rep = res.report()
    keep = {0: [0, 2, 3, 4, 5, 6], 1: [0, 1, 2, 3, 5], 2: [0, 1, 2, 3, 4, 5, 6]}  # compact columns for a terminal
    for k, t in enumerate(rep["tables"][:3]):
        cols = [c for c in keep.get(k, range(len(t["columns"]))) if c < len(t["columns"])]
        tab = Table(*[t["columns"][c] for c in cols], title=t["title"], title_justify="left", show_lines=False)
        for r in t["rows"]:
            tab.add_row(*[str(r[c]) for c in cols])
        print_table(tab)
    fl = rep["claims"]["facts_localizable"]
    console.print(f"facts_localizable = {fl['value']}  ({fl['criterion']})")
