"""The report's figures: which ones each run (or comparison) gets, drawn with matplotlib, as PNG bytes.

Object-oriented matplotlib only (``matplotlib.figure.Figure``, rendered by Agg through ``savefig``):
no pyplot and no global state, so a report can be drawn from a notebook or a thread without side
effects. This module reads no files and writes none (report.py does both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from attnprobe import thumbfigs
from attnprobe.patternfigs import FLAG_COLOR, FLAG_STYLES, cell_hovers, flag_boxes, flag_legend, to_png
from attnprobe.reporttypes import Hover, Plot, Run

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PROFILE = (
    ("direct_entropy_norm", "normalized direct entropy"),
    ("indirect_entropy_norm", "normalized indirect entropy"),
    ("gtd", "GTD"),
)
DIFF = (("gtd", "GTD"), ("direct_entropy_norm", "normalized direct entropy"))
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
ANNOTATE_MAX = (8, 16)  # write values into cells up to this many layers x heads


def render_all(runs: Sequence[Run], notes: list[str]) -> list[Plot]:
    """Every figure of a report: per run heatmaps, layer profile and training curves; then comparisons."""
    plots: list[Plot] = []
    for run in runs:
        hovers: list[Hover] = []
        png = heatmaps(run.heads, run.shape, _heatmap_title(run), run.thresholds, hovers)
        plots.append(Plot(f"{run.name}-heatmaps.png", f"{run.label}: per-head heatmaps", _heatmap_caption(run),
                          png, run.name, hover=hovers, width=_png_width(png), height=_png_height(png)))
        if run.kind == "refine":
            bp_shift = len(run.epoch_layers) > 0 and any(
                "bp_shift" in df.columns and df["bp_shift"].notna().any() for df in run.epoch_layers.values())
            if not bp_shift:
                notes.append(f"{run.name}: bp_shift is null for every head (no SAOBP refinement in this run), "
                             "so its bp_shift panel is left out.")
            plots.append(Plot(f"{run.name}-layers.png", f"{run.label}: per-layer profile over epochs",
                              "Means over heads per layer, before training (epoch 0, dashed) and after each "
                              "epoch, from diagnostics.parquet.",
                              epoch_profiles(run.epoch_layers, _text(run.label), bp_shift), run.name))
            if len(run.step_layers) >= 3:
                plots.append(Plot(f"{run.name}-steps.png", f"{run.label}: diagnostics over training steps",
                                  "Means over heads of each layer at every diagnosis (optimizer step on the x "
                                  "axis), from diagnostics.parquet: deeper layers in darker colours.",
                                  step_curves(run.step_layers, _text(run.label)), run.name))
            if run.history is None or run.history.drop(columns=["epoch", "step"], errors="ignore").dropna(
                    how="all").empty:
                notes.append(f"{run.name}: history.parquet has no evaluations, so there is no training figure.")
            else:
                plots.append(Plot(f"{run.name}-training.png", f"{run.label}: training",
                                  "Evaluation metrics and losses over epochs, from history.parquet.",
                                  training_curves(run.history, _text(run.label)), run.name))
        else:
            plots.append(Plot(f"{run.name}-layers.png", f"{run.label}: per-layer profile",
                              "Means over heads per layer (top) and the number of flagged heads per layer "
                              "(bottom), from layers.parquet.",
                              layer_profile(run.layers, _text(run.label), run.thresholds.entropy_collapse),
                              run.name))
        plots.extend(thumbfigs.head_plots(run, notes))  # the head tables' thumbnails
    if len(runs) < 2:
        return plots
    first = runs[0]
    plots.append(Plot("compare-layers.png", "Runs compared: per-layer profiles",
                      "Means over heads per layer, one line per run.",
                      compare_layers([(_text(r.label), r.layers) for r in runs])))
    models = {r.model_name for r in runs}
    for run in runs[1:]:
        if run.shape != first.shape:
            notes.append(
                f"{run.name} has {run.shape[0]} layers x {run.shape[1]} heads and {first.name} has "
                f"{first.shape[0]} x {first.shape[1]}; per-head differences are drawn only for runs whose "
                "(layers, heads) shape matches the first run's.")
            continue
        plots.append(Plot(f"compare-diff-{run.name}.png", f"{run.name} minus {first.name}: per-head differences",
                          f"Per head, {run.label} minus {first.label}; red: higher in {run.name}, blue: lower.",
                          diff_heatmaps(first.heads, run.heads, first.shape, _text(first.label), _text(run.label))))
    if len(models) > 1:
        notes.append(f"The runs use different models ({', '.join(sorted(models))}); per-head differences "
                     "compare heads by position only.")
    return plots


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


def _png_width(png: bytes) -> int:
    return int.from_bytes(png[16:20], "big")  # the IHDR chunk of a PNG


def _png_height(png: bytes) -> int:
    return int.from_bytes(png[20:24], "big")


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


def layer_profile(layers: pd.DataFrame, title: str, collapse_threshold: float) -> bytes:
    """Per layer: normalized direct and indirect entropy and GTD (top), flagged heads (bottom)."""
    from matplotlib.figure import Figure

    x = layers["layer"].to_numpy(int)
    fig = Figure(figsize=(max(7.0, 0.32 * len(x) + 3.0), 5.8), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])
    for i, (column, label) in enumerate(PROFILE):
        top.plot(x, _values(layers, column), marker=MARKERS[i], linestyle=LINE_STYLES[i], label=label)
    top.axhline(collapse_threshold, color="0.45", linewidth=0.9, linestyle=":",
                label=f"entropy-collapse threshold ({collapse_threshold:g})")
    top.set_ylim(0.0, 1.02)
    top.set_ylabel("mean over heads")
    top.grid(alpha=0.3)
    fig.suptitle(f"{title}: per-layer profile", fontsize=11)
    fig.legend(*top.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    flagged = _values(layers, "flagged_heads")
    bottom.bar(x, np.nan_to_num(flagged), color=FLAG_COLOR, width=0.6)
    n_heads = np.nanmax(_values(layers, "heads")) if "heads" in layers.columns else np.nanmax(flagged)
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
            ax.plot(df["layer"].to_numpy(int), _values(df, column), marker="o", markersize=4,
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
                values.append(float(_numeric(row[column]).iloc[0]) if len(row) and column in row else np.nan)
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
            series = history[["epoch", column]].apply(_numeric).dropna()
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
            ax.plot(df["layer"].to_numpy(int), _values(df, column), marker=MARKERS[i % len(MARKERS)],
                    linestyle=LINE_STYLES[i % len(LINE_STYLES)], markersize=4, color=f"C{i % 10}",
                    label=_legend_label(name))
        _style_profile_axis(ax, column, label, np.arange(n_layers))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", frameon=False, fontsize=9,
               ncols=min(len(runs), 3))
    fig.suptitle("Runs compared: per-layer means over heads", fontsize=11)
    return to_png(fig)


def head_grid(heads: pd.DataFrame, column: str, shape: tuple[int, int]) -> np.ndarray:
    """``heads[column]`` as an (L, H) float array; (layer, head) cells without a row are NaN."""
    grid = np.full(shape, np.nan)
    grid[heads["layer"].to_numpy(int), heads["head"].to_numpy(int)] = _values(heads, column)
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


def _values(df: pd.DataFrame, column: str) -> np.ndarray:
    if column not in df.columns:
        return np.full(len(df), np.nan)
    return _numeric(df[column]).to_numpy(float)


def _numeric(series: pd.Series) -> pd.Series:
    import pandas as pd

    return pd.to_numeric(series, errors="coerce").astype(float)


def _round_up(value: float) -> float:
    """The next multiple of 0.05 at or above ``value`` (at least 0.05): a tidy colour-bar end."""
    return max(0.05, math.ceil(float(value) * 20 - 1e-9) / 20)


def _text(value: str, limit: int = 70) -> str:
    """A run-supplied string made safe for matplotlib text: no mathtext, not too long."""
    value = value if len(value) <= limit else value[: limit - 1] + "…"
    return value.replace("$", r"\$")


def _legend_label(value: str) -> str:
    # matplotlib leaves labels that start with '_' out of legends
    return f" {value}" if value.startswith("_") else value


def _heatmap_title(run: Run) -> str:
    n_layers, n_heads = run.shape
    when = ""
    if run.kind == "refine" and run.epoch_layers:
        when = f", after epoch {max(run.epoch_layers):g}"
    return f"{_text(run.label)}: per-head diagnostics ({n_layers} layers x {n_heads} heads{when})"


def _heatmap_caption(run: Run) -> str:
    source = "the last epoch of diagnostics.parquet" if run.kind == "refine" else "heads.parquet"
    return (f"Per-head values from {source}: layers down, heads across, both numbered from 0. "
            "A red box marks a flagged head; its line style says which flag (legend), nested boxes mean "
            "several. Grey cells have no data. In the HTML page, hover a cell for its value.")
