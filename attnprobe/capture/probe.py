"""Streaming capture: receive each layer's attention during a forward pass, reduce it, forget it.

The attention function (saobp.attention_forward) hands the probabilities of every call to the probe
active in the current context. The probe identifies the layer by call order within one forward pass
(robust for DistilBERT and ALBERT, which have no ``layer_idx`` and, for ALBERT, one shared module),
computes the metrics in blocks of sequences or heads (bounded extra memory, reused scratch buffers, see
``blocks.block_sums``), and adds token-weighted sums into ``(L, H)`` accumulators. Nothing of shape ``(L, B, H, Q, K)`` is ever stacked. Pure torch.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch

from attnprobe.formulas import blocks, metrics, sampling

_ACTIVE: contextvars.ContextVar[Probe | None] = contextvars.ContextVar("attnprobe_probe", default=None)


SUM_KEYS = (*metrics.QUERY_METRICS, "bp_shift")
COUNT_KEYS = ("queries", "nonfinite", "sink_weighted", "sink_weight", "unscored")
VAR_KEYS = tuple(f"{name}_var" for name in sampling.SAMPLED)  # variances of the sampled sums (0: exact)


def _assemble(parts, key: str) -> torch.Tensor:
    """Concatenate per-block ``(b, h)`` sums of ``key`` back into ``(B, H)``."""
    rows: dict[int, list[torch.Tensor]] = {}
    for (b0, _), sums in parts:
        rows.setdefault(b0, []).append(sums[key])
    return torch.cat([torch.cat(r, dim=1) for r in rows.values()], dim=0)


class AttentionComplete(Exception):
    """Raised out of the forward pass once the last layer's attention is reduced (``Probe.stop_after_last``).

    Nothing a probe reports depends on what the model computes after its last attention call (the last
    layer's output projection and feed-forward block, a pooler or task head), so ``scanner.forward_batch``
    stops the pass there and catches this.
    """


def active_probe() -> Probe | None:
    """The probe of the current context, or None (plain inference and training)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def capturing(probe: Probe) -> Iterator[Probe]:
    """Make ``probe`` receive the attention of every forward pass inside the block."""
    token = _ACTIVE.set(probe)
    try:
        yield probe
    finally:
        _ACTIVE.reset(token)


class Probe:
    """Accumulates per-(layer, head) metric sums over batches, from attention handed to ``observe``.

    Usage: ``probe.begin(keep, special)``, run the model inside ``capturing(probe)``, then
    ``probe.end()``, which adds the batch to the totals and returns its per-example sums
    ``{name: (B, L, H)}`` when ``per_example`` is set. A batch counts only once ``end()`` accepts it, so
    a forward pass that fails half-way (``abort()``) leaves the totals untouched. ``totals()`` gives the
    ``(L, H)`` sums over every accepted batch.

    Args:
        num_layers: expected attention calls per forward pass.
        hops: K of the multi-hop attention.
        per_example: also return each batch's per-(example, layer, head) sums.
        metric_dtype: dtype the metrics are computed in (float32 or float64); lower-precision
            attention is upcast.
        num_heads: heads per layer, if known (lets ``totals()`` exist before any batch).
        sample_queries: estimate the multi-hop metrics from this many query rows per sequence and head
            (formulas/sampling.py); None: exact. A block whose sequences all have this many scored rows or
            fewer is computed exactly.
        seed: seeds the row draws of ``sample_queries``.
    """

    def __init__(self, num_layers: int, hops: int = 2, per_example: bool = False,
                 metric_dtype: torch.dtype = torch.float32, num_heads: int | None = None,
                 sample_queries: int | None = None, seed: int = 0):
        self.num_layers = num_layers
        self.hops = hops
        self.per_example = per_example
        self.metric_dtype = metric_dtype
        self.num_heads = num_heads
        self._totals: dict[str, torch.Tensor] | None = None
        self._keep: torch.Tensor | None = None
        self._special: torch.Tensor | None = None
        self._batch: list[dict[str, torch.Tensor]] = []
        self.refined_layers: set[int] = set()
        self.calls = 0  # attention calls seen in total
        # Raise AttentionComplete after the last layer's attention (only for callers that catch it).
        self.stop_after_last = False
        self.passes = 0  # forward passes accepted by end()
        self.passes_cut = 0  # of those, the ones scanner.forward_batch ended there
        # Let the attention function compute each layer's logits and probabilities into two buffers kept here
        # (attention_buffers); only for callers that keep no layer's probabilities past its layer.
        self.reuse_buffers = False
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.block_fn = blocks.block_sums  # the per-block metrics: (probs, keep, special, hops, plain, scores, scratch)
        self.sample_queries = sample_queries
        self.generator = torch.Generator().manual_seed(seed) if sample_queries else None
        self._scratch = blocks.Scratch()
        if num_heads is not None:
            self._init_totals(num_heads)

    def attention_buffers(self, shape: tuple[int, ...], dtype: torch.dtype,
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Two contiguous tensors of ``shape`` for one layer's logits and probabilities, views of flat buffers
        that grow to the largest shape asked for and are reused by every later layer and batch."""
        numel = math.prod(shape)
        key = (dtype, device)
        held = self._buffers.get(key)
        if held is None or held[0].numel() < numel:
            self._buffers.pop(key, None)  # free the smaller pair before taking the larger one
            held = (torch.empty(numel, dtype=dtype, device=device), torch.empty(numel, dtype=dtype, device=device))
            self._buffers[key] = held
        return held[0][:numel].view(shape), held[1][:numel].view(shape)

    def begin(self, keep: torch.Tensor, special: torch.Tensor | None = None) -> None:
        """Start a batch: ``keep`` and ``special`` are ``(B, Q)`` bool masks of the input tokens."""
        self._keep = keep.bool()
        self._special = special.bool() if special is not None else None
        self._batch = []

    def abort(self) -> None:
        """Drop the batch in progress (e.g. after an out-of-memory error); totals stay as they were."""
        self._keep = None
        self._special = None
        self._batch = []

    def observe(self, module, probs: torch.Tensor, plain: torch.Tensor | None = None, *,
                scores: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> None:
        """Reduce one layer's ``(B, H, Q, K)`` attention to ``(B, H)`` sums.

        Args:
            module: the attention module (unused; identifies the caller).
            probs: the attention the model uses.
            plain: the attention before SAOBP refinement, for ``bp_shift`` (None: not refined).
            scores: the logits with ``probs = softmax(scores)``, if the caller has them; they let the
                direct entropy skip a log (used only when ``probs`` is already in ``metric_dtype``).
            allowed: ``(B, Q, K)`` bool, the keys each query may see under the model's own mask (causal or
                sliding-window attention), padding included; None when every real token sees every real
                token (an encoder). Its rows are scored as blocks.masked_block_sums says.
        """
        self.calls += 1
        if self._keep is None:
            return  # a forward pass outside begin()/end(), e.g. a backend check
        layer = len(self._batch)
        if layer >= self.num_layers:
            raise RuntimeError(
                f"the model made more attention calls ({layer + 1}) than it has layers ({self.num_layers})"
            )
        B, H, Q, K = probs.shape
        keep = self._keep.to(probs.device)
        special = self._special.to(probs.device) if self._special is not None else None
        if plain is not None:
            self.refined_layers.add(layer)
        if scores is not None and not (plain is None and probs.dtype == scores.dtype == self.metric_dtype):
            scores = None  # the logits of unrefined attention at the metrics' precision, or none
        parts = []
        limit = blocks.CHUNK_ELEMENTS if probs.device.type == "cpu" else blocks.DEVICE_CHUNK_ELEMENTS
        if allowed is not None:
            allowed = allowed.to(probs.device).expand(B, Q, K) & keep[:, None, :]
        stats = blocks.RowStats(keep, allowed) if allowed is not None else None  # shared by every head
        rows = keep.sum(-1) if stats is None else stats.scored.sum(-1)  # (B,) scored rows per sequence
        for b0, b1, h0, h1 in blocks.blocks(B, H, Q * K, limit):
            pl = plain[b0:b1, h0:h1].to(self.metric_dtype) if plain is not None else None
            block = probs[b0:b1, h0:h1].to(self.metric_dtype)
            spec = special[b0:b1] if special is not None else None
            sc = scores[b0:b1, h0:h1] if scores is not None else None
            if self.sample_queries and int(rows[b0:b1].max()) > self.sample_queries:
                sums = sampling.sampled_block_sums(block, keep[b0:b1], self.sample_queries, spec, self.hops, pl,
                                                   None if allowed is None else allowed[b0:b1], self.generator,
                                                   self._scratch, sc, None if stats is None else stats.slice(b0, b1))
            elif allowed is not None:
                sums = blocks.masked_block_sums(block, keep[b0:b1], allowed[b0:b1], spec, self.hops, pl,
                                                self._scratch, sc, stats.slice(b0, b1))
            else:
                sums = self.block_fn(block, keep[b0:b1], spec, self.hops, pl, sc, self._scratch)
            if self.sample_queries:  # exact blocks of a sampled scan: variance 0, so that every block has the keys
                for key in VAR_KEYS:
                    sums.setdefault(key, torch.zeros_like(sums["queries"]))
            parts.append(((b0, h0), sums))
        sums = {k: _assemble(parts, k).cpu() for k in parts[0][1]}  # each (B, H)
        if "bp_shift" not in sums:
            sums["bp_shift"] = torch.full_like(sums["queries"], float("nan"))
        self._batch.append(sums)
        if self.stop_after_last and layer == self.num_layers - 1:
            raise AttentionComplete

    def _init_totals(self, num_heads: int) -> None:
        self.num_heads = num_heads
        shape = (self.num_layers, num_heads)
        self._totals = {k: torch.zeros(shape, dtype=torch.float64) for k in (*SUM_KEYS, *COUNT_KEYS, *VAR_KEYS)}
        self._totals["bp_shift"] = torch.full(shape, float("nan"), dtype=torch.float64)

    def end(self) -> dict[str, torch.Tensor] | None:
        """Accept the batch: check every layer was seen, add it to the totals, return ``(B, L, H)`` sums."""
        batch = self._batch
        self.abort()
        if len(batch) != self.num_layers:
            raise RuntimeError(
                f"the probe saw {len(batch)} attention calls in one forward pass, expected {self.num_layers}; "
                "the model does not run attnprobe's attention function in every layer"
            )
        self.passes += 1
        stacked = {k: torch.stack([layer[k] for layer in batch], dim=1) for k in batch[0]}  # (B, L, H)
        if self._totals is None:
            self._init_totals(stacked["queries"].shape[-1])
        for k, v in stacked.items():
            total = v.sum(0)  # (L, H); NaN for bp_shift of unrefined layers
            if k == "bp_shift":
                current = self._totals[k]
                refined = ~torch.isnan(total)
                self._totals[k] = torch.where(refined, torch.nan_to_num(current) + total, current)
            else:
                self._totals[k] += total
        return stacked if self.per_example else None

    def totals(self) -> dict[str, torch.Tensor]:
        """``(L, H)`` float64 sums over all batches so far (``queries`` = valid rows summed)."""
        if self._totals is None:
            raise RuntimeError("no attention was captured")
        return self._totals

    def load_totals(self, totals: dict[str, torch.Tensor]) -> None:
        """Replace the sums, e.g. with the all-reduced sums of several processes."""
        self._totals = totals


def means(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn sums (any shape ``(..., H)``) into token-weighted means; NaN where nothing was counted."""
    q = sums["queries"]
    out: dict[str, torch.Tensor] = {}
    for name in SUM_KEYS:
        if name in sums:
            out[name] = torch.where(q > 0, sums[name] / q.clamp_min(1.0), float("nan"))
    w = sums["sink_weight"]
    out["sink_mass"] = torch.where(w > 0, sums["sink_weighted"] / w.clamp_min(1.0), float("nan"))
    out["queries"] = q
    out["nonfinite"] = sums["nonfinite"]
    for name in sampling.SAMPLED:  # standard errors of the sampled means (0 where exact)
        var = sums.get(f"{name}_var")
        var = torch.zeros_like(q) if var is None else var
        out[f"{name}_se"] = torch.where(q > 0, var.clamp_min(0.0).sqrt() / q.clamp_min(1.0), float("nan"))
    return out
