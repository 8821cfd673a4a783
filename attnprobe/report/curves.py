"""The report's line figures: the per-layer profile, diagnostics over epochs and steps, training curves, and
several runs' layer profiles side by side.

Object-oriented matplotlib only (no pyplot, no global state); each function returns a ``Figure``. Choosing
which figures a report gets is figures.py's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from attnprobe.report.datatypes import PROFILE, column_values, numeric
from attnprobe.report.pattern_figures import FLAG_COLOR, to_png

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes


LINE_STYLES = ("-", "--", "-.", ":")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def layer_profile(layers: pd.DataFrame, title: str, collapse_threshold: float) -> bytes:
    """Per layer: normalized direct and indirect entropy and GTD (top), flagged heads (bottom)."""
    from matplotlib.figure import Figure

    x = layers["layer"].to_numpy(int)
    fig = Figure(figsize=(max(7.0, 0.32 * len(x) + 3.0), 5.8), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])
    for i, (column, label) in enumerate(PROFILE):
        top.plot(x, column_values(layers, column), marker=MARKERS[i], linestyle=LINE_STYLES[i], label=label)
    top.axhline(collapse_threshold, color="0.45", linewidth=0.9, linestyle=":",
                label=f"entropy-collapse threshold ({collapse_threshold:g})")
    top.set_ylim(0.0, 1.02)
    top.set_ylabel("mean over heads")
    top.grid(alpha=0.3)
    fig.suptitle(f"{title}: per-layer profile", fontsize=11)
    fig.legend(*top.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    flagged = column_values(layers, "flagged_heads")
    bottom.bar(x, np.nan_to_num(flagged), color=FLAG_COLOR, width=0.6)
    n_heads = np.nanmax(column_values(layers, "heads")) if "heads" in layers.columns else np.nanmax(flagged)
    bottom.set_ylim(0, max(1.0, float(np.nan_to_num(n_heads))))
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.set_ylabel("flagged\nheads")
    bottom.set_xlabel("layer")
    bottom.grid(axis="y", alpha=0.3)
    _layer_ticks(bottom, x)
    return to_png(fig)


def epoch_profiles(epoch_layers: dict[float, pd.DataFrame], title: str, bp_shift: bool) -> bytes:
    """Per-layer profiles before training (epoch 0) and after each epoch, one panel per metric."""
    from matplotlib.figure import Figure
    from matplotlib import colormaps

    panels = [*PROFILE, ("flagged_heads", "flagged heads")] + ([("bp_shift", "bp_shift")] if bp_shift else [])
    n_layers = max(len(df) for df in epoch_layers.values())
    cols = 3 if n_layers <= 12 else 2  # deep models get wider panels, not a wider figure
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(10.8 if cols == 3 else 11.0, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols).ravel()
    epochs = sorted(epoch_layers)
    shades = colormaps["viridis"](np.linspace(0.15, 0.85, max(1, len(epochs) - 1)))
    for ax, (column, label) in zip(axes, panels):
        for i, epoch in enumerate(epochs):
            df = epoch_layers[epoch]
            before = epoch == 0
            ax.plot(df["layer"].to_numpy(int), column_values(df, column), marker="o", markersize=4,
                    color="0.35" if before else shades[min(i - 1, len(shades) - 1)],
                    linestyle="--" if before else "-",
                    label="before training (epoch 0)" if before else f"after epoch {epoch:g}")
        _style_profile_axis(ax, column, label, epoch_layers[epochs[-1]]["layer"].to_numpy(int))
    handles = axes[0].get_legend_handles_labels()
    for ax in axes[len(panels):]:
        ax.axis("off")
    if len(axes) > len(panels):  # a free panel holds the legend
        axes[len(panels)].legend(*handles, loc="center", frameon=False, fontsize=9, title="diagnostics")
    else:
        fig.legend(*handles, loc="outside lower center", frameon=False, fontsize=9, ncols=min(len(epochs), 4))
    fig.suptitle(f"{title}: per-layer means over epochs", fontsize=11)
    return to_png(fig)


def step_curves(step_layers: dict[int, pd.DataFrame], title: str) -> bytes:
    """Each layer's mean of each metric over the optimizer steps it was diagnosed at, one panel per metric."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    panels = [*PROFILE, ("flagged_heads", "flagged heads")]
    steps = sorted(step_layers)
    layers = sorted({int(x) for df in step_layers.values() for x in df["layer"]})
    shades = colormaps["viridis_r"](np.linspace(0.1, 0.9, max(1, len(layers))))
    fig = Figure(figsize=(10.8, 6.6), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (column, label) in zip(axes, panels):
        for i, layer in enumerate(layers):
            values = []
            for step in steps:
                df = step_layers[step]
                row = df[df["layer"] == layer]
                values.append(float(numeric(row[column]).iloc[0]) if len(row) and column in row else np.nan)
            ax.plot(steps, values, marker="o", markersize=3, color=shades[i], label=f"layer {layer}")
        _style_metric_axis(ax, column, label, "optimizer step")
    handles = axes[0].get_legend_handles_labels()
    fig.legend(*handles, loc="outside right center", frameon=False, fontsize=9)
    fig.suptitle(f"{title}: per-layer means over training steps", fontsize=11)
    return to_png(fig)


def training_curves(history: pd.DataFrame, title: str) -> bytes:
    """Accuracy, F1 and MCC (left) and train and eval loss (right) over epochs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    scores, losses = fig.subplots(1, 2)
    for ax, columns in ((scores, ("accuracy", "f1", "mcc")), (losses, ("train_loss", "eval_loss"))):
        for i, column in enumerate(c for c in columns if c in history.columns):
            series = history[["epoch", column]].apply(numeric).dropna()
            if not series.empty:
                ax.plot(series["epoch"], series[column], marker=MARKERS[i], linestyle=LINE_STYLES[i],
                        markersize=4, label=column.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(steps=[1, 2, 5, 10])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9, frameon=False)
    scores.set_title("evaluation", fontsize=10)
    scores.set_ylabel("score")
    losses.set_title("loss", fontsize=10)
    losses.set_ylabel("loss")
    fig.suptitle(f"{title}: training", fontsize=11)
    return to_png(fig)


def compare_layers(runs: Sequence[tuple[str, pd.DataFrame]]) -> bytes:
    """Per-layer profiles of several runs overlaid: one panel per metric, one line per run."""
    from matplotlib.figure import Figure

    n_layers = max(len(df) for _, df in runs)
    width = min(5.5, max(4.4, 0.24 * n_layers + 3.0))
    fig = Figure(figsize=(2 * width, 7.6 + 0.25 * math.ceil(len(runs) / 3)), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    panels = [*PROFILE, ("flagged_heads", "flagged heads")]
    for ax, (column, label) in zip(axes, panels):
        for i, (name, df) in enumerate(runs):
            ax.plot(df["layer"].to_numpy(int), column_values(df, column), marker=MARKERS[i % len(MARKERS)],
                    linestyle=LINE_STYLES[i % len(LINE_STYLES)], markersize=4, color=f"C{i % 10}",
                    label=_legend_label(name))
        _style_profile_axis(ax, column, label, np.arange(n_layers))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", frameon=False, fontsize=9,
               ncols=min(len(runs), 3))
    fig.suptitle("Runs compared: per-layer means over heads", fontsize=11)
    return to_png(fig)


def _style_profile_axis(ax, column: str, label: str, layers) -> None:
    """Title, axis labels, limits and ticks shared by every per-layer profile panel."""
    _style_metric_axis(ax, column, label, "layer")
    _layer_ticks(ax, layers)


def _style_metric_axis(ax, column: str, label: str, xlabel: str) -> None:
    """Title, x label, grid and the metric's y range (normalized entropies in [0, 1], counts as integers)."""
    ax.set_title(label, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if column in ("direct_entropy_norm", "indirect_entropy_norm"):
        ax.set_ylim(0.0, 1.02)
    else:
        ax.set_ylim(bottom=0.0)
    if column == "flagged_heads":
        ax.yaxis.get_major_locator().set_params(integer=True)


def _layer_ticks(ax: Axes, layers: np.ndarray) -> None:
    step = 1 if len(layers) <= 16 else 2
    ax.set_xticks(range(0, int(layers.max()) + 1 if len(layers) else 1, step))


def _legend_label(value: str) -> str:
    # matplotlib leaves labels that start with '_' out of legends
    return f" {value}" if value.startswith("_") else value
