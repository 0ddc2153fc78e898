"""PNG figures for the split and report stages (matplotlib, Agg canvas, no pyplot).

Figures are built as `matplotlib.figure.Figure` on an Agg canvas rather than through pyplot, so nothing here
touches matplotlib's global backend or figure registry (safe in tests and worker threads), and every file is
written atomically (temp file, then rename).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float = 6.4, height: float = 4.8, dpi: int = 100) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> pathlib.Path:
    """Saves `fig` as PNG at `path` atomically; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def group_colors(k: int) -> list[Any]:
    """k distinguishable colours (tab10 up to 10 groups, then a sampled hsv wheel)."""
    from matplotlib import colormaps

    if k <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(k)]
    cmap = colormaps["hsv"]
    return [cmap(i / k) for i in range(k)]


def _label_size(n: int) -> float:
    return float(np.clip(400.0 / max(n, 1), 3.0, 9.0))


def cosine_heatmap(cos_tt: Any, names: Sequence[str], groups: Sequence[Sequence[int]],
                   path: str | os.PathLike, title: str | None = None) -> pathlib.Path:
    """Heatmap of the cosine matrix with tasks ordered by group and the group boundaries drawn.

    The colour scale is symmetric around 0 and spans the largest off-diagonal |cosine|, so conflicts
    (negative, blue) and agreement (positive, red) stay visible when all cosines are small.
    """
    cos = np.asarray(cos_tt, dtype=np.float64)
    order = [i for g in groups for i in g]
    t = cos.shape[0]
    if sorted(order) != list(range(t)):
        raise ValueError(f"cosine_heatmap: groups must cover rows 0..{t - 1} exactly once")
    c = cos[np.ix_(order, order)]
    off = c[~np.eye(t, dtype=bool)]
    vmax = float(np.abs(off).max()) if off.size and np.abs(off).max() > 0 else 1.0
    side = float(np.clip(0.12 * t + 3.0, 5.0, 18.0))
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(c, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine")
    edge = -0.5
    for g in groups[:-1]:
        edge += len(g)
        ax.axhline(edge, color="black", linewidth=1.2)
        ax.axvline(edge, color="black", linewidth=1.2)
    size = _label_size(t)
    ax.set_xticks(range(t))
    ax.set_yticks(range(t))
    ax.set_xticklabels([names[i] for i in order], rotation=90, fontsize=size)
    ax.set_yticklabels([names[i] for i in order], fontsize=size)
    ax.set_title(title or "task gradient cosine (ordered by group)")
    return save_figure(fig, path)


def pca_scatter(scores_tr: Any, names: Sequence[str], labels_t: Sequence[int], path: str | os.PathLike,
                explained: Sequence[float] | None = None, title: str | None = None) -> pathlib.Path:
    """Tasks on the top two principal axes, coloured by group and labelled by name.

    With a single component the second coordinate is drawn at 0.
    """
    s = np.asarray(scores_tr, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != len(names):
        raise ValueError(f"pca_scatter: scores shape {list(s.shape)} does not match {len(names)} names")
    x = s[:, 0]
    y = s[:, 1] if s.shape[1] > 1 else np.zeros_like(x)
    labels = np.asarray(labels_t)
    k = int(labels.max()) + 1 if labels.size else 1
    colors = group_colors(k)
    fig = new_figure(8.0, 6.5)
    ax = fig.add_subplot(1, 1, 1)
    for g in range(k):
        m = labels == g
        ax.scatter(x[m], y[m], s=28, color=colors[g], label=f"group {g} ({int(m.sum())} tasks)",
                   edgecolors="black", linewidths=0.4)
    size = _label_size(len(names)) * 0.9
    for i, name in enumerate(names):
        ax.annotate(str(name), (x[i], y[i]), fontsize=size, xytext=(2, 2), textcoords="offset points")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.axvline(0, color="grey", linewidth=0.5)
    ev = list(explained) if explained is not None else []
    ax.set_xlabel("PC1" + (f" ({100 * ev[0]:.1f}% var.)" if len(ev) > 0 else ""))
    ax.set_ylabel("PC2" + (f" ({100 * ev[1]:.1f}% var.)" if len(ev) > 1 else ""))
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "tasks on the top principal axes")
    return save_figure(fig, path)


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
              xlabel: str = "step", ylabel: str = "loss", title: str | None = None,
              logy: bool = False) -> pathlib.Path:
    """One line per named (x, y) series, e.g. training/held-out loss curves of each branch."""
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    colors = group_colors(max(len(series), 1))
    for (name, (xs, ys)), color in zip(series.items(), colors):
        ax.plot(np.asarray(xs), np.asarray(ys), label=str(name), color=color, linewidth=1.2,
                marker="o" if len(xs) < 40 else None, markersize=3)  # short runs: show every point
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if series:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def bar_plot(values: Mapping[str, float], path: str | os.PathLike, ylabel: str = "",
             title: str | None = None) -> pathlib.Path:
    """Bars for named scalars (e.g. token shares of the groups, benchmark scores of methods)."""
    fig = new_figure(max(4.0, 0.5 * len(values) + 2.0), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    names = list(values)
    ax.bar(range(len(names)), [float(values[n]) for n in names], color=group_colors(max(len(names), 1)))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
