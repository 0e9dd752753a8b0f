"""Small, consistent PNG figures for every stage (matplotlib, Agg, no pyplot global state).

Every function draws one figure, writes it atomically to ``path`` and returns ``path``. Output is deterministic:
no timestamp or software tag in the PNG metadata and a fixed style, so re-rendering the same numbers gives the same
bytes (with the same matplotlib and fonts). Chance levels are drawn (dashed line) *and* named in the title, so a
figure read on its own still shows what "random" would give.

Functions: ``heatmap``, ``curves``, ``bars_with_ci``, ``per_layer_bars``, ``null_histogram``, ``count_histogram``.
"""
from __future__ import annotations

import io
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import CaplocError

log = logging.getLogger(__name__)

DPI = 110
COLOR = "#3b6ea8"  # main series
ACCENT = "#d0543a"  # observed effect / threshold
CHANCE = "#666666"  # chance level
_STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": False,
    "svg.hashsalt": "caploc", "path.simplify": True,
}
# PNG metadata: None drops matplotlib's default "Software" key, so no version string or time is embedded
_PNG_META = {"Software": None}


def new_figure(figsize=(6.4, 3.6), left=0.75, right=0.2, bottom=0.55, top=0.4):
    """A figure with one axes placed by fixed margins in inches (no constrained layout: 2x faster, same bytes)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, h = figsize
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=figsize, dpi=DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((left / w, bottom / h, max(0.05, 1 - (left + right) / w), max(0.05, 1 - (bottom + top) / h)))
    return fig, ax


def _plain_log(axis) -> None:
    """Log-axis tick labels as 1, 10, 100 (no mathtext: faster and easier to read)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _label_len(labels) -> int:
    return max((len(str(x)) for x in labels), default=0)


def _ctx():
    import matplotlib

    return matplotlib.rc_context(_STYLE)


def save_figure(fig, path: Path | str) -> Path:
    """Render to memory, then replace ``path`` atomically (never a half-written PNG)."""
    path = Path(path)
    buf = io.BytesIO()
    with _ctx():
        fig.savefig(buf, format="png", dpi=DPI, metadata=_PNG_META)
    write_bytes_atomic(path, buf.getvalue())
    log.debug("wrote figure %s", path)
    return path


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _title(title: str | None, chance: float | None) -> str:
    t = title or ""
    if chance is not None:
        t = f"{t} (chance = {_g(chance)})" if t else f"chance = {_g(chance)}"
    return t


def _g(x: float) -> str:
    return f"{x:.3g}"


def _finite(a, name: str) -> np.ndarray:
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        raise CaplocError(f"{name} must be numeric") from None
    return arr


# ---------------------------------------------------------------------------------------------------------------------
def heatmap(matrix, labels, path: Path | str, title: str | None = None, chance: float | None = None,
            fmt: str = ".2f", vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
            xlabel: str | None = None, ylabel: str | None = None, colorbar_label: str | None = None) -> Path:
    """Annotated heatmap of ``matrix [rows, cols]``.

    ``labels``: one list (square matrix, same labels on both axes) or ``(row_labels, col_labels)``. NaN cells are
    left blank and annotated "–". ``chance`` is named in the title and marked on the colour bar.
    """
    m = _finite(matrix, "matrix")
    if m.ndim != 2:
        raise CaplocError(f"heatmap needs a 2-D matrix, got shape {m.shape}")
    if isinstance(labels, tuple) and len(labels) == 2 and not isinstance(labels[0], str):
        rl, cl = list(labels[0]), list(labels[1])
    else:
        rl = cl = list(labels)
    if len(rl) != m.shape[0] or len(cl) != m.shape[1]:
        raise CaplocError(f"heatmap labels ({len(rl)} x {len(cl)}) do not match the matrix shape {m.shape}")
    r, c = m.shape
    rot = c > 3
    left = 0.35 + 0.062 * _label_len(rl) + (0.25 if ylabel else 0)
    bottom = 0.4 + (0.031 * _label_len(cl) if rot else 0) + (0.25 if xlabel else 0)
    cell_w, cell_h = (0.62, 0.42) if c <= 12 else (0.45, 0.32)
    w, h = left + cell_w * c + 1.1, bottom + cell_h * r + 0.45
    fig, ax = new_figure((max(3.2, w), max(2.4, h)), left=left, right=1.1, bottom=bottom, top=0.45)
    with _ctx():
        fin = m[np.isfinite(m)]
        lo = vmin if vmin is not None else (float(fin.min()) if fin.size else 0.0)
        hi = vmax if vmax is not None else (float(fin.max()) if fin.size else 1.0)
        if hi <= lo:
            hi = lo + 1.0
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(c), [str(x) for x in cl], rotation=30 if rot else 0, ha="right" if rot else "center",
                      rotation_mode="anchor")
        ax.set_yticks(range(r), [str(x) for x in rl])
        cm = im.get_cmap()
        for i in range(r):
            for j in range(c):
                v = m[i, j]
                if not np.isfinite(v):
                    ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="black")
                    continue
                rgba = cm((v - lo) / (hi - lo))
                lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                        color="black" if lum > 0.5 else "white")
        W, H = fig.get_size_inches()
        cax = fig.add_axes((1 - 0.95 / W, bottom / H, 0.15 / W, 1 - (bottom + 0.45) / H))
        cb = fig.colorbar(im, cax=cax)
        if colorbar_label:
            cb.set_label(colorbar_label)
        if chance is not None and lo <= chance <= hi:
            cb.ax.axhline(chance, color="white", lw=2)
            cb.ax.axhline(chance, color=CHANCE, lw=1, ls="--")
        if xlabel:
            ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.set_title(_title(title, chance))
    return save_figure(fig, path)


def curves(x, ys: Mapping[str, Sequence[float]], path: Path | str, xlabel: str, ylabel: str,
           chance: float | None = None, title: str | None = None,
           bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
           logx: bool = False, logy: bool = False, markers: bool = True) -> Path:
    """Line plot of several series over a shared ``x``; optional (lo, hi) ``bands`` per series (e.g. CIs)."""
    xs = _finite(x, "x")
    fig, ax = new_figure((6.0, 3.6))
    with _ctx():
        for k, (name, y) in enumerate(ys.items()):
            yv = _finite(y, f"ys[{name!r}]")
            if yv.shape != xs.shape:
                raise CaplocError(f"series {name!r} has {yv.size} values but x has {xs.size}")
            color = f"C{k}"
            ax.plot(xs, yv, marker="o" if markers else None, ms=3.5, lw=1.5, color=color, label=str(name))
            if bands and name in bands:
                lo, hi = (_finite(b, f"bands[{name!r}]") for b in bands[name])
                ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0)
        if chance is not None:
            ax.axhline(chance, color=CHANCE, ls="--", lw=1, label=f"chance ({_g(chance)})")
        if logx:
            ax.set_xscale("log")
            _plain_log(ax.xaxis)
        if logy:
            ax.set_yscale("log")
            _plain_log(ax.yaxis)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(_title(title, chance))
        if len(ys) > 1 or chance is not None:
            ax.legend(frameon=False)
    return save_figure(fig, path)


def bars_with_ci(labels: Sequence[str], values, lo, hi, path: Path | str, chance: float | None = None,
                 title: str | None = None, ylabel: str | None = None, fmt: str = ".3g",
                 colors: Sequence[str] | None = None) -> Path:
    """Bars with error bars from explicit interval ends ``lo``/``hi`` (e.g. bootstrap CIs); values annotated."""
    v, l, h = _finite(values, "values"), _finite(lo, "lo"), _finite(hi, "hi")
    if not (len(labels) == v.size == l.size == h.size):
        raise CaplocError(f"bars_with_ci needs equal lengths, got labels={len(labels)} values={v.size} lo={l.size} hi={h.size}")
    rot = len(labels) > 4
    fig, ax = new_figure((max(3.6, 1.2 + 0.7 * len(labels)), 3.6 + (0.031 * _label_len(labels) if rot else 0)),
                   bottom=0.45 + (0.031 * _label_len(labels) if rot else 0))
    with _ctx():
        pos = np.arange(len(labels))
        err = np.vstack([np.clip(v - l, 0, None), np.clip(h - v, 0, None)])
        err = np.where(np.isfinite(err), err, 0.0)
        ax.bar(pos, v, color=list(colors) if colors else COLOR, yerr=err, capsize=3, ecolor="#222222")
        for p, val, top in zip(pos, v, np.where(np.isfinite(h), np.maximum(h, v), v)):
            if np.isfinite(val):
                ax.annotate(format(val, fmt), (p, top), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7)
        if chance is not None:
            ax.axhline(chance, color=CHANCE, ls="--", lw=1, label=f"chance ({_g(chance)})")
            ax.legend(frameon=False)
        ax.set_xticks(pos, [str(s) for s in labels], rotation=30 if rot else 0, ha="right" if rot else "center",
                      rotation_mode="anchor")
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.set_title(_title(title, chance))
    return save_figure(fig, path)


def per_layer_bars(counts, path: Path | str, d_mlp: int | None = None, title: str | None = None,
                   xlabel: str = "layer", ylabel: str = "neurons", expected=None) -> Path:
    """Neurons per layer; with ``d_mlp`` a right axis shows the share of the layer (%) and bars are annotated.

    ``expected`` (optional, per layer) is drawn as a step line, e.g. the size of a uniform random set.
    """
    c = _finite(counts, "counts").ravel()
    L = c.size
    fig, ax = new_figure((max(4.5, min(12.0, 1.5 + 0.28 * L)), 3.4), right=0.75 if d_mlp else 0.2)
    with _ctx():
        pos = np.arange(L)
        ax.bar(pos, c, color=COLOR, width=0.8)
        if expected is not None:
            e = _finite(expected, "expected").ravel()
            ax.stairs(e, np.arange(L + 1) - 0.5, baseline=None, color=CHANCE, ls="--", lw=1, label="expected (random)")
            ax.legend(frameon=False)
        top = float(np.nanmax(c)) if L and np.isfinite(c).any() else 0.0
        if top <= 0:
            ax.set_ylim(0, 1)
            ax.text(0.5, 0.5, "no neurons selected", transform=ax.transAxes, ha="center", va="center", color=CHANCE)
        elif L <= 40:
            for p, v in zip(pos, c):
                if v > 0:
                    ax.annotate(f"{int(v)}", (p, v), xytext=(0, 1), textcoords="offset points", ha="center",
                                va="bottom", fontsize=6.5)
            ax.set_ylim(0, top * 1.15)
        ax.set_xlim(-0.6, L - 0.4)
        step = max(1, math.ceil(L / 24))
        ax.set_xticks(pos[::step], [str(int(p)) for p in pos[::step]])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if d_mlp:
            sec = ax.secondary_yaxis("right", functions=(lambda n: 100.0 * n / d_mlp, lambda s: s * d_mlp / 100.0))
            sec.set_ylabel("% of the layer's neurons")
            ax.spines["right"].set_visible(True)
        ax.set_title(title or "")
    return save_figure(fig, path)


def count_histogram(counts, path: Path | str, n_samples: int | None = None, threshold: int | None = None,
                    title: str | None = None, xlabel: str = "selected in this many samples") -> Path:
    """Histogram of integer counts (one bar per value, log y), e.g. how many samples selected each neuron.

    ``threshold`` (S) is marked: bars at or above it are the kept neurons.
    """
    c = np.asarray(counts).ravel()
    if c.size and (np.any(c < 0) or np.any(c != np.round(c))):
        raise CaplocError("count_histogram needs non-negative whole counts")
    c = c.astype(np.int64)
    hi = int(max(n_samples or 0, c.max() if c.size else 0))
    freq = np.bincount(c, minlength=hi + 1)
    fig, ax = new_figure((max(4.5, min(12.0, 1.5 + 0.2 * hi)), 3.4))
    with _ctx():
        xs = np.arange(hi + 1)
        kept = xs >= threshold if threshold is not None else np.zeros_like(xs, bool)
        ax.bar(xs[~kept], freq[~kept], color="#9bb3cf", width=0.85, label="not kept")
        if kept.any():
            ax.bar(xs[kept], freq[kept], color=COLOR, width=0.85,
                   label=f"kept: {int(freq[kept].sum())} neurons")
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        ymax = max(1, int(freq.max()) if freq.size else 1)
        ax.set_ylim(0.7, ymax * 2.5)
        if threshold is not None:
            ax.axvline(threshold - 0.5, color=ACCENT, ls="--", lw=1.2, label=f"S = {threshold}")
        step = max(1, math.ceil((hi + 1) / 24))
        ax.set_xticks(xs[::step])
        ax.set_xlim(-0.6, hi + 0.6)
        ax.set_xlabel(xlabel if n_samples is None else f"{xlabel} (of {n_samples})")
        ax.set_ylabel("neurons (log)")
        ax.legend(frameon=False)
        ax.set_title(title or "")
    return save_figure(fig, path)


def null_histogram(null_values, effect: float, path: Path | str, title: str | None = None,
                   xlabel: str = "effect", bins: int | str = "auto", effect_label: str = "observed") -> Path:
    """Distribution of a random-control (null) statistic with the observed ``effect`` marked.

    The legend gives n, the null mean ± sd, z and the empirical two-sided p from ``caploc.stats.compare_to_null``.
    """
    from ..stats import compare_to_null

    null = _finite(null_values, "null_values").ravel()
    null = null[np.isfinite(null)]
    cmp = compare_to_null(effect, null)
    fig, ax = new_figure((6.0, 3.9), bottom=1.05)
    with _ctx():
        lo = min(float(null.min()), float(effect))
        hi = max(float(null.max()), float(effect))
        rng = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
        ax.hist(null, bins=bins, range=rng, color="#9bb3cf", edgecolor="white", lw=0.5,
                label=f"random controls (n={cmp['n_null']}): {_g(cmp['null_mean'])} ± {_g(cmp['null_sd'])}")
        z = cmp["z"]
        ztxt = ("inf" if z > 0 else "-inf") if math.isinf(z) else _g(z)
        ax.axvline(effect, color=ACCENT, lw=2,
                   label=f"{effect_label}: {_g(effect)} (z = {ztxt}, p = {_g(cmp['p_two_sided'])})")
        pad = 0.06 * (rng[1] - rng[0])
        ax.set_xlim(rng[0] - pad, rng[1] + pad)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("random draws")
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(-0.1, -0.2), ncol=1)
        ax.set_title(title or "")
    return save_figure(fig, path)


__all__ = ["heatmap", "curves", "bars_with_ci", "per_layer_bars", "count_histogram", "null_histogram",
           "write_bytes_atomic"]
