"""caploc report: discovery, sections, self-contained HTML, Markdown, JSON, figures helpers, CLI, headless Chromium."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from caploc.errors import CaplocError
from caploc.report import build_report, register_renderer
from caploc.report import figures as F
from caploc.report.build import RENDERERS
from caploc.results import NeuronSet, atomic_write_json

L, D, N = 4, 32, 10


def _neuron_set(out: Path, seed: int = 0, dataset: str = "toy_arith") -> NeuronSet:
    """A locate-style neuron set by hand: per-neuron selection counts of N samples, kept when count >= S = 6."""
    rng = np.random.default_rng(seed)
    counts = rng.binomial(N, 0.1, size=L * D)
    hot = rng.choice(L * D, 9, replace=False)
    counts[hot] = rng.integers(6, N + 1, size=9)
    sel = np.nonzero(counts >= 6)[0]
    ns = NeuronSet.from_flat(sel, L, D, frequency=counts[sel] / N, mean_score=rng.random(len(sel)), counts=counts,
                             n_samples=N, meta={
                                 "model_id": "tiny:llama", "model_type": "llama", "neuron_site": "input of mlp.down_proj",
                                 "dataset": dataset, "dataset_fingerprint": "f00d", "dataset_source": {"seed": 0},
                                 "method": "ig", "config": {"attribution": {"method": "ig", "steps": 2}},
                                 "params_per_neuron": 96, "total_params": 31456, "rule": "sigma", "rule_value": 6.0,
                                 "min_freq": 0.6, "min_count": 6, "per_sample_selected_mean": 3.5})
    ns.save(out)
    return ns


def _hand_report(d: Path, missing_figure: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    F.heatmap(np.array([[1.0, 0.4], [0.4, 1.0]]), ["gsm", "code"], d / "fig_iou.png", "split IoU", chance=0.01)
    figs = [{"title": "Split IoU", "file": "fig_iou.png", "caption": "IoU of neuron sets between splits"}]
    if missing_figure:
        figs.append({"title": "Dose response", "file": "fig_dose.png", "caption": "never written"})
    atomic_write_json(d / "report.json", {
        "kind": "stability", "title": "Stability of toy neurons",
        "text": ["Overlap is high; method as in http://example.org/paper <script>alert(1)</script>."],
        "tables": [{"title": "Split agreement", "columns": ["split", "overlap", "iou"],
                    "rows": [["random", 0.9642, 0.9595], ["template | disjoint", 0.91, None]], "note": "3 seeds"}],
        "figures": figs,
        "claims": {"split_iou": {"value": 0.9595, "ci": [0.93, 0.97], "chance": 0.0004, "n_seeds": 3},
                   "overlap_rate": 0.9642},
    })
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _neuron_set(root / "locate-a")
    _hand_report(root / "stab")
    return root


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report([runs], out, title="Toy report"), out


# ---------------------------------------------------------------------------------------------------------------------
def test_html_is_self_contained_with_every_table_figure_and_claim(built, runs):
    paths, out = built
    html = paths.html.read_text()
    # every figure embedded: 2 generated for the locate dir + 1 from report.json
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 3
    assert base64.b64decode(uris[2]) == (runs / "stab" / "fig_iou.png").read_bytes()  # stability sorts after locate
    assert all(base64.b64decode(u).startswith(b"\x89PNG") for u in uris)
    # no external resource at all; the only URL is the one inside the report's own text (escaped, not a link)
    assert re.findall(r"https?://[^\s<\"']+", html) == ["http://example.org/paper"]
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", html) and "url(" not in html and "@import" not in html
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # tables
    for s in ("Split agreement", "0.9642", "template | disjoint", "3 seeds", "Neuron set", "Per-layer distribution",
              "min_freq 0.6 -&gt; S = 6 of 10 samples", "tiny:llama"):
        assert s in html, s
    # the claims overview comes first and holds every section's claims
    claims_at, first_section = html.index('<section id="claims">'), html.index('<section id="sec-1-locate">')
    assert claims_at < first_section
    claims_html = html[claims_at:first_section]
    for s in ("split_iou", "[0.93, 0.97]", "0.0004", "n_seeds=3", "overlap_rate", "n_neurons", "share_of_params"):
        assert s in claims_html, s
    assert 'data-images-total' not in html.split("<script>")[0]  # set by the script at load time, not hard-coded


def test_markdown_and_json(built, runs):
    paths, out = built
    md = paths.md.read_text()
    assert md.startswith("# Toy report")
    assert "| split | overlap | iou |" in md and "| template \\| disjoint | 0.91 | – |" in md
    refs = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", md)
    assert len(refs) == 3 and all((out / r).is_file() for r in refs)
    assert md.index("## Claims") < md.index("## Localized neurons")
    data = json.loads(paths.json.read_text())
    assert [s["kind"] for s in data["sections"]] == ["locate", "stability"]
    stab = data["sections"][1]
    assert stab["tables"][0]["rows"][1] == ["template | disjoint", 0.91, None]
    assert stab["source"].endswith("stab") and stab["figures"][0]["file"].startswith("figures/")
    assert {c["claim"] for c in data["claims"]} >= {"split_iou", "overlap_rate", "n_neurons", "share_of_neurons"}
    loc = data["sections"][0]
    ns = NeuronSet.load(runs / "locate-a")
    assert loc["claims"]["n_neurons"]["value"] == len(ns)
    per_layer = {r[0]: r[1] for r in loc["tables"][1]["rows"]}
    assert per_layer == {l: int(c) for l, c in enumerate(ns.per_layer_counts()) if c}


def test_rerender_is_byte_stable_and_order_independent(runs, tmp_path, built):
    extra = tmp_path / "extra" / "intervene"
    extra.mkdir(parents=True)
    shutil.copy(runs / "stab" / "fig_iou.png", extra / "fig.png")
    atomic_write_json(extra / "report.json", {"kind": "intervene", "figures": [{"title": "f", "file": "fig.png"}],
                                              "claims": {"erase_delta_nll": {"value": 1.5, "chance": 0.0}}})
    a = build_report([runs, tmp_path / "extra"], tmp_path / "a")
    b = build_report([tmp_path / "extra", runs], tmp_path / "b")
    ja, jb = json.loads(a.json.read_text()), json.loads(b.json.read_text())
    assert ja["sections"] == jb["sections"]  # by kind, then path, whatever the argument order
    assert [s["kind"] for s in ja["sections"]] == ["locate", "stability", "intervene"]  # pipeline order
    assert ja["sections"][2]["title"] == "intervene: intervene"  # default title: kind and directory
    assert sorted(p.name for p in (tmp_path / "a" / "figures").iterdir()) == \
        sorted(p.name for p in (tmp_path / "b" / "figures").iterdir())
    for p in (tmp_path / "a" / "figures").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / "figures" / p.name).read_bytes()
    c = build_report([runs, tmp_path / "extra"], tmp_path / "a")  # same out again: identical bytes, no stale figures
    assert c.html.read_bytes() == a.html.read_bytes()


def test_out_dir_files_it_did_not_write_are_never_deleted_or_overwritten(runs, tmp_path):
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    png = (runs / "stab" / "fig_iou.png").read_bytes()
    mine = {out / "figures" / "my_plot.png": png, out / "figures" / "notes.txt": b"keep", out / "data.csv": b"1,2"}
    for p, b in mine.items():
        p.write_bytes(b)
    first = build_report([runs], out)
    manifest = json.loads((out / ".caploc_report_manifest.json").read_text())
    ours = {f for f in manifest["files"] if f.startswith("figures/")}
    assert len(ours) == 3 and {"report.html", "report.md", "report_data.json"} <= set(manifest["files"])
    assert all(p.read_bytes() == b for p, b in mine.items())  # the user's files, even a PNG in figures/, untouched
    # a rebuild with fewer sections removes only the figures the earlier report wrote and no longer needs
    build_report([runs / "stab"], out)
    kept = {f for f in json.loads((out / ".caploc_report_manifest.json").read_text())["files"]
            if f.startswith("figures/")}
    assert len(kept) == 1  # the earlier report's three figures are gone (numbered by section: names differ)
    assert {p.name for p in (out / "figures").iterdir()} == {Path(f).name for f in kept} | {"my_plot.png", "notes.txt"}
    assert all(p.read_bytes() == b for p, b in mine.items())
    assert first.html.exists()
    # an existing file with one of the report's names that no report wrote is refused, not overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.md").write_text("my notes")
    with pytest.raises(CaplocError, match="not written by caploc report"):
        build_report([runs], other)
    assert (other / "report.md").read_text() == "my notes" and not (other / "report.html").exists()
    # the same for a figure name of the report
    fig_name = next(iter(sorted(ours)))
    third = tmp_path / "third"
    (third / "figures").mkdir(parents=True)
    (third / fig_name).write_bytes(b"not ours")
    with pytest.raises(CaplocError, match="not written by caploc report"):
        build_report([runs], third)
    assert (third / fig_name).read_bytes() == b"not ours"


def test_sections_in_pipeline_order_and_claims_grouped_by_section(tmp_path):
    root = tmp_path / "runs"
    for kind in ("zzz_custom", "audit", "finetune", "stability", "locate", "intervention"):
        atomic_write_json(root / kind / "report.json", {"kind": kind, "title": f"T {kind}",
                                                        "claims": {f"{kind}_a": 1.0, f"{kind}_b": {"value": 2}}})
    paths = build_report([root], tmp_path / "out")
    order = ["locate", "stability", "intervention", "finetune", "audit", "zzz_custom"]
    assert [s["kind"] for s in json.loads(paths.json.read_text())["sections"]] == order
    html = paths.html.read_text()
    claims_html = html[html.index('<section id="claims">'):html.index("</section>")]
    heads = re.findall(r'<tr class="grp"><th colspan="5"><a href="#([^"]+)">T (\w+)</a>', claims_html)
    assert [k for _, k in heads] == order and all(f"sec-{i}-" in a for i, (a, _) in enumerate(heads, 1))
    for i, k in enumerate(order):  # each section's claims sit under its own header
        block = claims_html.split('<tr class="grp">')[i + 1]
        assert f"{k}_a" in block and f"{k}_b" in block and sum(f"_{x}<" in block for x in "ab") == 2
    md = paths.md.read_text()
    md_claims = md[md.index("## Claims"):md.index("## T locate")]
    assert [md_claims.index(f"**T {k}**") for k in order] == sorted(md_claims.index(f"**T {k}**") for k in order)


def test_errors_are_one_line(tmp_path):
    with pytest.raises(CaplocError, match="does not exist") as e:
        build_report([tmp_path / "nope"], tmp_path / "out")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaplocError, match="no report.json or caploc result"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{not json")
    with pytest.raises(CaplocError, match="not valid JSON") as e:
        build_report([tmp_path / "bad"], tmp_path / "out")
    assert "\n" not in str(e.value)
    (tmp_path / "bad" / "report.json").write_text(json.dumps({"title": "no kind"}))
    with pytest.raises(CaplocError, match="no \"kind\""):
        build_report([tmp_path / "bad"], tmp_path / "out")
    (tmp_path / "bad" / "report.json").write_text(json.dumps(
        {"kind": "x", "tables": [{"title": "t", "columns": ["a", "b"], "rows": [[1]]}]}))
    with pytest.raises(CaplocError, match="row 0 has 1 cells, expected 2") as e:
        build_report([tmp_path / "bad"], tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "report.html").exists()  # nothing half-written


def test_missing_figure_is_a_visible_placeholder_or_an_error_with_strict(tmp_path, caplog):
    _hand_report(tmp_path / "run", missing_figure=True)
    paths = build_report([tmp_path / "run"], tmp_path / "out")
    html = paths.html.read_text()
    assert "Figure missing: Dose response" in html and "fig_dose.png is missing" in html
    assert "1 figure(s) missing" in html and html.count("<img ") == 1
    assert "> **Figure missing: Dose response**" in paths.md.read_text()
    fig = json.loads(paths.json.read_text())["sections"][0]["figures"][1]
    assert fig["file"] is None and "missing" in fig["missing"]
    assert any("fig_dose.png" in r.message for r in caplog.records)
    with pytest.raises(CaplocError, match="1 figure\\(s\\) missing.*--strict") as e:
        build_report([tmp_path / "run"], tmp_path / "out2", strict=True)
    assert "\n" not in str(e.value)
    (tmp_path / "run" / "fig_dose.png").write_text("not a png")
    paths = build_report([tmp_path / "run"], tmp_path / "out")
    assert "is not a valid PNG image" in paths.html.read_text()


def test_reported_stage_stands_for_its_unreported_sub_results(tmp_path):
    _hand_report(tmp_path / "stage")
    _neuron_set(tmp_path / "stage" / "split-0")  # an inner neuron set without report.json
    data = json.loads(build_report([tmp_path / "stage"], tmp_path / "o1").json.read_text())
    assert [s["kind"] for s in data["sections"]] == ["stability"]
    data = json.loads(build_report([tmp_path / "stage" / "split-0"], tmp_path / "o2").json.read_text())
    assert [s["kind"] for s in data["sections"]] == ["locate"]
    # a previous report inside the scanned tree is not picked up again
    data = json.loads(build_report([tmp_path], tmp_path / "o1").json.read_text())
    assert len(data["sections"]) == 1


def test_locate_report_json_keeps_stage_content_and_adds_generated(tmp_path):
    _neuron_set(tmp_path / "loc")
    atomic_write_json(tmp_path / "loc" / "report.json", {
        "kind": "locate", "title": "My locate", "text": ["stage text"],
        "figures": [{"title": "Neurons per layer", "file": "mine.png"}], "claims": {"n_neurons": {"value": -1}}})
    F.per_layer_bars([1, 2, 3, 4], tmp_path / "loc" / "mine.png", d_mlp=D)
    sec = json.loads(build_report([tmp_path / "loc"], tmp_path / "o").json.read_text())["sections"][0]
    assert sec["title"] == "My locate" and sec["text"] == ["stage text"]
    assert [f["title"] for f in sec["figures"]] == ["Neurons per layer", "Selection-count histogram"]
    assert sec["figures"][0]["source_file"] == "mine.png" and sec["figures"][1]["source_file"] is None
    assert sec["claims"]["n_neurons"]["value"] == -1  # the stage's own claim wins


def test_register_renderer_for_a_new_kind(tmp_path):
    def render_toy(run_dir, report, fig_dir):
        f = F.bars_with_ci(["a", "b"], [0.5, 0.7], [0.4, 0.6], [0.6, 0.8], fig_dir / "acc.png", chance=0.25)
        return {**report, "figures": [{"title": "Accuracy", "file": str(f), "generated": True}]}

    register_renderer("toy_kind", render_toy)
    try:
        (tmp_path / "r").mkdir()
        atomic_write_json(tmp_path / "r" / "report.json", {"kind": "toy_kind", "title": "Toy"})
        paths = build_report([tmp_path / "r"], tmp_path / "o")
        assert paths.html.read_text().count("data:image/png;base64,") == 1
    finally:
        RENDERERS.pop("toy_kind")


def test_cli_prints_paths(runs, tmp_path, capsys):
    from caploc.cli import main

    assert main(["report", str(runs), "--out", str(tmp_path / "o"), "--title", "CLI"]) == 0
    out = capsys.readouterr().out
    for name in ("report.html", "report.md", "report_data.json"):
        assert str(tmp_path / "o" / name) in out.replace("\n", "")
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) <= 2  # one line (may soft-wrap once)


# ---------------------------------------------------------------------------------------------------------------------
def test_figure_helpers_write_deterministic_pngs(tmp_path):
    rng = np.random.default_rng(0)
    calls = {
        "heat": lambda p: F.heatmap(np.array([[1, 0.2, np.nan], [0.2, 1, 0.3]]), (["a", "b"], ["x", "y", "z"]), p,
                                    "m", chance=0.1),
        "curves": lambda p: F.curves([0, 1, 2], {"set": [1, 2, 3], "random": [1, 1, 1]}, p, "k", "NLL", chance=1.0,
                                     bands={"random": ([0.9] * 3, [1.1] * 3)}),
        "bars": lambda p: F.bars_with_ci(["a", "b"], [0.5, 0.7], [0.4, 0.6], [0.6, 0.8], p, chance=0.25),
        "layers": lambda p: F.per_layer_bars([0, 3, 1], p, d_mlp=8),
        "null": lambda p: F.null_histogram(rng.normal(size=50), 3.0, p, xlabel="dNLL"),
        "counts": lambda p: F.count_histogram([0, 0, 1, 5, 6], p, n_samples=6, threshold=5),
    }
    for name, fn in calls.items():
        p1 = fn(tmp_path / f"{name}.png")
        blob = p1.read_bytes()
        assert blob.startswith(b"\x89PNG") and b"Software" not in blob and b"tIME" not in blob, name
        if name in ("heat", "counts"):  # re-render: same bytes (the locate figures are checked in the build test)
            assert fn(tmp_path / f"{name}2.png").read_bytes() == blob, name
    with pytest.raises(CaplocError, match="labels"):
        F.heatmap(np.eye(2), ["a"], tmp_path / "x.png")
    with pytest.raises(CaplocError, match="equal lengths"):
        F.bars_with_ci(["a"], [1, 2], [0, 1], [2, 3], tmp_path / "x.png")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp file


# ---------------------------------------------------------------------------------------------------------------------
_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_headless_chromium_displays_every_figure(built, tmp_path):
    paths, _ = built
    flags = [_CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000"]
    url = paths.html.resolve().as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-images-loaded="(\d+)" data-images-total="(\d+)"', dom)
    assert m, dom[:500]
    assert int(m.group(1)) == int(m.group(2)) == 3
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


@pytest.mark.slow
def test_report_from_a_real_locate_run(tmp_path):
    """End to end: locate on a tiny random llama (2 IG steps, 6 samples), then report it."""
    from caploc.attribution.engine import AttributionConfig
    from caploc.data.core import Dataset, Sample
    from caploc.localize import LocateConfig, locate
    from caploc.models.loading import load_model

    lm = load_model("tiny:llama")
    ds = Dataset("toy_arith", [Sample(f"{a}+{b}=", f" {a + b}", id=str(i))
                               for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)])])
    cfg = LocateConfig(attribution=AttributionConfig(method="ig", steps=2), rule="topk", topk=5, min_freq=0.3)
    res = locate(lm, ds, cfg, tmp_path / "loc", progress=False)
    data = json.loads(build_report([tmp_path / "loc"], tmp_path / "o").json.read_text())
    (sec,) = data["sections"]
    assert sec["kind"] == "locate" and sec["claims"]["n_neurons"]["value"] == len(res.neurons) > 0
    assert [f["title"] for f in sec["figures"]] == ["Neurons per layer", "Selection-count histogram"]
    rows = dict((r[0], r[1]) for r in sec["tables"][0]["rows"])
    assert rows["frequency threshold"] == "min_freq 0.3 -> S = 2 of 6 samples"
    assert rows["IG completeness, median |gap| / |f(a) - f(0)|"] is not None


def test_a_figure_path_outside_its_result_is_never_read(tmp_path):
    """A crafted report.json naming a file elsewhere (absolute or ../) gets a placeholder; the file is not embedded."""
    secret = tmp_path / "secret.png"
    F.heatmap(np.array([[1.0]]), ["a"], secret, "secret")
    d = _hand_report(tmp_path / "run")
    rep = json.loads((d / "report.json").read_text())
    rep["figures"] += [{"title": "Abs", "file": str(secret), "caption": "x", "generated": True},
                       {"title": "Up", "file": "../secret.png", "caption": "y"}]
    (d / "report.json").write_text(json.dumps(rep))
    paths = build_report([d], tmp_path / "out")
    html = paths.html.read_text()
    assert html.count("<img ") == 1 and "Abs" in html and html.count("is outside the result directory") >= 2
    assert base64.b64encode(secret.read_bytes()).decode() not in html
