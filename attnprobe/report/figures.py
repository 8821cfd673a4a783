"""The report's figures: which ones each run (or comparison) gets, with their titles and captions, as PNG bytes.

The drawing is heatmaps.py's (per-head grids), curves.py's (profiles and training curves) and thumbnails.py's,
all object-oriented matplotlib (``matplotlib.figure.Figure``, rendered by Agg through ``savefig``): no pyplot
and no global state, so a report can be drawn from a notebook or a thread without side effects. This module
reads no files and writes none (writer.py does both).
"""

from __future__ import annotations

from collections.abc import Sequence

from attnprobe.report import thumbnails
from attnprobe.report.curves import compare_layers, epoch_profiles, layer_profile, step_curves, training_curves
from attnprobe.report.datatypes import Hover, Plot, Run
from attnprobe.report.heatmaps import diff_heatmaps, heatmaps


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
        plots.extend(thumbnails.head_plots(run, notes))  # the head tables' thumbnails
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


def _png_width(png: bytes) -> int:
    return int.from_bytes(png[16:20], "big")  # the IHDR chunk of a PNG


def _png_height(png: bytes) -> int:
    return int.from_bytes(png[20:24], "big")


def _text(value: str, limit: int = 70) -> str:
    """A run-supplied string made safe for matplotlib text: no mathtext, not too long."""
    value = value if len(value) <= limit else value[: limit - 1] + "…"
    return value.replace("$", r"\$")


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
