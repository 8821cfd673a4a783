"""The data of explore.html: every head's numbers as they are in the Parquet files, and its patterns for display.

``payload`` turns loaded runs into two JSON-ready parts: the metrics (heads.parquet and layers.parquet columns at
full precision, flag reasons as the static report words them, one heads table per diagnosis that can be compared),
and per run the kept patterns, quantized for drawing only: the square root of each weight as a byte (0..255),
base64, one string per (example, head). Per query it adds the numbers a pattern strip shows, computed here from the
float32 weights of patterns.parquet, never in the browser: the row entropy (nats and over log n_i), the mass on
position 0, and for sentence pairs the attention between the two segments. It renders no markup (explore.py).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from attnprobe.report.datatypes import METRICS, flag_reasons

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from attnprobe.capture.patterns import Pattern
    from attnprobe.report.datatypes import Run

# Tokens that end segment A of a sentence pair (the [SEP] split, docs/formats.md).
SEPARATORS = frozenset({"[SEP]", "</s>", "<sep>", "[sep]"})
THRESHOLD_NAMES = ("entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse")
FLAG_COLUMNS = ("entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse", "collapsed", "nonfinite_flag",
                "flagged")
STRIP_DIGITS = 6  # decimals of the per-query strips (display numbers; the metrics keep every digit)


def payload(runs: Sequence[Run], *, keep: set[tuple[int, int, int]] | None = None) -> tuple[dict, list[dict]]:
    """The page's metrics block and one patterns block per run.

    Args:
        runs: loaded runs (report.writer.load_run) or a show sentence dressed as one.
        keep: ``(run index, layer, head)`` whose patterns are embedded; None embeds every head's.

    Returns:
        ``(data, patterns)``: ``data`` holds ``runs`` and ``sets`` (heads tables that can be shown and compared);
        ``patterns[r]`` the examples of run r, arrays indexed by ``layer * H + head`` (null where not embedded).
    """
    data: dict[str, Any] = {"metrics": [], "flags": list(FLAG_COLUMNS), "runs": [], "sets": []}
    blocks = []
    metric_columns: list[str] = []
    for r, run in enumerate(runs):
        n_layers, n_heads = run.shape
        data["runs"].append({
            "name": run.name, "label": run.label, "kind": run.kind, "model": run.model_name,
            "variant": run.variant, "shape": [n_layers, n_heads], "path": str(run.path),
            "thresholds": {k: getattr(run.thresholds, k) for k in THRESHOLD_NAMES},
            "layers": columns(run.layers, [c for c in run.layers.columns]),
            "examples": [example_info(p) for p in run.patterns],
        })
        for label, stage, heads in head_sets(run):
            table = head_table(heads, run)
            metric_columns += [c for c in table if c not in metric_columns and c not in FLAG_COLUMNS
                               and c not in ("layer", "head", "reasons")]
            data["sets"].append({"run": r, "label": label, "stage": stage, "heads": table})
        blocks.append({"examples": [example_patterns(p, n_layers, n_heads,
                                                     None if keep is None else {(l, h) for (i, l, h) in keep if i == r})
                                    for p in run.patterns]})
    data["metrics"] = metric_columns
    return data, blocks


def head_sets(run: Run) -> list[tuple[str, str | None, pd.DataFrame]]:
    """The heads tables of a run: a scan's heads.parquet; a refine's first and last diagnosis (before / after
    training), each with the stage of patterns.parquet it goes with."""
    if run.kind != "refine":
        return [(run.label, None, run.heads)]
    sets = []
    before = run.first_heads
    if before is not None:
        sets.append((f"{run.label}: before training (epoch {_epoch(before)})", "before", before))
    sets.append((f"{run.label}: after training (epoch {_epoch(run.heads)})", "after", run.heads))
    return sets


def _epoch(heads: pd.DataFrame) -> str:
    if "epoch" not in heads.columns or heads["epoch"].isna().all():
        return "?"
    return f"{float(heads['epoch'].iloc[0]):g}"


def head_table(heads: pd.DataFrame, run: Run) -> dict[str, list]:
    """One heads table, column by column in (layer, head) order: every numeric column at full precision,
    the flag columns as booleans, and ``reasons`` (report.datatypes.flag_reasons) per head."""
    heads = heads.sort_values(["layer", "head"], kind="stable")
    numeric = [c for c in heads.columns if c not in FLAG_COLUMNS and c not in ("layer", "head", "epoch", "step")
               and _is_numeric(heads[c])]
    ordered = [c for c in METRICS if c in numeric] + [c for c in numeric if c not in METRICS]
    table = {"layer": [int(v) for v in heads["layer"]], "head": [int(v) for v in heads["head"]]}
    table.update(columns(heads, ordered))
    for flag in FLAG_COLUMNS:
        if flag in heads.columns:
            table[flag] = [bool(v) for v in heads[flag]]
    table["reasons"] = [flag_reasons(rec, run.thresholds) for rec in heads.to_dict("records")]
    return table


def columns(df: pd.DataFrame, names: Sequence[str]) -> dict[str, list]:
    """``{name: values}`` with Python floats and ints as they are (NaN and None as null, booleans kept)."""
    out = {}
    for name in names:
        out[name] = [_value(v) for v in df[name].tolist()]
    return out


def _value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return None if not math.isfinite(v) else v
    if isinstance(v, (int, bool)):
        return v
    return str(v)


def _is_numeric(series: pd.Series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def example_info(p: Pattern) -> dict[str, Any]:
    """What the page shows about one kept example besides its weights."""
    return {"example": int(p.row), "stage": p.stage, "tokens": [str(t) for t in p.tokens],
            "causal": is_causal(p.probs.numpy()), "split": segment_split(p.tokens),
            "plain": p.plain is not None}


def is_causal(probs: np.ndarray) -> bool:
    """True when every head's weight above the diagonal (a key after its query) is exactly 0: a causal mask.

    >>> import numpy as np
    >>> is_causal(np.array([[[[1.0, 0.0], [0.5, 0.5]]]])), is_causal(np.array([[[[0.9, 0.1], [0.5, 0.5]]]]))
    (True, False)
    """
    import numpy as np

    n = probs.shape[-1]
    if n < 2:
        return False
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    return bool((probs[..., upper] == 0).all())


def segment_split(tokens: Sequence[str]) -> int | None:
    """Where segment B of a sentence pair starts: after the first separator token and any separators right after
    it, when a token other than a separator follows; None for a single sentence.

    >>> segment_split(["[CLS]", "a", "[SEP]", "b", "[SEP]"]), segment_split(["<s>", "a", "</s>", "</s>", "b", "</s>"])
    (3, 4)
    >>> segment_split(["[CLS]", "a", "[SEP]"]) is None
    True
    """
    tokens = list(tokens)
    for i, tok in enumerate(tokens):
        if tok in SEPARATORS:
            j = i + 1
            while j < len(tokens) and tokens[j] in SEPARATORS:
                j += 1
            rest = [t for t in tokens[j:] if t not in SEPARATORS]
            return j if rest else None
    return None


def quantize(weights: np.ndarray) -> bytes:
    """Weights in [0, 1] as bytes for display: ``round(sqrt(w) * 255)``, so small weights stay visible.

    >>> list(quantize(__import__("numpy").array([0.0, 0.25, 1.0])))
    [0, 128, 255]
    """
    import numpy as np

    w = np.nan_to_num(np.asarray(weights, dtype=np.float64), nan=0.0)
    return np.rint(np.sqrt(np.clip(w, 0.0, 1.0)) * 255).astype(np.uint8).tobytes()


def row_strips(w: np.ndarray, causal: bool) -> tuple[list, list, list]:
    """Per query of one ``(n, n)`` pattern: entropy in nats, entropy over log n_i (n_i the keys it can see), and
    the mass on position 0; rounded to STRIP_DIGITS decimals. NaN rows give null."""
    import numpy as np

    w = np.asarray(w, dtype=np.float64)
    n = w.shape[-1]
    safe = np.where(w > 0, w, 1.0)
    h = -(np.where(w > 0, w * np.log(safe), 0.0)).sum(-1)
    seen = np.arange(1, n + 1) if causal else np.full(n, n)
    norm = np.where(seen > 1, h / np.log(np.maximum(seen, 2)), np.nan)
    return _round(h), _round(norm), _round(w[:, 0])


def segment_totals(w: np.ndarray, split: int) -> list:
    """``[A->A, A->B, B->A, B->B]``: the mean over a segment's queries of their attention mass on the other's
    keys (or their own), for a pair whose segment B starts at ``split``."""
    import numpy as np

    w = np.asarray(w, dtype=np.float64)
    a, b = slice(0, split), slice(split, w.shape[0])
    out = []
    for q in (a, b):
        for k in (a, b):
            out.append(float(w[q, k].sum(-1).mean()))
    return _round(np.array([out[0], out[1], out[2], out[3]]))


def _round(values: np.ndarray) -> list:
    return [None if not math.isfinite(v) else round(float(v), STRIP_DIGITS) for v in values]


def example_patterns(p: Pattern, n_layers: int, n_heads: int, keep: set[tuple[int, int]] | None) -> dict[str, list]:
    """One example's per-head display data; entries are null for heads left out by ``keep``."""
    import numpy as np

    probs = p.probs.numpy()
    plain = p.plain.numpy() if p.plain is not None else None
    causal, split = is_causal(probs), segment_split(p.tokens)
    size = n_layers * n_heads
    out: dict[str, list] = {"weight": [None] * size, "plain": [None] * size, "entropy": [None] * size,
                            "entropy_norm": [None] * size, "first": [None] * size, "segments": [None] * size}
    L, H = probs.shape[:2]
    for layer in range(min(L, n_layers)):
        for head in range(min(H, n_heads)):
            if keep is not None and (layer, head) not in keep:
                continue
            i, w = layer * n_heads + head, probs[layer, head]
            out["weight"][i] = base64.b64encode(quantize(w)).decode("ascii")
            if plain is not None and not np.isnan(plain[layer, head]).all():
                out["plain"][i] = base64.b64encode(quantize(plain[layer, head])).decode("ascii")
            out["entropy"][i], out["entropy_norm"][i], out["first"][i] = row_strips(w, causal)
            if split is not None:
                out["segments"][i] = segment_totals(w, split)
    return out


def important_heads(run: Run) -> set[tuple[int, int]]:
    """The heads kept at full resolution above the size budget: flagged in any of the run's heads tables, and
    the most extreme (report.writer.extreme_table)."""
    keep = set()
    for _, _, heads in head_sets(run):
        flagged = heads[heads["flagged"]] if "flagged" in heads.columns else heads.iloc[:0]
        keep |= {(int(l), int(h)) for l, h in zip(flagged["layer"], flagged["head"])}
    if run.extremes is not None and not run.extremes.empty:
        keep |= {(int(l), int(h)) for l, h in zip(run.extremes["layer"], run.extremes["head"])}
    return keep
