"""Render assembled sections as one self-contained HTML page and as Markdown.

HTML: inline CSS, every figure embedded as a base64 data URI, no external URL (a Content-Security-Policy meta tag
forbids any fetch except ``data:`` images), URLs in text stay plain text. A tiny inline script records how many
images decoded (``<html data-images-loaded=N data-images-total=M>``) so a headless browser can check the page.
No timestamp is written, so the same inputs give the same bytes.
Markdown: GitHub tables; figures referenced as ``figures/<name>`` (copied next to the .md by ``build_report``).
"""
from __future__ import annotations

import base64
import html
import math
from typing import Any

from .. import __version__

_CSS = """
:root{--fg:#1d232b;--mut:#5b6470;--line:#d9dee5;--bg:#fff;--alt:#f5f7fa;--acc:#3b6ea8;--bad:#b3261e}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1480px;margin:0 auto;padding:24px 28px 64px}
main p,figcaption,.note{max-width:86ch}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 6px;padding-top:8px;border-top:2px solid var(--line)}
h3{font-size:15px;margin:18px 0 6px}
.meta,.src{color:var(--mut);font-size:13px;margin:0 0 8px}
.src code{font-size:12px}
nav ol{margin:6px 0 0;padding-left:22px;columns:2;font-size:14px}
a{color:var(--acc);text-decoration:none}a:hover{text-decoration:underline}
.tw{overflow-x:auto;margin:6px 0 14px;max-width:100%}
table{border-collapse:collapse;font-size:13px;min-width:40%}
table.wide{font-size:12px}
caption{text-align:left;font-weight:600;padding:4px 0;font-size:14px;position:sticky;left:0}
th,td{border:1px solid var(--line);padding:4px 9px;vertical-align:top;text-align:left}
th{background:var(--alt);font-weight:600;min-width:5.5em;hyphens:auto}
td{overflow-wrap:anywhere;min-width:4em}
td.s{white-space:nowrap;overflow-wrap:normal}
table.wide th,table.wide td{padding:3px 6px}table.wide th{min-width:0}
table.wide td:first-child,table.wide th:first-child{position:sticky;left:0;background:var(--alt);z-index:1}
tbody tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap;overflow-wrap:normal}
tr.grp th{background:#e9eef5;font-weight:600;text-align:left}
.note{color:var(--mut);font-size:12.5px;margin:-8px 0 12px}
figure{margin:14px 0 22px}
figure img{display:block;max-width:100%;height:auto;border:1px solid var(--line)}
figcaption{color:var(--mut);font-size:13px;margin-top:5px;max-width:820px}
.missing{border:2px dashed var(--bad);color:var(--bad);background:#fdf3f2;padding:18px;max-width:640px;font-size:14px}
.warn{border-left:4px solid var(--bad);background:#fdf3f2;padding:8px 12px;margin:10px 0;font-size:14px}
@media (max-width:800px){main{padding:12px}nav ol{columns:1}}
@media print{
@page{size:A4 landscape;margin:10mm}
body{font-size:10.5pt}main{max-width:none;padding:0}
nav,script{display:none}
.tw{overflow:visible}table,table.wide{font-size:7.5pt;width:100%}th,td{padding:1.5pt 3pt;min-width:0}
td.s{white-space:normal}
table.wide td:first-child,table.wide th:first-child{position:static}
thead{display:table-header-group}tr,figure,.missing{break-inside:avoid}h2,h3,caption{break-after:avoid}
h2{break-before:page;border-top:0}section#claims h2{break-before:auto}
figure img{max-height:170mm;width:auto;max-width:100%}
a{color:inherit}
}
.kind{display:inline-block;background:var(--alt);border:1px solid var(--line);border-radius:3px;padding:0 6px;
font-size:12px;color:var(--mut)}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var im = document.images, ok = 0;
  for (var i = 0; i < im.length; i++) { if (im[i].complete && im[i].naturalWidth > 0) ok++; }
  document.documentElement.setAttribute('data-images-loaded', String(ok));
  document.documentElement.setAttribute('data-images-total', String(im.length));
});
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


# ---------------------------------------------------------------------------------------------------------------------
# value formatting (shared by HTML and Markdown)
# ---------------------------------------------------------------------------------------------------------------------
def fmt(v: Any) -> str:
    """Numbers to 4 significant digits, None to '–', lists as [a, b], dicts as compact JSON."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == int(v) and abs(v) < 1e6:
            return f"{v:.1f}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items())
    return str(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_CLAIM_COLS = ["claim", "value", "95% CI", "chance", "details"]
WIDE = 8  # tables with more columns get the compact, first-column-sticky style


def _claim_cells(c: dict) -> list[Any]:
    return [c["claim"], c["value"], c["ci"], c["chance"], c["extra"] or None]


def _by_section(claims: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Claims grouped by their section, in report order: [(first claim of the section, claims)]."""
    groups: dict[str, tuple[dict, list[dict]]] = {}
    for c in claims:
        groups.setdefault(c["anchor"] or c["section"], (c, []))[1].append(c)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------------
def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _td(v: Any) -> str:
    """A cell: numbers right-aligned; short text (a CI, a label) kept on one line; long text may wrap anywhere."""
    txt = fmt(v)
    if _is_num(v):
        return f'<td class="num">{_e(txt)}</td>'
    return f'<td class="s">{_e(txt)}</td>' if len(txt) <= 24 else f"<td>{_e(txt)}</td>"


def _table_html(title: str, columns: list[str], rows: list[list[Any]], note: str = "") -> str:
    out = ['<div class="tw"><table class="wide">' if len(columns) > WIDE else '<div class="tw"><table>']
    if title:
        out.append(f"<caption>{_e(title)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(_td(v) for v in r) + "</tr>")
    if not rows:
        out.append(f'<tr><td colspan="{max(len(columns), 1)}">(no rows)</td></tr>')
    out.append("</tbody></table></div>")
    if note:
        out.append(f'<p class="note">{_e(note)}</p>')
    return "\n".join(out)


def _figure_html(f) -> str:
    title = f.title or f.declared
    if f.missing or f.data is None:
        return (f'<div class="missing" role="img" aria-label="missing figure"><strong>Figure missing: {_e(title)}'
                f"</strong><br>{_e(f.missing or 'no data')}</div>")
    uri = f"data:{f.mime};base64," + base64.b64encode(f.data).decode("ascii")
    cap = f"<strong>{_e(f.title)}.</strong> {_e(f.caption)}" if f.title else _e(f.caption)
    return f'<figure><img src="{uri}" alt="{_e(title)}"><figcaption>{cap}</figcaption></figure>'


def _claims_html(claims: list[dict]) -> str:
    """One table, a header row per section (linked to it) above that section's claims."""
    out = ['<div class="tw"><table class="claims">',
           "<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in _CLAIM_COLS) + "</tr></thead><tbody>"]
    for head, rows in _by_section(claims):
        title = _e(head["section"])
        link = f'<a href="#{_e(head["anchor"])}">{title}</a>' if head["anchor"] else title
        out.append(f'<tr class="grp"><th colspan="{len(_CLAIM_COLS)}">{link} '
                   f'<span class="kind">{_e(head["kind"])}</span></th></tr>')
        for c in rows:
            out.append("<tr>" + "".join(_td(v) for v in _claim_cells(c)) + "</tr>")
    out.append("</tbody></table></div>")
    out.append('<p class="note">Every section\'s claims (value, 95% CI and chance level as reported by the stage), '
               "grouped by section in pipeline order.</p>")
    return "\n".join(out)


def render_html(title: str, sources: list[str], sections, claims: list[dict], missing: list[str]) -> str:
    n_fig = sum(1 for s in sections for f in s.figures if not f.missing)
    p = ['<!DOCTYPE html>', '<html lang="en">', "<head>", '<meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">', '<meta name="generator" content="caploc">',
         f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body><main>",
         f"<h1>{_e(title)}</h1>",
         f'<p class="meta">caploc {_e(__version__)} · {len(sections)} section(s) · {n_fig} figure(s) · '
         f"{len(claims)} claim(s) · from {_e(', '.join(sources))}</p>"]
    if missing:
        p.append(f'<div class="warn"><strong>{len(missing)} figure(s) missing</strong> (placeholders below): '
                 + "; ".join(_e(m) for m in missing) + "</div>")
    p.append('<nav><strong>Contents</strong><ol><li><a href="#claims">Claims</a></li>'
             + "".join(f'<li><a href="#{_e(s.anchor)}">{_e(s.title)}</a> <span class="kind">{_e(s.kind)}</span></li>'
                       for s in sections) + "</ol></nav>")
    p.append('<section id="claims"><h2>Claims</h2>')
    if claims:
        p.append(_claims_html(claims))
    else:
        p.append('<p class="note">No section reported claims.</p>')
    p.append("</section>")
    for s in sections:
        src = f"{s.report_file}" if s.report_file else f"{s.source} (no report.json; rendered by caploc report)"
        p.append(f'<section id="{_e(s.anchor)}"><h2>{_e(s.title)}</h2>'
                 f'<p class="src"><span class="kind">{_e(s.kind)}</span> <code>{_e(src)}</code></p>')
        p += [f"<p>{_e(t)}</p>" for t in s.text]
        for t in s.tables:
            p.append(_table_html(t.title, t.columns, t.rows, t.note))
        p += [_figure_html(f) for f in s.figures]
        p.append("</section>")
    p.append(f"</main><script>{_SCRIPT}</script></body></html>")
    return "\n".join(p) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------------
def _md_cell(v: Any) -> str:
    return fmt(v).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ") or " "


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |",
             "|" + "|".join("---:" if rows and all(_is_num(r[j]) for r in rows) else "---"
                            for j in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(title: str, sources: list[str], sections, claims: list[dict], missing: list[str]) -> str:
    p = [f"# {title}", "",
         f"caploc {__version__} · {len(sections)} section(s) · {len(claims)} claim(s) · from "
         + ", ".join(f"`{s}`" for s in sources), ""]
    if missing:
        p += [f"> **{len(missing)} figure(s) missing** (placeholders below): " + "; ".join(missing), ""]
    p += ["## Claims", ""]
    if not claims:
        p += ["_No section reported claims._", ""]
    for head, rows in _by_section(claims):
        p += [f"**{head['section']}** (_{head['kind']}_)", "", _md_table(_CLAIM_COLS, [_claim_cells(c) for c in rows]),
              ""]
    for s in sections:
        src = f"`{s.report_file}`" if s.report_file else f"`{s.source}` (no report.json; rendered by caploc report)"
        p += [f"## {s.title}", "", f"_{s.kind}_ · {src}", ""]
        for t in s.text:
            p += [t, ""]
        for t in s.tables:
            p += [f"**{t.title}**", "", _md_table(t.columns, t.rows), ""]
            if t.note:
                p += [f"_{t.note}_", ""]
        for f in s.figures:
            name = f.title or f.declared
            if f.missing or not f.out_name:
                p += [f"> **Figure missing: {name}** — {f.missing}", ""]
            else:
                p += [f"![{name}](figures/{f.out_name})", ""]
                cap = (f"**{f.title}.** " if f.title else "") + f.caption
                if cap.strip():
                    p += [f"_{cap.strip()}_" if not f.title else cap, ""]
    return "\n".join(p).rstrip() + "\n"
