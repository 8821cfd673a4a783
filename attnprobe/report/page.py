"""The self-contained HTML page of a report: inline CSS, figures as data URIs, no scripts, no URLs.

Every string that comes from a run (names, paths, run.json values, reasons, column names) goes through
``html.escape``, and a Content-Security-Policy forbids scripts and any fetch besides data: images, so a
hostile model name or option value cannot run in the reader's browser. This module builds markup only;
report.py decides what goes in and writes the file. (It is not called ``html.py`` so that it never
shadows the standard library's ``html`` module.)
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from attnprobe.report.datatypes import Plot, Run

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
META_ORDER = ("kind", "variant", "model", "data", "options", "thresholds", "final", "attnprobe_version")
SUMMARY_COLUMNS = (
    "layer", "heads", "direct_entropy", "direct_entropy_norm", "indirect_entropy", "indirect_entropy_norm",
    "gtd", "sink_mass", "first_mass", "bp_shift", "flagged_heads",
)
MAX_VALUE_CHARS = 400

STYLE = """
* { box-sizing: border-box; }
details > summary { cursor: pointer; }
summary h3 { display: inline; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       color: #1d1d1f; background: #fafafa; line-height: 1.45; }
main { max-width: 1240px; margin: 0 auto; padding: 1.5rem 2rem 3rem; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; }
h2 { font-size: 1.3rem; margin: 2.5rem 0 .6rem; padding-top: .8rem; border-top: 2px solid #d0d0d6; }
h3 { font-size: 1.05rem; margin: 1.6rem 0 .5rem; }
p.sub, p.path { color: #555; margin: .2rem 0; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .9em; }
nav ul { padding-left: 1.2rem; margin: .4rem 0; }
table { border-collapse: collapse; margin: .4rem 0 1rem; background: #fff; font-size: .88rem; }
th, td { border: 1px solid #d6d6dc; padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: #eef0f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.meta td:first-child { font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: nowrap; }
table.meta td { overflow-wrap: anywhere; max-width: 60rem; }
figure { margin: 1rem 0 1.6rem; background: #fff; border: 1px solid #e2e2e8; padding: .6rem; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figure { text-align: center; }
figcaption { text-align: left; }
div.hov { position: relative; display: inline-block; max-width: 100%; }
div.hov svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
div.hov rect { fill: #000; fill-opacity: 0; }
div.hov rect:hover { fill-opacity: .12; stroke: #000; stroke-width: 1.5; }
td.thumb img { display: block; max-width: 46rem; height: auto; }
figcaption { color: #444; font-size: .88rem; margin-top: .4rem; }
div.wide { overflow-x: auto; }
.notes { background: #fff8e1; border: 1px solid #f0d98c; padding: .5rem 1rem; }
.notes li { margin: .2rem 0; }
footer { color: #666; font-size: .82rem; margin-top: 3rem; border-top: 1px solid #ddd; padding-top: .6rem; }
"""


def page_head(title: str) -> str:
    """The opening of every attnprobe page: doctype, the no-network CSP, the style and the heading."""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
    ])


def render_page(*, runs: Sequence[Run], plots: Sequence[Plot], comparison: pd.DataFrame | None,
                notes: Sequence[str], generated: str, version: str) -> str:
    """The whole page as a string; ``comparison`` is the table of several runs (None for one run)."""
    title = "attnprobe report: " + (runs[0].label if len(runs) == 1 else f"{len(runs)} runs compared")
    parts = [
        page_head(title),
        f'<p class="sub">Written by attnprobe {esc(version)} on {esc(generated)}.</p>',
        _contents(runs, comparison is not None),
    ]
    if notes:
        parts.append('<section id="notes"><h2>Notes</h2><ul class="notes">')
        parts.extend(f"<li>{esc(note)}</li>" for note in notes)
        parts.append("</ul></section>")
    if comparison is not None:
        parts.append('<section id="comparison"><h2>Runs compared</h2>')
        parts.append(table(comparison, css="compare"))
        parts.extend(figure(p) for p in plots if p.run is None)
        parts.append("</section>")
    for run in runs:
        parts.append(_run_section(run, [p for p in plots if p.run == run.name]))
    parts.append(
        "<footer>GTD, direct and indirect entropy and the collapse flags follow attnprobe's own definitions "
        "(docs/method.md), reconstructed from the published description of Lee et al., \u201cMitigating "
        "Attention Localization in Small Scale: Self-Attention Refinement via One-step Belief "
        "Propagation\u201d (Findings of EMNLP 2025, arXiv 2509.07324); they are not the paper's code.</footer>"
    )
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _contents(runs: Sequence[Run], compared: bool) -> str:
    items = ['<li><a href="#comparison">Runs compared</a></li>'] if compared else []
    items += [f'<li><a href="#run-{esc(run.name)}">{esc(run.label)}</a> <code>{esc(str(run.path))}</code></li>'
              for run in runs]
    return f"<nav><ul>{''.join(items)}</ul></nav>"


def _run_section(run: Run, plots: Sequence[Plot]) -> str:
    n_layers, n_heads = run.shape
    parts = [
        f'<section id="run-{esc(run.name)}"><h2>{esc(run.label)}</h2>',
        f'<p class="path">{esc(run.kind)} run in <code>{esc(str(run.path))}</code>; model '
        f"<code>{esc(run.model_name)}</code>, {n_layers} layers x {n_heads} heads.</p>",
        "<h3>Summary per layer</h3>",
    ]
    if run.kind == "refine" and run.epoch_layers:
        parts.append(f'<p class="sub">After epoch {max(run.epoch_layers):g}, from diagnostics.parquet.</p>')
    columns = [c for c in SUMMARY_COLUMNS if c in run.layers.columns
               and not (c == "bp_shift" and run.layers[c].isna().all())]
    parts.append(table(run.layers[columns], css="summary"))
    thumbs = {p.head: p for p in plots if p.head is not None}
    plots = [p for p in plots if p.head is None]
    if plots:
        parts.append("<h3>Figures</h3>")
        parts.extend(figure(p) for p in plots)
    parts.append(f'<h3 id="flagged-{esc(run.name)}">Flagged heads ({len(run.flagged)} of {len(run.heads)})</h3>')
    if run.flagged.empty:
        parts.append("<p>No head is flagged.</p>")
    else:
        parts.append(table(run.flagged, css="flagged", thumbs=thumbs))
    if run.extremes is not None and not run.extremes.empty:
        parts.append("<h3>Most extreme heads</h3>")
        parts.append('<p class="sub">The heads with the highest and lowest GTD and normalized direct entropy, '
                     "flagged or not.</p>")
        parts.append(table(run.extremes, css="extremes", thumbs=thumbs))
    if thumbs:
        parts.append(f'<p class="sub">{esc(_thumbs_note(run))}</p>')
    # The full run.json is long: folded (plain HTML, no script), after the results.
    parts.append(f"<details><summary><h3>Run metadata</h3></summary>{_meta_table(run.meta)}</details>")
    parts.append("</section>")
    return "\n".join(parts)


def _thumbs_note(run: Run) -> str:
    if run.kind == "refine":
        kept = ("the eval examples the refine kept (patterns.parquet), before training and after it; in "
                "refined layers of an SAOBP run also the plain attention before refinement")
    else:
        kept = "the examples the scan kept (patterns.parquet)"
    return (f"Thumbnails: the head's attention on {kept}; queries down, keys across, darker = less weight. "
            "Hover a cell for its weight.")


def _meta_table(meta: dict[str, Any]) -> str:
    keys = [k for k in META_ORDER if k in meta] + sorted(k for k in meta if k not in META_ORDER and k != "complete")
    rows = []
    for key in keys:
        for name, value in flatten(meta[key], key):
            rows.append(f"<tr><td>{esc(name)}</td><td>{esc(_clip(_scalar(value, exact=True)))}</td></tr>")
    return f'<table class="meta"><tr><th>key</th><th>value</th></tr>{"".join(rows)}</table>'


def flatten(value: Any, prefix: str) -> list[tuple[str, Any]]:
    """Nested dicts as dotted keys; lists of scalars joined, other lists as JSON.

    >>> flatten({"model": {"name": "m", "layers": 2}, "tags": ["a", "b"]}, "run")
    [('run.model.name', 'm'), ('run.model.layers', 2), ('run.tags', 'a, b')]
    """
    if isinstance(value, dict):
        if not value:
            return [(prefix, "{}")]
        out: list[tuple[str, Any]] = []
        for key, inner in value.items():
            out.extend(flatten(inner, f"{prefix}.{key}"))
        return out
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            return [(prefix, ", ".join(_scalar(v, exact=True) for v in value))]
        return [(prefix, json.dumps(value, default=str))]
    return [(prefix, value)]


def table(df: pd.DataFrame, css: str, thumbs: dict | None = None) -> str:
    """A DataFrame as an HTML table, every header and cell escaped, numbers right-aligned.

    With ``thumbs`` ({(layer, head): Plot}), each row with a thumbnail for its (layer, head) gets it in an
    extra ``pattern`` column.
    """
    # <wbr> lets long column names such as indirect_entropy_norm wrap at their underscores
    with_thumbs = bool(thumbs) and {"layer", "head"} <= set(df.columns)
    head = "".join(f"<th>{esc(str(c)).replace('_', '_<wbr>')}</th>" for c in df.columns)
    head += "<th>pattern on the kept examples</th>" if with_thumbs else ""
    rows = []
    for record in df.itertuples(index=False):
        cells = []
        if with_thumbs:
            plot = thumbs.get((int(record.layer), int(record.head)))
            if plot is not None:
                cells.append(f'<td class="thumb">{image(plot)}</td>')
            else:
                cells.append("<td></td>")
        for value in record:
            numeric = isinstance(value, numbers.Number) and not isinstance(value, bool)
            cell_class = ' class="num"' if numeric else ""
            cells.append(f"<td{cell_class}>{esc(_scalar(value))}</td>")
        if with_thumbs:
            cells.append(cells.pop(0))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="wide"><table class="{esc(css)}"><tr>{head}</tr>{"".join(rows)}</table></div>'


def figure(plot: Plot) -> str:
    """One figure as <figure> with the PNG inline as a data: URI (``image``) and its caption."""
    return f"<figure>{image(plot)}<figcaption><b>{esc(plot.title)}.</b> {esc(plot.caption)}</figcaption></figure>"


def image(plot: Plot) -> str:
    """A plot's PNG as an <img> with a data: URI.

    A plot with ``hover`` rectangles gets an SVG laid over the image whose rectangles carry ``<title>``
    elements: the browser shows each cell's value as a tooltip, without any script.
    """
    data = base64.b64encode(plot.png).decode("ascii")
    img = f'<img alt="{esc(plot.title)}" src="data:image/png;base64,{data}">'
    if plot.hover and plot.width and plot.height:
        rects = "".join(f'<rect x="{h.x:.1f}" y="{h.y:.1f}" width="{h.width:.1f}" height="{h.height:.1f}">'
                        f"<title>{esc(h.text)}</title></rect>" for h in plot.hover)
        img = (f'<div class="hov">{img}<svg viewBox="0 0 {plot.width} {plot.height}" '
               f'preserveAspectRatio="none" aria-hidden="true">{rects}</svg></div>')
    return img


def esc(value: str) -> str:
    """``html.escape`` with quotes, for text and attribute values alike."""
    return html.escape(value, quote=True)


def _scalar(value: Any, exact: bool = False) -> str:
    """A cell's text: floats to 3 decimals in tables, to 6 significant digits (``exact``) in metadata."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalars
    if isinstance(value, float):
        if math.isnan(value):
            return "\u2013"
        if exact:
            return f"{value:.6g}"
        return f"{value:.3f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "\u2026"


SHOW_COLUMNS = ("layer", "head", "direct_entropy", "direct_entropy_norm", "indirect_entropy", "indirect_entropy_norm",
                "gtd", "self_mass", "local_mass", "first_mass", "special_mass", "sink_mass", "bp_shift")


def render_show_page(result, *, generated: str, version: str, thresholds) -> str:
    """The page of ``attnprobe show``: the sentence, its tokens, the figures, the per-head metrics."""
    from attnprobe.report.datatypes import flag_reasons

    meta = result.meta
    model = meta["model"].get("name", "model")
    title = f"attnprobe show: {model}"
    heads = result.heads
    if result.selected:
        keys = set(result.selected)
        heads = heads[[(int(r.layer), int(r.head)) in keys for r in heads.itertuples()]]
    columns = [c for c in SHOW_COLUMNS if c in heads.columns and not (c == "bp_shift" and heads[c].isna().all())]
    metrics = heads[columns].copy()
    metrics["flags"] = ["; ".join(flag_reasons(rec, thresholds)) or "\u2013" for rec in heads.to_dict("records")]
    tokens = " ".join(f"<code>{i}:{esc(t)}</code>" for i, t in enumerate(result.tokens))
    saobp = meta.get("saobp")
    parts = [
        page_head(title),
        f'<p class="sub">Written by attnprobe {esc(version)} on {esc(generated)}; model <code>{esc(str(model))}</code> '
        f"({esc(str(meta['model'].get('architecture', '?')))}, {result.pattern.probs.shape[0]} layers x "
        f"{result.pattern.probs.shape[1]} heads).</p>",
        f"<p><b>Text:</b> {esc(meta['text'])}</p>",
    ]
    if meta.get("pair"):
        parts.append(f"<p><b>Pair:</b> {esc(meta['pair'])}</p>")
    if saobp:
        parts.append(f'<p class="sub">SAOBP model ({esc(json.dumps(saobp))}): the figures show the refined '
                     "attention the model uses beside the plain attention; bp_shift is the mass it moved.</p>")
    parts.append(f'<p class="sub">{len(result.tokens)} tokens: {tokens}</p>')
    if result.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in result.notes) + "</ul>")
    parts.extend(figure(p) for p in result.plots)
    parts.append("<h2>Per-head metrics of this sentence</h2>")
    parts.append('<p class="sub">Computed by the same probe as <code>attnprobe scan</code> on this one sentence '
                 "(docs/method.md); flags use the thresholds of the scan defaults or the options given.</p>")
    parts.append(table(metrics, css="metrics"))
    parts.append("</main></body></html>\n")
    return "\n".join(parts)
