"""The report's per-head heatmaps: one metric over layers x heads per run, and the difference between two runs.

Object-oriented matplotlib only (no pyplot, no global state); each function returns a ``Figure`` and the
per-cell hover texts. Choosing which heatmaps a report gets is figures.py's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from attnprobe.report.datatypes import PROFILE, Hover, column_values
from attnprobe.report.pattern_figures import FLAG_STYLES, cell_hovers, flag_boxes, flag_legend, to_png

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


ANNOTATE_MAX = (8, 16)  # write values into cells up to this many layers x heads


DIFF = (("gtd", "GTD"), ("direct_entropy_norm", "normalized direct entropy"))


def heatmaps(heads: pd.DataFrame, shape: tuple[int, int], title: str, thresholds=None,
             hovers: list[Hover] | None = None) -> bytes:
    """GTD and normalized direct and indirect entropy per head, layers down, heads across; flags boxed.

    Each flagged head gets a red box per flag (line style = which flag; legend below). If ``hovers`` is
    a list, the hover rectangles of every cell (head, value, flags) are appended to it.
    """
    n_layers, n_heads = shape
    annotate = n_layers <= ANNOTATE_MAX[0] and n_heads <= ANNOTATE_MAX[1]
    fig, axes = _grid_figure(shape, 3, annotate)
    cell_flags = _cell_flags(heads, shape)
    panels = []
    for ax, (column, label) in zip(axes, (PROFILE[2], PROFILE[0], PROFILE[1])):
        grid = head_grid(heads, column, shape)
        top = 1.0 if column != "gtd" else _round_up(np.nanmax(grid) if np.isfinite(grid).any() else 1.0)
        image = ax.imshow(grid, cmap=_cmap("viridis"), vmin=0.0, vmax=top, aspect="auto",
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.08, pad=0.02)
        _head_axes(ax, shape, label)
        if annotate:
            _annotate(ax, grid, image, "{:.2f}")
        for (layer, head), names in cell_flags.items():
            flag_boxes(ax, head, layer, names, half=0.44)
        panels.append((ax, label, grid))
    fig.legend(handles=flag_legend(thresholds), loc="outside lower center", frameon=False, fontsize=8,
               ncols=2 if fig.get_figwidth() < 11 else 3, title="flagged heads: a red box per flag, its line style says which",
               title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    png = to_png(fig)
    if hovers is not None:
        words = {name: w for name, w, _ in FLAG_STYLES}
        for ax, label, grid in panels:
            texts = np.empty(shape, dtype=object)
            for (layer, head), value in np.ndenumerate(grid):
                flags = ", ".join(words[n] for n in cell_flags.get((layer, head), []))
                texts[layer, head] = (f"layer {layer}, head {head}: {label} {value:.4f}"
                                      + (f"; flagged: {flags}" if flags else ""))
            hovers.extend(cell_hovers(fig, ax, texts))
    return png


def _cell_flags(heads: pd.DataFrame, shape: tuple[int, int]) -> dict[tuple[int, int], list[str]]:
    """(layer, head) -> the flag columns set for it (only flagged heads)."""
    out: dict[tuple[int, int], list[str]] = {}
    for name, _, _ in FLAG_STYLES:
        if name not in heads.columns:
            continue
        grid = head_grid(heads, name, shape) > 0
        for layer, head in zip(*np.nonzero(grid)):
            out.setdefault((int(layer), int(head)), []).append(name)
    return out


def diff_heatmaps(heads_a: pd.DataFrame, heads_b: pd.DataFrame, shape: tuple[int, int], label_a: str,
                  label_b: str) -> bytes:
    """Per-head B minus A of GTD and normalized direct entropy, on a diverging scale centred on 0."""
    n_layers, n_heads = shape
    annotate = n_layers <= ANNOTATE_MAX[0] and n_heads <= ANNOTATE_MAX[1]
    fig, axes = _grid_figure(shape, 2, annotate)
    for ax, (column, label) in zip(axes, DIFF):
        grid = head_grid(heads_b, column, shape) - head_grid(heads_a, column, shape)
        finite = np.abs(grid[np.isfinite(grid)])
        bound = _round_up(finite.max()) if finite.size and finite.max() > 0 else 0.05
        image = ax.imshow(grid, cmap=_cmap("RdBu_r"), vmin=-bound, vmax=bound, aspect="auto",
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.08, pad=0.02)
        _head_axes(ax, shape, f"{label} difference")
        if annotate:
            _annotate(ax, grid, image, "{:+.2f}")
    fig.suptitle(f"{label_b}\nminus {label_a}", fontsize=11)
    return to_png(fig)


def head_grid(heads: pd.DataFrame, column: str, shape: tuple[int, int]) -> np.ndarray:
    """``heads[column]`` as an (L, H) float array; (layer, head) cells without a row are NaN."""
    grid = np.full(shape, np.nan)
    grid[heads["layer"].to_numpy(int), heads["head"].to_numpy(int)] = column_values(heads, column)
    return grid


def _grid_figure(shape: tuple[int, int], panels: int, annotate: bool) -> tuple[Figure, list[Axes]]:
    """A figure of per-head panels sized to the grid: side by side when they fit, else stacked."""
    from matplotlib.figure import Figure

    n_layers, n_heads = shape
    cell = 0.46 if annotate else 0.3
    width, height = max(3.6, n_heads * cell + 1.9), max(2.5, n_layers * cell + 1.2)
    # Side by side only while the row fits the HTML page (about 12 in at DPI) without being scaled down.
    side_by_side = panels * width <= 12.0
    rows, cols = (1, panels) if side_by_side else (panels, 1)
    fig = Figure(figsize=(cols * width, rows * height + 0.8), layout="constrained")
    return fig, list(fig.subplots(rows, cols, squeeze=False).ravel())


def _head_axes(ax: Axes, shape: tuple[int, int], title: str) -> None:
    n_layers, n_heads = shape
    size = 8 if max(shape) <= 16 else 7
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.tick_params(labelsize=size, length=2)


def _annotate(ax: Axes, grid: np.ndarray, image, fmt: str) -> None:
    """Write each cell's value, dark on light cells and light on dark ones."""
    for (layer, head), value in np.ndenumerate(grid):
        if not np.isfinite(value):
            continue
        r, g, b, _ = image.cmap(image.norm(value))
        ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(head, layer, fmt.format(value), ha="center", va="center", fontsize=7, color=ink)


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#d9d9d9")


def _round_up(value: float) -> float:
    """The next multiple of 0.05 at or above ``value`` (at least 0.05): a tidy colour-bar end."""
    return max(0.05, math.ceil(float(value) * 20 - 1e-9) / 20)
