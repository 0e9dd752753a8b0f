"""Assemble result directories into one report (HTML + Markdown + JSON), without knowing the stages.

Discovery. Under every run directory (recursively, hidden directories and the output directory skipped) each
``report.json`` is one section (the contract in docs/DEVELOPING.md). A directory without ``report.json`` that holds
a known result marker (``neurons.json`` with kind ``neuron_set``: a locate run) is rendered by the built-in renderer
for it, unless an ancestor directory inside the same run directory has a ``report.json`` (that stage's report
stands for its sub-results; pass the sub-directory explicitly to render it on its own). Sections are ordered by
pipeline stage (``PIPELINE``: localization, stability, interventions, fine-tuning, audit; other kinds after them),
then kind and resolved path, so the same inputs always give the same report.

Renderers. ``register_renderer(kind, fn, marker=None)``: ``fn(run_dir, report, fig_dir) -> dict`` receives the
parsed ``report.json`` (or None for a marker-detected directory) and returns a contract dict; figures it draws go
into ``fig_dir`` (a scratch directory; the run directory is never written to) and are referenced by absolute path.

Output directory. ``out/.caploc_report_manifest.json`` lists every file the report wrote into ``out``; a rebuild
replaces or removes only files listed there (stale figures of an earlier report), and refuses to overwrite any other
existing file, so pointing ``--out`` at a directory that holds other files never loses them.

Missing figures. A figure whose file is missing or is not a readable image is shown as a visible placeholder
(HTML and Markdown), logged as a warning, flagged ``"missing"`` in the JSON and counted in the report header;
with ``strict=True`` (CLI ``--strict``) it is an error instead.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import CaplocError
from ..results import OutLock, atomic_write_bytes, atomic_write_json, atomic_write_text, check_out_dir, read_json
from . import locate  # noqa: F401  (registers the built-in locate / neuron_set renderer)
from .html import render_html, render_markdown
from .registry import MARKERS, RENDERERS, Renderer, register_renderer

log = logging.getLogger(__name__)

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml"}
_MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8", ".jpeg": b"\xff\xd8", ".gif": b"GIF8"}

OUT_NAMES = ("report.html", "report.md", "report_data.json")  # not "report.json": re-scans must not pick it up
# sections appear in pipeline order (localization, stability, interventions and evaluation, fine-tuning, audit, the
# study's claims); kinds not listed follow, by name
PIPELINE = ("locate", "neuron_set", "contrast", "generic", "stability", "sweep", "crosscap", "eval", "evaluate",
            "intervention", "intervene", "decouple", "fidelity", "faithfulness", "learned_mask", "finetune", "audit",
            "circuit_audit", "audit_circuits", "claims")
MANIFEST = ".caploc_report_manifest.json"  # the files this tool wrote into --out: the only ones it may replace/remove


# ---------------------------------------------------------------------------------------------------------------------
# data model
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ReportPaths:
    html: Path
    md: Path
    json: Path


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Figure:
    title: str
    caption: str
    declared: str  # "file" as written in report.json (or the generated file's name)
    source: Path | None  # where the image was found
    data: bytes | None = None
    mime: str = "image/png"
    out_name: str | None = None  # name under the output figures/ dir
    missing: str | None = None  # why it is not shown
    generated: bool = False  # drawn by a renderer (not a file of the run directory)


@dataclass
class Section:
    kind: str
    title: str
    source: Path  # the result directory
    report_file: Path | None  # its report.json (None when rendered from a marker)
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    claims: dict = field(default_factory=dict)
    anchor: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------------------------------
def discover(run_dirs: list[Path], exclude: Path | None = None) -> list[tuple[Path, str]]:
    """[(result dir, "report" | marker file name)] under every run dir, deduplicated (first hit wins)."""
    if not run_dirs:
        raise CaplocError("no run directory given: pass one or more result directories, e.g. runs/locate-gsm")
    found: dict[Path, tuple[Path, str]] = {}
    exclude = exclude.resolve() if exclude is not None else None
    for rd in run_dirs:
        rd = Path(rd)
        if rd.is_file() and rd.name in ("report.json", *MARKERS):
            rd = rd.parent
        if not rd.exists():
            raise CaplocError(f"{rd} does not exist: pass result directories written by caploc (e.g. runs/locate-gsm)")
        if not rd.is_dir():
            raise CaplocError(f"{rd} is not a directory: pass a result directory (one holding report.json or neurons.json)")
        hits = 0
        reported: list[Path] = []  # directories with report.json seen so far under rd (walk is top-down)
        for root, dirs, files in os.walk(rd, followlinks=False):
            rootp = Path(root)
            rres = rootp.resolve()
            if exclude is not None and (rres == exclude or exclude in rres.parents):
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if "report.json" in files:
                reported.append(rres)
                found.setdefault(rres, (rootp, "report"))
                hits += 1
                continue
            if any(r in rres.parents for r in reported):
                continue
            for mname, (jkind, _) in sorted(MARKERS.items()):
                if mname in files:
                    meta = read_json(rootp / mname)
                    if isinstance(meta, dict) and meta.get("kind") == jkind:
                        found.setdefault(rres, (rootp, mname))
                        hits += 1
                        break
        if not hits:
            raise CaplocError(f"no report.json or caploc result (neurons.json) found under {rd}: "
                              "pass a directory written by a caploc stage")
    return list(found.values())


# ---------------------------------------------------------------------------------------------------------------------
# loading one section
# ---------------------------------------------------------------------------------------------------------------------
def load_section(run_dir: Path, how: str, scratch: Path) -> Section:
    """Parse (and, where a renderer is registered, render) one result directory into a Section."""
    run_dir = Path(run_dir)
    report_file = run_dir / "report.json" if how == "report" else None
    if report_file is not None:
        report = read_json(report_file)
        if not isinstance(report, dict):
            raise CaplocError(f"{report_file} must hold a JSON object with kind/title/text/tables/figures/claims")
        kind = report.get("kind")
        if not isinstance(kind, str) or not kind:
            raise CaplocError(f"{report_file} has no \"kind\": add e.g. \"kind\": \"stability\" (see docs/DEVELOPING.md)")
    else:
        report = None
        kind = MARKERS[how][1]
    fn = RENDERERS.get(kind)
    where = report_file or run_dir / how
    if fn is not None:
        fig_dir = scratch / f"r{len(list(scratch.iterdir())):04d}"
        fig_dir.mkdir()
        report = fn(run_dir, report, fig_dir)
        if not isinstance(report, dict):
            raise CaplocError(f"the report renderer for kind {kind!r} returned {type(report).__name__}, not a dict")
        report.setdefault("kind", kind)
    return _parse(report, run_dir, report_file, where, scratch)


def _parse(rep: dict, run_dir: Path, report_file: Path | None, where: Path, scratch: Path | None = None) -> Section:
    def bad(what: str) -> CaplocError:
        return CaplocError(f"{where}: {what} (see the report contract in docs/DEVELOPING.md)")

    kind = str(rep.get("kind") or "unknown")
    title = rep.get("title") or f"{kind}: {run_dir.name}"
    if not isinstance(title, str):
        raise bad("\"title\" must be a string")
    text = rep.get("text", [])
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
        raise bad("\"text\" must be a list of paragraphs (strings)")

    tables = []
    raw_tables = rep.get("tables", [])
    if not isinstance(raw_tables, list):
        raise bad("\"tables\" must be a list")
    for k, t in enumerate(raw_tables):
        if not isinstance(t, dict) or not isinstance(t.get("columns"), list) or not isinstance(t.get("rows", []), list):
            raise bad(f"table {k} needs \"columns\" (a list) and \"rows\" (a list of lists)")
        cols = [str(c) for c in t["columns"]]
        rows = t.get("rows", [])
        for i, r in enumerate(rows):
            if not isinstance(r, list) or len(r) != len(cols):
                raise bad(f"table {k} ({t.get('title', '')!r}) row {i} has "
                          f"{len(r) if isinstance(r, list) else 'no list of'} cells, expected {len(cols)}")
        tables.append(Table(str(t.get("title") or f"Table {k + 1}"), cols, rows, str(t.get("note") or "")))

    figures = []
    raw_figs = rep.get("figures", [])
    if not isinstance(raw_figs, list):
        raise bad("\"figures\" must be a list")
    for k, f in enumerate(raw_figs):
        if not isinstance(f, dict) or not isinstance(f.get("file"), str) or not f["file"]:
            raise bad(f"figure {k} needs a \"file\" (a PNG path relative to report.json)")
        figures.append(_load_figure(f, run_dir, scratch))

    claims = rep.get("claims", {})
    if not isinstance(claims, dict):
        raise bad("\"claims\" must be an object {name: {\"value\": ..., \"ci\": [lo, hi], \"chance\": ...}}")
    return Section(kind, title, run_dir, report_file, text, tables, figures, claims)


def _inside(p: Path, root: Path | None) -> bool:
    if root is None:
        return False
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def _load_figure(f: dict, run_dir: Path, scratch: Path | None = None) -> Figure:
    declared = f["file"]
    p = Path(declared)
    p = p if p.is_absolute() else run_dir / p
    fig = Figure(str(f.get("title") or ""), str(f.get("caption") or ""), declared, p, generated=bool(f.get("generated")))
    if not (_inside(p, run_dir) or _inside(p, scratch)):  # a result file never makes the report read elsewhere
        fig.missing = f"figure file {declared!r} is outside the result directory {run_dir}; not read"
        return fig
    ext = p.suffix.lower()
    if ext not in IMAGE_TYPES:
        fig.missing = f"unsupported figure type {ext or '(none)'!r}; write PNG files"
        return fig
    fig.mime = IMAGE_TYPES[ext]
    if not p.is_file():
        fig.missing = f"figure file {p} is missing"
        return fig
    try:
        data = p.read_bytes()
    except OSError as e:
        fig.missing = f"figure file {p} cannot be read ({e.strerror})"
        return fig
    magic = _MAGIC.get(ext)
    if (magic and not data.startswith(magic)) or (ext == ".svg" and b"<svg" not in data[:4096]) or not data:
        fig.missing = f"figure file {p} is not a valid {ext[1:].upper()} image"
        return fig
    fig.data = data
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# the whole report
# ---------------------------------------------------------------------------------------------------------------------
def _slug(s: str, n: int = 40) -> str:
    return (re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "x")[:n].strip("-")


def claim_rows(sections: list[Section]) -> list[dict]:
    """One row per claim of every section: section, kind, source, claim, value, ci, chance, extra."""
    rows = []
    for s in sections:
        for name, c in s.claims.items():
            if isinstance(c, dict):
                extra = {k: v for k, v in c.items() if k not in ("value", "ci", "chance")}
                rows.append({"section": s.title, "anchor": s.anchor, "kind": s.kind, "source": str(s.source),
                             "claim": str(name), "value": c.get("value"), "ci": c.get("ci"),
                             "chance": c.get("chance"), "extra": extra})
            else:
                rows.append({"section": s.title, "anchor": s.anchor, "kind": s.kind, "source": str(s.source),
                             "claim": str(name), "value": c, "ci": None, "chance": None, "extra": {}})
    return rows


def build_report(run_dirs: list[Path], out: Path, title: str | None = None, strict: bool = False) -> ReportPaths:
    """Write ``out/report.html`` (self-contained), ``out/report.md`` (+ ``out/figures/``) and ``out/report_data.json``.

    ``strict``: a missing or unreadable figure is an error instead of a visible placeholder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CaplocError(f"--out {out} is a file: pass a directory for the report")
    out = check_out_dir(out)
    entries = discover([Path(d) for d in run_dirs], exclude=out)
    with tempfile.TemporaryDirectory(prefix="caploc-report-") as tmp, OutLock(out):
        scratch = Path(tmp)
        sections = [load_section(d, how, scratch) for d, how in entries]
        sections.sort(key=section_order)
        _disambiguate_titles(sections)
        missing = []
        used: set[str] = set()
        for i, s in enumerate(sections, 1):
            s.anchor = f"sec-{i}-{_slug(s.kind, 20)}"
            for j, f in enumerate(s.figures, 1):
                if f.missing:
                    missing.append(f"{s.title}: {f.missing}")
                    continue
                stem = _slug(Path(f.declared).stem, 40)
                name = f"{i:02d}-{_slug(s.kind, 20)}-{j:02d}-{stem}{Path(f.declared).suffix.lower()}"
                while name in used:  # pragma: no cover - names carry section and figure numbers
                    name = "x" + name
                used.add(name)
                f.out_name = name
        if missing:
            if strict:
                raise CaplocError(f"{len(missing)} figure(s) missing, first: {missing[0]}; rerun the stage or drop --strict")
            for m in missing:
                log.warning("report: %s (shown as a placeholder)", m)

        doc_title = title or "caploc report"
        claims = claim_rows(sections)
        fig_dir = out / "figures"
        wanted = {f.out_name for s in sections for f in s.figures if f.out_name}
        written = set(OUT_NAMES) | {f"figures/{n}" for n in wanted}
        earlier = _check_own_files(out, written)
        fig_dir.mkdir(parents=True, exist_ok=True)
        # record what is about to be written BEFORE writing it, so an interrupted build can still be cleaned up
        _write_manifest(out, earlier | written)
        for s in sections:
            for f in s.figures:
                if f.out_name:
                    dst = fig_dir / f.out_name
                    if not (dst.exists() and dst.read_bytes() == f.data):
                        atomic_write_bytes(dst, f.data)
        sources = [str(Path(d)) for d in run_dirs]
        paths = ReportPaths(out / OUT_NAMES[0], out / OUT_NAMES[1], out / OUT_NAMES[2])
        atomic_write_json(paths.json, _to_json(doc_title, sources, sections, claims, missing))
        atomic_write_text(paths.md, render_markdown(doc_title, sources, sections, claims, missing))
        atomic_write_text(paths.html, render_html(doc_title, sources, sections, claims, missing))
        for rel in sorted(earlier - written):  # figures of an earlier report in the same --out (listed by it)
            stale = out / rel
            if rel.startswith("figures/") and stale.is_file() and not stale.is_symlink():
                stale.unlink()
        _write_manifest(out, written)
        for p in (paths.html, paths.md, paths.json, *(fig_dir / n for n in wanted)):
            _readable(p)
    log.info("report: %d sections, %d figures, %d claims -> %s", len(sections), len(wanted), len(claims), out)
    return paths


def _read_manifest(out: Path) -> set[str] | None:
    """The files an earlier ``caploc report`` wrote into ``out`` (relative paths), or None without a manifest."""
    p = out / MANIFEST
    if not p.is_file():
        return None
    m = read_json(p)
    if not isinstance(m, dict) or m.get("kind") != "caploc_report_manifest" or not isinstance(m.get("files"), list):
        raise CaplocError(f"{p} is not a caploc report manifest; remove it or pass another --out")
    return {f for f in m["files"] if isinstance(f, str) and ".." not in Path(f).parts and not Path(f).is_absolute()}


def _write_manifest(out: Path, files: set[str]) -> None:
    atomic_write_json(out / MANIFEST, {"kind": "caploc_report_manifest", "caploc_version": __version__,
                                       "files": sorted(files)})


def _check_own_files(out: Path, written: set[str]) -> set[str]:
    """Refuse to overwrite a file of ``out`` that no earlier ``caploc report`` wrote; return the files it did write.

    Only files listed in the manifest of an earlier report are ever replaced or removed. A report directory from
    before manifests existed counts as written by this tool for the three report files and the figures its
    report_data.json lists."""
    earlier = _read_manifest(out)
    if earlier is None:
        earlier = set()
        legacy = out / OUT_NAMES[2]
        data = None
        if legacy.is_file():
            try:
                data = read_json(legacy)
            except CaplocError:
                data = None
        if isinstance(data, dict) and data.get("kind") == "caploc_report":  # figures it lists were written by it
            earlier = set(OUT_NAMES) | {f["file"] for sec in data.get("sections") or [] if isinstance(sec, dict)
                                        for f in sec.get("figures") or [] if isinstance(f, dict)
                                        and isinstance(f.get("file"), str) and f["file"].startswith("figures/")
                                        and ".." not in Path(f["file"]).parts}
    for rel in sorted(written - earlier):
        if (out / rel).exists() or (out / rel).is_symlink():
            raise CaplocError(f"{out / rel} exists and was not written by caploc report: pass an empty or new --out "
                              "directory (caploc report never overwrites or deletes files it did not write)")
    return earlier


def section_order(s: Section) -> tuple:
    """Sort key: pipeline position of the kind (unknown kinds last), kind, then resolved path (deterministic)."""
    rank = PIPELINE.index(s.kind) if s.kind in PIPELINE else len(PIPELINE)
    return rank, s.kind, s.source.resolve().as_posix()


def _disambiguate_titles(sections: list[Section]) -> None:
    """Sections with the same title get their directory appended (then the full path if still ambiguous)."""
    for key in (lambda s: s.source.name, lambda s: str(s.source)):
        seen: dict[str, int] = {}
        for s in sections:
            seen[s.title] = seen.get(s.title, 0) + 1
        dup = {t for t, k in seen.items() if k > 1}
        if not dup:
            return
        for s in sections:
            if s.title in dup:
                s.title = f"{s.title} ({key(s)})"


def _readable(path: Path) -> None:
    """Atomic writes create 0600 files; a report is meant to be shared, so make it readable like a normal file."""
    try:
        path.chmod(0o666 & ~_umask())
    except OSError:  # pragma: no cover - e.g. a file system without permissions
        pass


def _umask() -> int:
    """The process umask without changing it (os.umask would, briefly, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _to_json(title: str, sources: list[str], sections: list[Section], claims: list[dict], missing: list[str]) -> dict:
    return {
        "kind": "caploc_report", "title": title, "caploc_version": __version__, "sources": sources,
        "n_sections": len(sections), "missing_figures": missing,
        "claims": [{k: v for k, v in c.items() if k != "anchor"} for c in claims],
        "sections": [{
            "kind": s.kind, "title": s.title, "source": str(s.source),
            "report_file": str(s.report_file) if s.report_file else None, "text": s.text,
            "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows, "note": t.note} for t in s.tables],
            "figures": [{"title": f.title, "caption": f.caption, "file": f"figures/{f.out_name}" if f.out_name else None,
                         "source_file": None if f.generated else f.declared, "missing": f.missing} for f in s.figures],
            "claims": s.claims,
        } for s in sections],
    }


__all__ = ["build_report", "ReportPaths", "PIPELINE", "section_order", "register_renderer", "Renderer", "RENDERERS", "MARKERS", "discover", "Section",
           "Table", "Figure", "claim_rows"]
