"""Attention patterns of a few sequences: the full ``(L, H, Q, K)`` attention kept for drawing.

The metrics never need the full attention (probe.py reduces it as it streams past). Drawing a head does,
for a handful of sequences: ``PatternKeeper`` stands in for the probe during one forward pass and keeps
every layer's probabilities (and, for SAOBP layers, the plain attention before refinement).
``ExamplePicker`` watches the scan's tokenized chunks and chooses which rows of a corpus to keep
(``scan --patterns N``). Running the chosen rows and the ``patterns.parquet`` table are the scanning wing's
(scanning/patterns.py). Nothing here computes a metric or touches the probe's code path, so the scan's
numbers are the same with and without ``--patterns``. Pure torch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
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


