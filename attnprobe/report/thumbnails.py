"""Thumbnails for the report's head tables: each flagged or extreme head's attention on the kept examples.

A scan's thumbnail is one row of small token-by-token heatmaps, one per example it kept (patterns.parquet).
A refine's has a row per stage, before training and after it, and for a refined layer of an SAOBP run the
plain attention before refinement in rows of its own, under the refined attention the model uses; the
columns are the eval examples the refine kept. Every cell of a thumbnail carries its weight as a hover
rectangle (query token -> key token: weight), whole examples at a time, up to MAX_HOVER_CELLS per figure.
Object-oriented matplotlib only (patternfigs.py holds the shared pieces); nothing here reads or writes files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnprobe.report.pattern_figures import MAX_HOVER_CELLS, cell_hovers, png_size, to_png, token_label
from attnprobe.report.datatypes import Hover, Plot, Run

MAX_THUMBNAILS = 48  # head thumbnails per run
STAGE_WORDS = {"before": "before training", "after": "after training"}


def head_plots(run: Run, notes: list[str]) -> list[Plot]:
    """A thumbnail Plot per flagged head and per extreme head (``Plot.head`` set), for the head tables."""
    if not run.patterns:
        notes.append(_missing_note(run))
        return []
    heads = [(int(r.layer), int(r.head)) for r in run.flagged.itertuples()]
    heads += [(int(r.layer), int(r.head)) for r in run.extremes.itertuples()] if run.extremes is not None else []
    heads = list(dict.fromkeys(heads))
    if len(heads) > MAX_THUMBNAILS:
        notes.append(f"{run.name}: thumbnails are drawn for the first {MAX_THUMBNAILS} of {len(heads)} heads.")
        heads = heads[:MAX_THUMBNAILS]
    n_layers, n_heads = run.patterns[0].probs.shape[:2]
    staged = any(p.stage is not None for p in run.patterns)
    plots = []
    for layer, head in heads:
        if layer >= n_layers or head >= n_heads:
            continue
        columns, rows = (stage_panels if staged else scan_panels)(run.patterns, layer, head)
        png, hovers, (width, height), hovered = thumbnail_grid(columns, rows)
        plots.append(Plot(f"{run.name}-head-L{layer}-H{head}.png", f"layer {layer}, head {head}",
                          _caption(layer, head, staged, hovered, len(columns)), png, run.name, hover=hovers,
                          head=(layer, head), width=width, height=height))
    return plots


def scan_panels(patterns: Sequence, layer: int, head: int):
    """Columns ``(title, tokens)`` and one unlabelled row of grids: the head on each kept example."""
    columns = [(f"example {p.row}", p.tokens) for p in patterns]
    return columns, [("", [p.probs[layer, head].numpy() for p in patterns])]


def stage_panels(patterns: Sequence, layer: int, head: int):
    """Columns (the examples kept after training) and labelled rows: before and after training, refined
    attention first; the plain attention in rows of its own where this layer was refined (SAOBP)."""
    by_stage = {stage: {p.row: p for p in patterns if p.stage == stage} for stage in STAGE_WORDS}
    examples = sorted(by_stage["after"] or by_stage["before"])
    stages = [s for s in STAGE_WORDS if by_stage[s]]
    refined = any(p.plain is not None and np.isfinite(p.plain[layer, head].numpy()).all()
                  for p in patterns)
    columns = [(f"example {row}", next(by_stage[s][row] for s in stages if row in by_stage[s]).tokens)
               for row in examples]
    rows = []
    for kind in ("refined", "plain") if refined else ("",):
        for stage in stages:
            label = STAGE_WORDS[stage] + (f"\n({kind})" if kind else "")
            grids = []
            for row in examples:
                p = by_stage[stage].get(row)
                source = None if p is None else p.plain if kind == "plain" else p.probs
                grids.append(None if source is None else source[layer, head].numpy())
            rows.append((label, grids))
    return columns, rows


def thumbnail_grid(columns: Sequence[tuple[str, Sequence[str]]],
                   rows: Sequence[tuple[str, Sequence[np.ndarray | None]]]
                   ) -> tuple[bytes, list[Hover], tuple[int, int], int]:
    """Small heatmaps, a column per example (title, tokens) and a row per labelled set of grids.

    A grid that is None leaves its panel empty. Returns the PNG, the hover rectangles (whole examples, in
    column order, while their cells fit in MAX_HOVER_CELLS), the PNG's size and how many examples have them.
    """
    from matplotlib.figure import Figure

    labelled = any(label for label, _ in rows)
    fig = Figure(figsize=(2.3 * len(columns) + (0.75 if labelled else 0.3), 2.45 * len(rows) + 0.3),
                 layout="constrained")
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (label, grids) in enumerate(rows):
        for c, ((title, tokens), grid) in enumerate(zip(columns, grids)):
            ax = axes[r, c]
            if grid is None:
                ax.axis("off")
                continue
            _panel(ax, grid, tokens)
            if r == 0:
                ax.set_title(title, fontsize=6.5, pad=2)
            if c == 0 and label:
                ax.set_ylabel(label, fontsize=6.5)
    png = to_png(fig)
    hovers: list[Hover] = []
    hovered = 0
    for c, (title, tokens) in enumerate(columns):
        cells = sum(len(tokens) ** 2 for _, grids in rows if grids[c] is not None)
        if len(hovers) + cells > MAX_HOVER_CELLS:
            break
        for r, (label, grids) in enumerate(rows):
            if grids[c] is not None:
                name = f"{title}, {label.replace(chr(10), ' ')}" if label else title
                hovers += cell_hovers(fig, axes[r, c], weight_texts(grids[c], tokens, name))
        hovered += 1
    return png, hovers, png_size(fig), hovered


def weight_texts(grid: np.ndarray, tokens: Sequence[str], name: str) -> np.ndarray:
    """``(n, n)`` hover texts: ``"NAME: query q 'tok' -> key k 'tok': weight"``.

    >>> weight_texts(np.array([[0.25, 0.75], [1.0, 0.0]]), ["a", "b"], "example 0")[0, 1]
    "example 0: query 0 'a' -> key 1 'b': 0.7500"
    """
    n = len(tokens)
    texts = np.empty((n, n), dtype=object)
    for q in range(n):
        for k in range(n):
            texts[q, k] = f"{name}: query {q} {tokens[q]!r} -> key {k} {tokens[k]!r}: {grid[q, k]:.4f}"
    return texts


def _panel(ax, grid: np.ndarray, tokens: Sequence[str]) -> None:
    """One small heatmap, queries down and keys across, the tokens (cut short) on both axes."""
    n = grid.shape[0]
    ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    labels = [token_label(t, 8) for t in tokens]
    font = 4.5 if n <= 24 else 3.5
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.tick_params(length=1, pad=1)


def _caption(layer: int, head: int, staged: bool, hovered: int, examples: int) -> str:
    what = (f"Attention of layer {layer}, head {head} on the eval examples the refine kept, before training "
            "and after it (the model saved to model/); in refined layers of an SAOBP run also the plain "
            "attention before refinement" if staged else
            f"Attention of layer {layer}, head {head} on the examples kept by the scan")
    hover = ("hover a cell for its weight" if hovered == examples else
             f"hover values for the first {hovered} of {examples} examples (at most {MAX_HOVER_CELLS} cells)")
    return f"{what} (queries down, keys across; {hover})."


def _missing_note(run: Run) -> str:
    options = run.meta.get("options") if isinstance(run.meta.get("options"), dict) else {}
    off = " (it ran with --patterns 0)" if options.get("patterns") == 0 else ""
    command = "refine" if run.kind == "refine" else "scan"
    return (f"{run.name}: the {command} kept no attention patterns (patterns.parquet){off}, so the head tables "
            f"have no thumbnails; rerun the {command} with --patterns 4.")
