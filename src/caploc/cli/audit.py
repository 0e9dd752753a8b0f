"""``caploc audit``: can KN, causal tracing, CNL or circuits localize ONE fact? (fidelity and reliability)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, console, load_model_from_opts, parse_layers


@app.command()
def audit(
    model: str = typer.Option("smollm2-135m", help="Built-in 'smollm2-135m', a local HF model dir, a cached HF id, or tiny:<arch>."),
    facts: str = typer.Option("facts", help="Built-in 'facts' (ROME known facts + paraphrases) or a .json/.jsonl/.csv/.parquet file with prompt, target, paraphrases[, subject]."),
    n_facts: int = typer.Option(50, help="Number of facts to audit (after the known filter)."),
    methods: str = typer.Option("kn,tracing,cnl", help="Comma list of kn, tracing, cnl, circuits."),
    seed: int = typer.Option(0, help="Seed of the fact order, noise, random controls and bootstrap."),
    prompt_field: Optional[str] = typer.Option(None, help="Prompt column of a facts file."),
    target_field: Optional[str] = typer.Option(None, help="Target column of a facts file."),
    max_phrasings: Optional[int] = typer.Option(None, help="Keep at most this many phrasings per fact (cost control)."),
    known: str = typer.Option("prob", help="Known-fact filter: none | prob (P(first target token) >= threshold) | topk."),
    known_threshold: float = typer.Option(0.05, help="prob filter threshold."),
    known_topk: int = typer.Option(10, help="topk filter: target token among the model's top k."),
    known_on: str = typer.Option("prompt", help="Apply the filter to the original prompt only, or to all phrasings."),
    steps: int = typer.Option(20, help="KN: IG steps m."),
    alphas: str = typer.Option("right", help="KN: IG points right | linspace | midpoint."),
    kn_t: float = typer.Option(0.2, help="KN: coarse neurons Attr > t * max."),
    kn_p: float = typer.Option(0.5, help="KN: sharing fraction for refinement."),
    share_rule: str = typer.Option("gt", help="KN refinement: gt (count > p*n, Dai et al.) or ge (count >= p*n)."),
    layers: Optional[str] = typer.Option(None, help="KN/CNL: layers to score, e.g. '10-29' (default all)."),
    enhance: float = typer.Option(2.0, help="Enhancement factor for KN/CNL neurons."),
    intervene_positions: str = typer.Option("last", help="KN/CNL manipulation at the last prompt position or all positions."),
    n_random: int = typer.Option(5, help="Random-set seeds per fact for the reliability baselines."),
    cnl_method: str = typer.Option("grad_x_act", help="CNL per phrasing: grad_x_act | ig."),
    cnl_sigma: float = typer.Option(6.0, help="CNL per phrasing: Attr > mean + sigma * sd."),
    noise_samples: int = typer.Option(5, help="Tracing: noise samples per phrasing (ROME: 10)."),
    noise_mult: float = typer.Option(3.0, help="Tracing: noise sd = this x sd of the embedding entries."),
    trace_kinds: str = typer.Option("hidden,mlp,attn", help="Tracing: restored states."),
    trace_tokens: str = typer.Option("subject", help="Tracing: restore at subject (all subject tokens + last token) | key (last subject token + last token) | all."),
    window: int = typer.Option(1, help="Tracing: layers restored together for mlp/attn (ROME figures: 10)."),
    circuit_top_k: Optional[int] = typer.Option(None, help="Circuits: edges per circuit (caploc.audit.circuits' top_k)."),
    criterion: float = typer.Option(0.5, help="facts_localizable: paraphrase IoU CI lower bound needed."),
    save_scores: bool = typer.Option(True, help="Keep per-phrasing KN scores (float16) in the result."),
    chat: bool = typer.Option(False, help="Wrap prompts in the tokenizer's chat template."),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu", help="cpu | auto | an accelerator name"),
    layout: Optional[str] = typer.Option(None, help="Custom MLP layout for unknown architectures."),
    out: Path = typer.Option(Path("runs/audit"), help="Output directory."),
    overwrite: bool = typer.Option(False, help="Recompute every fact instead of resuming."),
    report_only: bool = typer.Option(False, help="Only (re)write report.json + figures from the facts finished in --out (also while a run is going)."),
):
    """Audit individual-fact localization: fidelity across paraphrases and reliability of each method's manipulation."""
    from ..audit.kn import KNConfig
    from ..audit.run import AuditConfig, run_audit
    from ..audit.tracing import TracingConfig
    from ..data import load_dataset

    if report_only:
        from ..audit.run import AuditResult

        res = AuditResult.load(out, allow_partial=True)
        res.write_report(out)
        print_audit(res)
        console.print(f"{'finished' if res.complete else 'UNFINISHED'} audit: {len(res.records)} facts; "
                      f"wrote {out}/report.json and figures")
        return
    kcfg = KNConfig(steps=steps, alphas=alphas, t=kn_t, p=kn_p, share_rule=share_rule, layers=parse_layers(layers),
                    enhance=enhance, positions=intervene_positions)
    tcfg = TracingConfig(noise_mult=noise_mult, n_noise=noise_samples,
                         kinds=tuple(k.strip() for k in trace_kinds.split(",") if k.strip()), tokens=trace_tokens,
                         window=window)
    cfg = AuditConfig(methods=tuple(methods.split(",")), n_facts=n_facts, seed=seed, max_phrasings=max_phrasings,
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
        console.print(tab)
    fl = rep["claims"]["facts_localizable"]
    console.print(f"facts_localizable = {fl['value']}  ({fl['criterion']})")
