"""explore.html: one offline page to click through every head's numbers and its attention pattern.

The page is a single file: its one script (explore.js) and style (explore.css) are package data inlined
verbatim, the script allowed by a Content-Security-Policy hash of its exact bytes (no ``unsafe-inline``, no
event attributes, nothing fetched), and the data sits in ``<script type="application/json">`` blocks with
``<``, ``>``, ``&``, U+2028 and U+2029 escaped, so no string from a run can end a block or run. The data itself
comes from explore_data.py; this module renders and sizes the page and writes nothing (writer.py and show.py do).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

from attnprobe.report import explore_data

if TYPE_CHECKING:
    from attnprobe.report.datatypes import Run

EXPLORE_NAME = "explore.html"
BUDGET_BYTES = 10 * 1024 * 1024  # docs/formats.md: the page's size above which only important heads keep patterns
DATA_ID = "explore-data"
PATTERNS_ID = "explore-patterns-{}"
_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


@dataclass
class ExplorePage:
    """A rendered explore.html: its markup, whether the size budget cut patterns, and notes for the reader."""

    markup: str
    reduced: bool = False
    notes: list[str] = field(default_factory=list)


def asset(name: str) -> str:
    """The text of a package data file of the report wing (explore.js, explore.css)."""
    return resources.files("attnprobe.report").joinpath(name).read_text(encoding="utf-8")


def json_block(value) -> str:
    """``value`` as JSON that is safe inside ``<script type="application/json">``: the characters that could
    end the element or the line, or start markup, are written as ``\\uXXXX`` escapes, which JSON reads back as
    the same characters.

    >>> json_block({"t": "</script>&\\u2028"})
    '{"t": "\\\\u003c/script\\\\u003e\\\\u0026\\\\u2028"}'
    """
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))
    return "".join(_ESCAPES.get(c, c) for c in text)


def script_hash(script: str) -> str:
    """The CSP source for an inline script: ``'sha256-<base64 of the digest of its UTF-8 bytes>'``."""
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def csp(script: str) -> str:
    """The page's Content-Security-Policy: nothing by default, the one script by its hash, inline style,
    images only from data: and blob: (the PNG export)."""
    return f"default-src 'none'; script-src {script_hash(script)}; style-src 'unsafe-inline'; img-src data: blob:"


def render(runs: Sequence[Run], *, title: str, notes: Sequence[str], generated: str, version: str,
           budget: int | None = None) -> ExplorePage:
    """explore.html for ``runs``: every head's pattern, or above ``budget`` bytes (default BUDGET_BYTES) only
    the flagged and most extreme heads', with a notice in the page."""
    budget = BUDGET_BYTES if budget is None else budget
    data, blocks = explore_data.payload(runs)
    page = _page(data, blocks, title=title, notes=notes, generated=generated, version=version, notice=None)
    if len(page.encode("utf-8")) <= budget:
        return ExplorePage(page)
    keep = {(r, layer, head) for r, run in enumerate(runs) for layer, head in explore_data.important_heads(run)}
    total = sum(run.shape[0] * run.shape[1] for run in runs)
    full_mb = len(page.encode("utf-8")) / 2**20
    notice = (f"With every head's patterns this page would be {full_mb:.1f} MB, over the {budget / 2**20:.1f} MB "
              f"budget: it holds the patterns of the flagged and most extreme heads only ({len(keep)} of {total} "
              "heads); every head's metrics are complete. patterns.parquet has all of them.")
    data, blocks = explore_data.payload(runs, keep=keep)
    page = _page(data, blocks, title=title, notes=notes, generated=generated, version=version, notice=notice)
    return ExplorePage(page, reduced=True, notes=[notice])


def _page(data: dict, blocks: list[dict], *, title: str, notes: Sequence[str], generated: str, version: str,
          notice: str | None) -> str:
    from attnprobe.report.page import esc

    data = {**data, "title": title, "generated": generated, "version": version, "notes": list(notes),
            "notice": notice}
    script = asset("explore.js")
    style = asset("explore.css")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(csp(script))}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{style}</style></head><body>",
        f'<header><h1>{esc(title)}</h1><p class="sub">Written by attnprobe {esc(version)} on {esc(generated)}. '
        "Every number is read from heads.parquet, layers.parquet (or diagnostics.parquet) and patterns.parquet; "
        "patterns are drawn from 8-bit copies of their weights.</p></header>",
        '<noscript><p class="notice">This page needs JavaScript; report.html shows the same runs without it.'
        "</p></noscript>",
        '<main id="app"></main>',
        f'<script type="application/json" id="{DATA_ID}">{json_block(data)}</script>',
    ]
    parts += [f'<script type="application/json" id="{PATTERNS_ID.format(i)}">{json_block(block)}</script>'
              for i, block in enumerate(blocks)]
    parts.append(f"<script>{script}</script>")
    parts.append("</body></html>\n")
    return "\n".join(parts)

