"""Figures of attention patterns over tokens: one head large, every head of a model small (``attnprobe show``).

Also the pieces the per-head metric heatmaps and the report's thumbnails (thumbfigs.py) share with them:
the flag boxes (one red box per flagged head, its line style saying which flag) and the hover rectangles
the HTML page lays over a PNG. Object-oriented matplotlib only, like figures.py; nothing here reads or
writes files.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from typing import TYPE_CHECKING

import numpy as np

from attnprobe.report.datatypes import Hover

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
FLAG_COLOR = "#e8175d"
# (flag column, words, line style of its box): every flagged head gets a red box; nested boxes, one per
# flag it has, in this order from the outside in; the style says which flag.
FLAG_STYLES = (
    ("entropy_collapse", "entropy collapse", "-"),
    ("low_gtd", "low GTD", (0, (4, 1.5))),
    ("high_gtd", "high GTD", (0, (1.2, 1.2))),
    ("sink", "sink", (0, (5, 1.5, 1, 1.5))),
    ("diffuse", "diffuse", (0, (2.5, 1, 1, 1, 1, 1))),
    ("nonfinite_flag", "non-finite attention", (0, (0.6, 2))),
)
LABEL_CHARS = 10  # token labels longer than this are cut, with an ellipsis
MAX_HOVER_CELLS = 4096  # per figure; beyond it the page gets no hover values for that figure


def token_label(token: str, limit: int = LABEL_CHARS) -> str:
    """A token as an axis label: cut to ``limit`` characters, mathtext disarmed.

    >>> token_label("internationalization")
    'internati…'
    """
    token = token if len(token) <= limit else token[: limit - 1] + "\u2026"
    return token.replace("$", r"\$")


def flag_legend(thresholds=None) -> list:
    """Legend handles: one red box style per flag, with its rule when ``thresholds`` is given."""
    from matplotlib.patches import Patch

    rules = {}
    if thresholds is not None:
        rules = {"entropy_collapse": f"normalized direct entropy < {thresholds.entropy_collapse:g}",
                 "low_gtd": f"GTD < {thresholds.low_gtd:g}", "high_gtd": f"GTD > {thresholds.high_gtd:g}",
                 "sink": f"sink mass > {thresholds.sink:g}",
                 "diffuse": f"normalized direct entropy > {thresholds.diffuse:g}",
                 "nonfinite_flag": "rows with NaN/Inf"}
    return [Patch(fill=False, edgecolor=FLAG_COLOR, linewidth=1.6, linestyle=style,
                  label=f"{words} ({rules[name]})" if name in rules else words)
            for name, words, style in FLAG_STYLES]


def flag_boxes(ax: Axes, x: float, y: float, flags: Sequence[str], half: float = 0.46) -> None:
    """Nested red boxes around the cell centred at (x, y), one per flag in ``flags``."""
    from matplotlib.patches import Rectangle

    styles = [(name, style) for name, _, style in FLAG_STYLES if name in flags]
    for i, (_, style) in enumerate(styles):
        h = max(0.12, half - 0.09 * i)
        ax.add_patch(Rectangle((x - h, y - h), 2 * h, 2 * h, fill=False, edgecolor=FLAG_COLOR,
                               linewidth=1.8 if i == 0 else 1.3, linestyle=style))


def to_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes (no 'Software' text chunk, so the bytes hold no URL)."""
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def png_size(fig: Figure) -> tuple[int, int]:
    """(width, height) in pixels of the PNG ``to_png`` writes."""
    w, h = fig.get_size_inches() * DPI
    return int(round(w)), int(round(h))


def cell_hovers(fig: Figure, ax: Axes, texts: np.ndarray) -> list[Hover]:
    """Hover rectangles over an ``imshow`` grid (origin upper, aspect auto), after ``to_png`` drew it.

    ``texts`` is an ``(R, C)`` array of strings; empty strings get no rectangle.
    """
    width, height = png_size(fig)
    box = ax.get_position()  # figure fractions, as laid out by the last draw
    rows, cols = texts.shape
    cw, ch = box.width * width / cols, box.height * height / rows
    x0, y0 = box.x0 * width, (1.0 - box.y1) * height
    return [Hover(x0 + c * cw, y0 + r * ch, cw, ch, str(texts[r, c]))
            for r in range(rows) for c in range(cols) if texts[r, c]]


def head_view(probs: np.ndarray, tokens: Sequence[str], title: str,
              plain: np.ndarray | None = None) -> tuple[bytes, list[Hover], tuple[int, int]]:
    """One head large: queries down, keys across, tokens on both axes; plain beside refined if given.

    Returns the PNG, the hover rectangles (query, key, weight of every cell) and the PNG's size.
    """
    from matplotlib.figure import Figure

    n = len(tokens)
    panels = [("plain attention", plain), ("refined attention (SAOBP)", probs)] if plain is not None else \
        [("attention", probs)]
    import textwrap

    side = min(9.0, max(3.2, 0.17 * n + 1.4))
    font = 8 if n <= 24 else 7 if n <= 40 else 5.5
    width = max(7.5, len(panels) * (side + 1.3) + 0.3)
    title = "\n".join(textwrap.fill(line, int(width * 12.5)) for line in title.splitlines())
    fig = Figure(figsize=(width, side + 1.7 + 0.17 * title.count("\n")), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    labels = [token_label(t) for t in tokens]
    image = None
    for ax, (name, grid) in zip(axes, panels):
        image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=max(1e-6, float(np.nanmax(probs))),
                          aspect="auto", interpolation="nearest")
        ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
        ax.set_yticks(range(n), labels, fontsize=font)
        ax.tick_params(length=1.5, pad=1.5)
        ax.set_xlabel("key (attended to)", fontsize=9)
        ax.set_ylabel("query (attending)", fontsize=9)
        if len(panels) > 1:
            ax.set_title(name, fontsize=10)
    fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.02, label="attention weight")
    fig.suptitle(title, fontsize=9)
    png = to_png(fig)
    hovers: list[Hover] = []
    if len(panels) * n * n <= MAX_HOVER_CELLS:
        for ax, (name, grid) in zip(axes, panels):
            texts = np.empty((n, n), dtype=object)
            for q in range(n):
                for k in range(n):
                    texts[q, k] = f"{name}: query {q} {tokens[q]!r} -> key {k} {tokens[k]!r}: {grid[q, k]:.4f}"
            hovers += cell_hovers(fig, ax, texts)
    return png, hovers, png_size(fig)


def model_view(probs: np.ndarray, flags: dict[tuple[int, int], list[str]], title: str,
               thresholds=None) -> bytes:
    """Every layer x head as a small token-by-token heatmap (layers down, heads across), flags boxed.

    ``probs`` is ``(L, H, n, n)``; ``flags`` maps (layer, head) to its flag names.
    """
    from matplotlib.figure import Figure

    L, H, n, _ = probs.shape
    cell = 0.95 if H <= 8 else 0.8 if H <= 12 else 0.62
    fig = Figure(figsize=(H * cell + 0.9, L * cell + 1.5), layout="constrained")
    axes = fig.subplots(L, H, squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer, head]
            ax.imshow(probs[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            names = flags.get((layer, head), [])
            styles = [style for name, _, style in FLAG_STYLES if name in names]
            for side in ax.spines.values():
                side.set_edgecolor(FLAG_COLOR if styles else "0.75")
                side.set_linewidth(2.2 if styles else 0.6)
                side.set_linestyle(styles[0] if styles else "-")
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=7, pad=2)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=7)
    if flags:
        fig.legend(handles=flag_legend(thresholds), loc="outside lower center", frameon=False, fontsize=7,
                   ncols=3, title="red frame: flagged on this sentence (first flag's line style)",
                   title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    return to_png(fig)
