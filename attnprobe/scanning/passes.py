"""Forward passes under a probe: one batch, a batch that halves itself when memory runs out, a corpus.

``run_batches`` is the loop that scan, refine's diagnostics and the Trainer callback share: tokenized chunks
in (batching.py), batches through the model under a Probe (capture/probe.py), the probe and the counters out.
It writes nothing and prints nothing; scanner.py turns its result into tables and files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from attnprobe.capture.probe import AttentionComplete, Probe, capturing
from attnprobe.data.batching import Encoded, encode_chunk, make_batches
from attnprobe.errors import AttnprobeError
from attnprobe.models import capability
from attnprobe.runtime import parallel


class Interrupted(AttnprobeError):
    """The run was stopped by a signal between two batches; nothing was written as complete."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}; no complete output was written")
        self.signum = signum


def forward_batch(loaded, probe: Probe, batch: dict[str, torch.Tensor], special: torch.Tensor,
                  model=None, stop_early: bool = False) -> dict[str, torch.Tensor] | None:
    """One forward pass under the probe; returns per-example sums ``(B, L, H)`` if the probe keeps them.

    ``stop_early`` ends the pass once the last layer's attention is reduced (``probe.AttentionComplete``):
    nothing the probe reports depends on the rest (the last layer's output projection and feed-forward
    block, a pooler or task head). It applies to the attention-function backend, whose probabilities
    arrive during the pass; ``forward_resilient`` asks for it once the probe has accepted a pass, so
    ``Probe.end`` checks the number of attention calls of a complete pass before any pass is cut short.
    """
    model = model if model is not None else loaded.model
    keep = batch["attention_mask"].bool()
    probe.begin(keep, special)
    with torch.no_grad(), capturing(probe):
        if loaded.backend == "eager-outputs":
            out = model(**batch, output_attentions=True)
            # Every tensor is validated (shape, heads, probability rows) before the probe reads it.
            attentions = capability.checked_probs(getattr(out, "attentions", None), keep, capability.arch_name(model),
                                                loaded.num_layers, loaded.num_heads,
                                                getattr(loaded, "recover", None))
            del out
            allowed = None
            if getattr(loaded, "causal", False):  # a decoder: each query sees the real tokens up to itself
                n = keep.shape[-1]
                allowed = torch.ones(n, n, dtype=torch.bool, device=keep.device).tril()[None] & keep[:, None, :]
            for layer_probs in attentions:  # (B, H, Q, K) each, reduced one by one
                if allowed is None:
                    probe.observe(None, layer_probs)
                else:
                    probe.observe(None, layer_probs, allowed=allowed)
            del attentions
        else:
            probe.stop_after_last = stop_early
            try:
                model(**batch)
            except AttentionComplete:
                probe.passes_cut += 1
            finally:
                probe.stop_after_last = False
    return probe.end()


def _split(batch: dict[str, torch.Tensor], special: torch.Tensor, rows: list[int]):
    half = len(rows) // 2
    for sl in (slice(0, half), slice(half, None)):
        part = {k: v[sl] for k, v in batch.items()}
        n = int(part["attention_mask"].sum(-1).max())  # trim padding the half no longer needs
        yield {k: v[:, :n] for k, v in part.items()}, special[sl, :n], rows[sl]


def forward_resilient(loaded, probe: Probe, batch, special, rows, model=None,
                      on_notice: Callable[[str], None] | None = None, state: dict | None = None):
    """``forward_batch``, halving the batch (recursively) when it runs out of memory.

    Yields ``(batch, rows, per_example_sums)`` for each piece that ran. Says so once via ``on_notice``.
    Every pass after the probe's first accepted one ends at the last attention (``forward_batch``).
    """
    try:
        per = forward_batch(loaded, probe, batch, special, model=model, stop_early=probe.passes > 0)
    except torch.OutOfMemoryError:
        probe.abort()
        if len(rows) == 1:
            raise AttnprobeError(
                f"one sequence of {batch['input_ids'].shape[1]} tokens does not fit in device memory; "
                "lower --max-length or use --dtype bfloat16"
            ) from None
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()
        if state is not None and not state.get("oom_noted"):
            state["oom_noted"] = True
            if on_notice is not None:
                on_notice(f"a batch of {len(rows)} ran out of memory; splitting batches in half where needed")
        if state is not None:
            state["oom_splits"] = state.get("oom_splits", 0) + 1
        for piece in _split(batch, special, rows):
            yield from forward_resilient(loaded, probe, *piece, model=model, on_notice=on_notice, state=state)
        return
    yield batch, rows, per


def unpadded_notice(loaded) -> str:
    return (f"{capability.arch_name(loaded.model)}'s attention changes when a sentence is padded, so it is scanned "
            "without padding (batches of sequences of one length), which is slower")


# exact multi-hop work above this many times the forward pass's gets a notice naming --sample-queries
NOTICE_RATIO = 4.0


def multi_hop_ratio(n: int, heads: int, hidden: int) -> float:
    """Multiply-adds of the exact multi-hop attention (``A @ A``: ``2 n^3`` per head) over those of a layer's
    forward pass (attention ``4 n^2 d`` and projections and feed-forward about ``24 n d^2``), ``d`` the hidden size."""
    return 2.0 * heads * n ** 3 / (4.0 * n * n * hidden + 24.0 * n * hidden * hidden)


def metric_dtype_of(loaded) -> torch.dtype:
    """float64 metrics for a float64 model, else float32 (lower-precision attention is upcast)."""
    return torch.float64 if next(loaded.model.parameters()).dtype == torch.float64 else torch.float32


def run_batches(loaded, chunks: Iterable, *, batch_size: int, max_length: int, hops: int,
                per_example: bool = False, on_examples: Callable | None = None,
                on_progress: Callable[[int], None] | None = None,
                should_stop: Callable[[], int | None] | None = None,
                on_notice: Callable[[str], None] | None = None,
                model=None, metric_dtype: torch.dtype | None = None,
                world=None, on_encoded: Callable[[Encoded], None] | None = None,
                block_fn: Callable | None = None, sample_queries: int | None = None,
                seed: int = 0) -> tuple[Probe, dict[str, int]]:
    """Stream chunks (objects with texts/pairs/rows) through the model; return the probe and counters.

    With a distributed ``world`` (parallel.World) each process takes every ``world.size``-th row of
    each chunk, and the sums and counters are all-reduced at the end, so every process returns the totals.
    ``on_encoded`` sees each tokenized chunk (``scan --patterns`` picks its rows from them).
    ``block_fn`` replaces the probe's per-block metrics (``compiled.prepare``'s compiled path).
    ``sample_queries`` estimates the multi-hop metrics from that many rows per sequence and head (seeded with
    ``seed`` and, under several processes, the process's rank).
    """
    world = world or parallel.World()
    tokenizer = loaded.tokenizer
    if metric_dtype is None:
        metric_dtype = metric_dtype_of(loaded)
    probe = Probe(loaded.num_layers, hops=hops, per_example=per_example, metric_dtype=metric_dtype,
                  num_heads=loaded.num_heads or None, sample_queries=sample_queries, seed=seed + world.rank)
    if block_fn is not None:
        probe.block_fn = block_fn
    probe.reuse_buffers = True  # nothing here keeps a layer's probabilities past its layer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special_ids = sorted(set(getattr(tokenizer, "all_special_ids", []) or []))
    counts = {"sequences": 0, "tokens": 0, "truncated": 0, "too_short": 0, "oom_splits": 0}
    state: dict = {}
    hidden = getattr(loaded.model.config, "hidden_size", None) or getattr(loaded.model.config, "dim", None)
    for chunk in chunks:
        texts, pairs, rows = chunk.texts, chunk.pairs, chunk.rows
        if world.distributed:
            sl = slice(world.rank, None, world.size)
            texts, rows = texts[sl], rows[sl]
            pairs = pairs[sl] if pairs is not None else None
        enc = encode_chunk(tokenizer, texts, pairs, rows, max_length)
        counts["truncated"] += enc.truncated
        counts["too_short"] += enc.short
        if on_encoded is not None:
            on_encoded(enc)
        for batch, special, batch_rows in make_batches(enc, batch_size, pad_id, special_ids, loaded.device,
                                                       equal_length=getattr(loaded, "padding", "right") == "none"):
            if should_stop is not None and (signum := should_stop()):
                raise Interrupted(signum)
            n = batch["input_ids"].shape[1]
            if not sample_queries and on_notice is not None and not state.get("work_noted") and hidden and \
                    (ratio := multi_hop_ratio(n, loaded.num_heads or 1, hidden)) > NOTICE_RATIO:
                state["work_noted"] = True
                on_notice(f"sequences of {n} tokens: the exact multi-hop metrics (A @ A per head) take about "
                          f"{ratio:.0f} times the forward pass's work; --sample-queries 32 estimates them, with "
                          "standard errors, at a small share of that")
            for piece, piece_rows, per in forward_resilient(loaded, probe, batch, special, batch_rows, model=model,
                                                            on_notice=on_notice, state=state):
                counts["sequences"] += len(piece_rows)
                counts["tokens"] += int(piece["attention_mask"].sum())
                if per is not None and on_examples is not None:
                    on_examples(piece_rows, piece["attention_mask"].sum(-1).tolist(), per)
            if on_progress is not None:
                on_progress(len(batch_rows) * world.size)
        if on_progress is not None and enc.short:
            on_progress(enc.short)
    counts["oom_splits"] = state.get("oom_splits", 0)
    counts["passes"], counts["passes_cut"] = probe.passes, probe.passes_cut
    if world.distributed:
        probe.load_totals(parallel.all_reduce_sums(probe.totals(), world))
        counts = parallel.all_reduce_counts(counts, world)
    if counts["sequences"] == 0:
        raise AttnprobeError("no sequence with at least 2 tokens to scan; check the input texts")
    return probe, counts
