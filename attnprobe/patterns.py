"""Attention patterns of a few sequences: the full ``(L, H, Q, K)`` attention kept for drawing.

The metrics never need the full attention (probe.py reduces it as it streams past). Drawing a head does,
for a handful of sequences: ``PatternKeeper`` stands in for the probe during one forward pass and keeps
every layer's probabilities (and, for SAOBP layers, the plain attention before refinement).
``ExamplePicker`` watches the scan's tokenized chunks and chooses which rows of a corpus to keep
(``scan --patterns N``); ``keep_patterns`` runs them once more, one at a time and without padding, after the
scan, and ``pattern_frame`` shapes them as ``patterns.parquet``. Nothing here computes a metric or touches
the probe's code path, so the scan's numbers are the same with and without ``--patterns``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Any

import torch

# Which rows ``scan --patterns N`` keeps: rows of PREFERRED token lengths, spread evenly over that range's
# length distribution (docs/formats.md). Shorter rows are mostly special tokens; longer ones make thumbnails
# unreadable. MAX_TOKENS bounds the cost: at most N x L x H x MAX_TOKENS^2 weights are ever kept.
PREFERRED = (8, 32)
MAX_TOKENS = 64
RULE = (f"rows of {PREFERRED[0]}-{PREFERRED[1]} tokens at evenly spaced quantiles of their length "
        f"distribution, first row of each length in input order; nearest rows up to {MAX_TOKENS} tokens "
        "if too few")
COLUMNS = ("example", "tokens", "layer", "head", "query", "key", "query_token", "key_token", "weight",
           "plain_weight")
STAGES = ("before", "after")  # a refine run's patterns.parquet: before training, and of the trained model


@dataclass
class Pattern:
    """One sequence's attention: ``probs`` ``(L, H, n, n)`` float32, ``plain`` the same before SAOBP
    (NaN in layers that are not refined; None when no layer is), its token strings and input row;
    ``stage`` (one of STAGES) for the patterns of a refine run, else None."""

    row: int
    tokens: list[str]
    probs: torch.Tensor
    plain: torch.Tensor | None = None
    stage: str | None = None


class PatternKeeper:
    """Keeps every layer's attention of the sequences in one forward pass (a probe stand-in).

    It answers the probe calls that ``scanner.forward_batch`` and the attention function make
    (``begin``, ``observe``, ``end``, ``abort``); ``layers`` then holds per layer ``(probs, plain)``,
    ``(B, H, Q, K)`` float32 on the CPU, ``plain`` None for layers that are not refined.
    """

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def begin(self, keep: torch.Tensor, special: torch.Tensor | None = None) -> None:
        self.layers = []

    def observe(self, module, probs: torch.Tensor, plain: torch.Tensor | None = None, **_: Any) -> None:
        self.layers.append((probs.detach().float().cpu(),
                            None if plain is None else plain.detach().float().cpu()))

    def end(self) -> None:
        return None

    def abort(self) -> None:
        self.layers = []


def sequence_pattern(loaded, ids: list[int], token_types: list[int] | None, row: int = 0,
                     model=None) -> Pattern:
    """Run one tokenized sequence alone (no padding) and keep its attention in every layer.

    ``model`` (default ``loaded.model``) is the module to run, e.g. a refine's trained model; the batch
    goes to the device of its parameters.
    """
    from attnprobe import batching, scanner
    from attnprobe.models import special_token_ids

    enc = batching.Encoded(ids=[list(ids)], token_types=None if token_types is None else [list(token_types)],
                          rows=[row])
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    device = loaded.device if model is None else next(model.parameters()).device
    batch, special, _ = next(batching.make_batches(enc, 1, pad_id, special_token_ids(loaded.tokenizer), device))
    keeper = PatternKeeper()
    scanner.forward_batch(loaded, keeper, batch, special, model=model)
    if len(keeper.layers) != loaded.num_layers:
        raise RuntimeError(f"kept {len(keeper.layers)} layers of attention, expected {loaded.num_layers}")
    probs = torch.stack([p[0] for p, _ in keeper.layers])  # (L, H, n, n)
    plain = None
    if any(pl is not None for _, pl in keeper.layers):
        plain = torch.stack([pl[0] if pl is not None else torch.full_like(p[0], float("nan"))
                             for p, pl in keeper.layers])
    tokens = loaded.tokenizer.convert_ids_to_tokens(list(ids))
    return Pattern(row=row, tokens=[str(t) for t in tokens], probs=probs, plain=plain)


@dataclass
class ExamplePicker:
    """Chooses ``n`` short, representative rows of a corpus from the scan's tokenized chunks.

    Rule (deterministic): among rows with PREFERRED[0] to PREFERRED[1] tokens, the lengths at the
    ``(i + 0.5) / n`` quantiles of their length distribution, each taken by the first row (in input order)
    of that length not yet taken. If fewer than ``n`` rows are in that range, every one of them is kept and
    the rest are the rows nearest the range (up to MAX_TOKENS tokens). Memory: at most ``n`` rows per
    length up to MAX_TOKENS, and a count per length.
    """

    n: int
    by_length: dict[int, list[tuple[int, list[int], list[int] | None]]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    def add(self, enc) -> None:
        """Look at one ``batching.Encoded`` chunk (rows sorted by length, input order within a length)."""
        types = enc.token_types
        for k, (ids, row) in enumerate(zip(enc.ids, enc.rows)):
            length = len(ids)
            if length > MAX_TOKENS:
                continue
            self.counts[length] = self.counts.get(length, 0) + 1
            bucket = self.by_length.setdefault(length, [])
            if len(bucket) < self.n:  # chunks come in input order, so these are the first rows
                bucket.append((row, list(ids), None if types is None else list(types[k])))

    def merge(self, other: ExamplePicker) -> None:
        """Add another picker's rows (another process's share of the corpus)."""
        for length, count in other.counts.items():
            self.counts[length] = self.counts.get(length, 0) + count
        for length, items in other.by_length.items():
            bucket = sorted(self.by_length.get(length, []) + items, key=lambda item: item[0])
            self.by_length[length] = bucket[: self.n]

    def chosen(self) -> list[tuple[int, list[int], list[int] | None]]:
        """The chosen ``(row, ids, token_types)``, in input order."""
        lo, hi = PREFERRED
        inside = sorted(length for length in self.counts if lo <= length <= hi)
        total = sum(self.counts[length] for length in inside)
        taken: dict[int, int] = {}  # length -> rows of that bucket used
        if total >= self.n:
            cumulative, lengths = 0, []
            for length in inside:
                cumulative += self.counts[length]
                lengths.append((cumulative, length))
            for i in range(self.n):
                position = int((i + 0.5) / self.n * total)  # 0-based rank in the sorted lengths
                length = next(length for cum, length in lengths if position < cum)
                # a length drawn more often than it has stored rows gives its turn to the nearest length
                for candidate in sorted(inside, key=lambda x: (abs(x - length), x)):
                    if taken.get(candidate, 0) < len(self.by_length[candidate]):
                        taken[candidate] = taken.get(candidate, 0) + 1
                        break
        else:
            taken = {length: len(self.by_length[length]) for length in inside}
            rest = self.n - sum(taken.values())
            # the rest: the rows nearest the range (by tokens outside it, longer first, then input order)
            nearest = [(lo - x if x < lo else x - hi, -x, row, x) for x in self.by_length if not lo <= x <= hi
                       for row, _, _ in self.by_length[x]]
            for _, _, _, length in heapq.nsmallest(rest, nearest):
                taken[length] = taken.get(length, 0) + 1
        picked = [item for length, count in taken.items() for item in self.by_length[length][:count]]
        return sorted(picked, key=lambda item: item[0])


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

