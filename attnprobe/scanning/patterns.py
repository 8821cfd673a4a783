"""Kept attention patterns of a scan or refine: each chosen row run alone, and the ``patterns.parquet`` table.

capture/patterns.py keeps a forward pass's attention and picks the rows; this module runs the chosen rows
through the model (one at a time, no padding) after the scan, and shapes the result as ``patterns.parquet``
and back. It computes no metric, so a scan's numbers are the same with and without ``--patterns``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from attnprobe.capture.patterns import ExamplePicker, Pattern, PatternKeeper
from attnprobe.data import batching
from attnprobe.models.loading import special_token_ids
from attnprobe.scanning.passes import forward_batch

# patterns.parquet's columns (docs/formats.md)
COLUMNS = ("example", "tokens", "layer", "head", "query", "key", "query_token", "key_token", "weight",
           "plain_weight")
STAGES = ("before", "after")  # a refine run's patterns.parquet: before training, and of the trained model


def sequence_pattern(loaded, ids: list[int], token_types: list[int] | None, row: int = 0,
                     model=None) -> Pattern:
    """Run one tokenized sequence alone (no padding) and keep its attention in every layer.

    ``model`` (default ``loaded.model``) is the module to run, e.g. a refine's trained model; the batch
    goes to the device of its parameters.
    """
    enc = batching.Encoded(ids=[list(ids)], token_types=None if token_types is None else [list(token_types)],
                          rows=[row])
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    device = loaded.device if model is None else next(model.parameters()).device
    batch, special, _ = next(batching.make_batches(enc, 1, pad_id, special_token_ids(loaded.tokenizer), device))
    keeper = PatternKeeper()
    forward_batch(loaded, keeper, batch, special, model=model)
    if len(keeper.layers) != loaded.num_layers:
        raise RuntimeError(f"kept {len(keeper.layers)} layers of attention, expected {loaded.num_layers}")
    probs = torch.stack([p[0] for p, _ in keeper.layers])  # (L, H, n, n)
    plain = None
    if any(pl is not None for _, pl in keeper.layers):
        plain = torch.stack([pl[0] if pl is not None else torch.full_like(p[0], float("nan"))
                             for p, pl in keeper.layers])
    tokens = loaded.tokenizer.convert_ids_to_tokens(list(ids))
    return Pattern(row=row, tokens=[str(t) for t in tokens], probs=probs, plain=plain)


def keep_patterns(loaded, picker: ExamplePicker, model=None) -> list[Pattern]:
    """The attention of every chosen row, each run alone (no padding), in input order.

    With ``model`` (another module than ``loaded.model``, e.g. a refine's trained model) that one runs.
    """
    return [sequence_pattern(loaded, ids, types, row, model=model) for row, ids, types in picker.chosen()]


def pattern_frame(patterns: list[Pattern]):
    """``patterns.parquet``: one row per (example, layer, head, query, key) with ``weight`` and tokens.

    Patterns with a ``stage`` (a refine run's) add a ``stage`` column, the frame ordered by stage (STAGES)
    and then by example.
    """
    import numpy as np
    import pandas as pd

    staged = any(p.stage is not None for p in patterns)
    if staged:
        patterns = sorted(patterns, key=lambda p: (STAGES.index(p.stage), p.row))
    frames = []
    for p in patterns:
        L, H, n, _ = p.probs.shape
        layer, head, query, key = (a.ravel() for a in np.indices((L, H, n, n), dtype=np.int32))
        tokens = np.asarray(p.tokens, dtype=object)
        plain = (p.plain.reshape(-1).numpy().astype(np.float32) if p.plain is not None
                 else np.full(L * H * n * n, np.nan, dtype=np.float32))
        frames.append(pd.DataFrame({
            "example": np.full(layer.size, p.row, dtype=np.int64), "tokens": np.full(layer.size, n, np.int32),
            "layer": layer, "head": head, "query": query, "key": key,
            "query_token": tokens[query], "key_token": tokens[key],
            "weight": p.probs.reshape(-1).numpy().astype(np.float32), "plain_weight": plain,
            **({"stage": np.full(layer.size, p.stage, dtype=object)} if staged else {}),
        }))
    if not frames:
        return empty_frame(staged)
    return pd.concat(frames, ignore_index=True)


def empty_frame(staged: bool = False):
    """A ``patterns.parquet`` frame with no rows (and a ``stage`` column if ``staged``)."""
    import numpy as np
    import pandas as pd

    ints = {c: np.zeros(0, np.int32) for c in ("tokens", "layer", "head", "query", "key")}
    stage = {"stage": np.zeros(0, object)} if staged else {}
    return pd.DataFrame({"example": np.zeros(0, np.int64), **ints,
                         "query_token": np.zeros(0, object), "key_token": np.zeros(0, object),
                         "weight": np.zeros(0, np.float32), "plain_weight": np.zeros(0, np.float32), **stage})


def from_frame(df) -> list[Pattern]:
    """The patterns of a ``patterns.parquet`` frame, one per example (per stage and example when it has a
    ``stage`` column: STAGES order, then example order)."""
    import numpy as np

    if "stage" in df.columns:
        unknown = sorted(set(df["stage"].astype(str)) - set(STAGES))
        if unknown:
            raise ValueError(f"stage values {unknown} are not {' or '.join(STAGES)}")
        out = []
        for stage in STAGES:
            out += [replace(p, stage=stage) for p in from_frame(df[df["stage"] == stage].drop(columns="stage"))]
        return out
    out = []
    for row, rows in df.groupby("example", sort=True):
        rows = rows.sort_values(["layer", "head", "query", "key"])
        L, H = int(rows["layer"].max()) + 1, int(rows["head"].max()) + 1
        n = int(rows["query"].max()) + 1
        if len(rows) != L * H * n * n:
            raise ValueError(f"example {row} has {len(rows)} rows, not {L} x {H} x {n} x {n}")
        probs = torch.from_numpy(rows["weight"].to_numpy(np.float32).reshape(L, H, n, n).copy())
        plain = None
        if "plain_weight" in rows and rows["plain_weight"].notna().any():
            plain = torch.from_numpy(rows["plain_weight"].to_numpy(np.float32).reshape(L, H, n, n).copy())
        first = rows[(rows["layer"] == 0) & (rows["head"] == 0) & (rows["query"] == 0)]
        out.append(Pattern(row=int(row), tokens=[str(t) for t in first["key_token"]], probs=probs, plain=plain))
    return out
