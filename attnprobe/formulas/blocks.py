"""The fast path of the metrics: ``block_sums`` over one block of sequences or heads, in few passes over memory.

``block_sums`` returns exactly ``metrics.query_sums(metrics.query_metrics(...))`` (the readable spec beside it
in metrics.py, and the test reference), computed into reused scratch buffers. ``blocks`` cuts a layer's
``(B, H, Q, K)`` attention into the blocks the probe reduces one at a time, so the extra memory stays bounded
whatever the batch. compiled.py is the same reduction as one function for ``torch.compile``. Pure torch.
"""

from __future__ import annotations

import torch

from attnprobe.formulas import metrics

# Elements (4 MiB of float32) in one block of sequences or heads the metrics are computed on at a time. The
# block's two scratch buffers are reused, so the size trades cache locality against the number of operations
# per layer: each large operation is one parallel region, and on a shared machine every region can wait for a
# descheduled thread. 4 MiB measured faster than 1 MiB there (docs/benchmarks.md).
CHUNK_ELEMENTS = 1 << 20
# On an accelerator, blocks of 64 MiB: each operation is one kernel launch, so fewer, larger blocks.
DEVICE_CHUNK_ELEMENTS = 1 << 24


def blocks(B: int, H: int, QK: int, limit: int | None = None) -> list[tuple[int, int, int, int]]:
    """``(b0, b1, h0, h1)`` blocks of about ``limit`` elements (default ``CHUNK_ELEMENTS``) that cover
    ``B`` sequences x ``H`` heads.

    Whole sequences (all heads, contiguous in memory) when one fits, else heads of one sequence, so the
    temporaries stay cache-sized and below the allocator's mmap threshold.
    """
    limit = CHUNK_ELEMENTS if limit is None else limit
    if H * QK <= limit:
        step = max(1, limit // (H * QK))
        return [(b0, min(B, b0 + step), 0, H) for b0 in range(0, B, step)]
    step = max(1, limit // max(1, QK))
    return [(b, b + 1, h0, min(H, h0 + step)) for b in range(B) for h0 in range(0, H, step)]


class Scratch:
    """Reusable buffers for ``block_sums``, one per name, grown on demand and never shrunk.

    The probe keeps one for its lifetime, so a block's metrics allocate no ``(Q, K)`` temporary.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A buffer of ``like``'s shape, dtype and device; its contents are left from the last use."""
        n = like.numel()
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:n].view(like.shape)


def entropy_into(probs: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """``entropy(probs)`` with ``work`` (probs' shape) as scratch: one vectorised log and a row-wise dot.

    ``log`` is taken of ``probs`` clamped to the smallest normal number, so ``p = 0`` contributes
    ``0 * log(tiny) = 0`` exactly (``0 log 0 = 0``); NaN and Inf propagate, as with ``xlogy``.
    """
    torch.clamp(probs, min=torch.finfo(probs.dtype).tiny, out=work).log_()
    return work.mul_(probs).sum(-1).neg_()


def entropy_from_scores(probs: torch.Tensor, scores: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """``entropy(probs)`` for ``probs = softmax(scores)``, without a log over ``(Q, K)``; ``(..., Q)``.

    ``H(A_i) = lse_i * sum_k A_ik - sum_k A_ik S_ik``, with the softmax's own log-sum-exp read off key 0:
    ``lse_i = S_i0 - log A_i0`` (exact to rounding while ``A_i0`` is a normal number; position 0 is
    [CLS] / ``<s>``). Padded keys hold ``A = 0`` and a finite large negative bias, so they add ``0``.
    Rows this cannot serve come out NaN: ``A_i0`` below the smallest normal number (e.g. a padded key 0),
    or a ``-inf`` logit at a zero probability (``0 * inf``); the caller recomputes them with ``entropy_into``.
    """
    first = probs[..., 0]
    lse = scores[..., 0] - first.log()  # (..., Q)
    dot = torch.mul(probs, scores, out=work).sum(-1)
    h = lse * probs.sum(-1) - dot
    return torch.where(first >= torch.finfo(probs.dtype).tiny, h, float("nan"))


def _lse_fallback(h_dir: torch.Tensor, probs: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """``h_dir`` from the log-sum-exp, its non-finite rows (which it cannot serve) recomputed by the log path."""
    finite = torch.isfinite(h_dir)
    if bool(finite.all()):
        return h_dir
    return torch.where(finite, h_dir, entropy_into(probs, work))


def multi_hop_into(probs: torch.Tensor, hops: int, scratch: Scratch) -> torch.Tensor:
    """``multi_hop(probs, hops)`` into ``scratch``'s buffer ``multi`` (its contents are replaced)."""
    if hops < 2:
        raise ValueError(f"hops must be >= 2, got {hops}")
    multi = scratch.get("multi", probs)
    torch.matmul(probs, probs, out=multi)  # (b, h, Q, K)
    if hops > 2:
        power, spare = scratch.get("power", probs), scratch.get("spare", probs)
        power.copy_(multi)
        for _ in range(hops - 2):
            torch.matmul(power, probs, out=spare)
            power, spare = spare, power
            multi.add_(power)
        multi.div_(hops - 1)
    return multi


def _row_values(probs: torch.Tensor, hops: int, scores: torch.Tensor | None, scratch: Scratch):
    """Per row ``(b, h, Q)``: the direct entropy (from ``scores`` where given), the indirect entropy and GTD,
    with ``A @ A`` in a scratch buffer; also returns the ``work`` buffer for the caller's other products."""
    multi = multi_hop_into(probs, hops, scratch)
    work = scratch.get("work", probs)
    if scores is not None:
        h_dir = _lse_fallback(entropy_from_scores(probs, scores, work), probs, work)
    else:
        h_dir = entropy_into(probs, work)
    h_ind = entropy_into(multi, work)
    tv = multi.sub_(probs).abs_().sum(-1).mul_(0.5)  # gtd, in place: multi is not needed after this
    return h_dir, h_ind, tv, work


def block_sums(
    probs: torch.Tensor,
    keep: torch.Tensor,
    special: torch.Tensor | None = None,
    hops: int = 2,
    plain: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> dict[str, torch.Tensor]:
    """``query_sums(query_metrics(probs, keep, special, hops, plain), keep)``, in few passes over memory.

    The fast path the probe runs on each block of heads. Passes over ``(b, h, Q, K)``: ``A @ A`` into a
    scratch buffer; the direct entropy from ``scores`` (a product and two sums; else the log path);
    the indirect entropy as one log into a second buffer and a row-wise dot; GTD in place on ``A @ A``;
    the special-token mass as one product and a sum. The other masses read ``O(Q)`` or are
    vector-matrix products. Normalized entropies are the sums divided by ``log n`` (constant per sequence).
    ``fused.block_reduce`` is the same reduction as one function for ``torch.compile``.

    Args:
        probs: ``(b, h, Q, K)`` attention probabilities.
        keep: ``(b, K)`` bool, True for real tokens.
        special: ``(b, K)`` bool special tokens, or None.
        hops: K of the multi-hop attention.
        plain: ``(b, h, Q, K)`` attention before SAOBP (for ``bp_shift``), or None.
        scores: ``(b, h, Q, K)`` logits with ``probs = softmax(scores)`` at ``probs``' precision, or None.
        scratch: buffers to reuse (None: allocate).

    Returns:
        The dict ``query_sums`` returns: ``(b, h)`` float64 sums.
    """
    scratch = scratch if scratch is not None else Scratch()
    h_dir, h_ind, tv, work = _row_values(probs, hops, scores, scratch)
    if special is not None:
        spec = torch.mul(probs, special[:, None, None, :].to(probs.dtype), out=work).sum(-1)
    else:
        spec = torch.zeros_like(h_dir)
    columns = [h_dir, h_ind, tv, metrics.self_mass(probs), metrics.local_mass(probs), metrics.first_mass(probs), spec]
    if plain is not None:
        columns.append(torch.sub(probs, plain, out=work).abs_().sum(-1).mul_(0.5))
    sink = metrics.sink_mass(probs, keep[:, None, :]).to(torch.float64)  # (b, h)

    valid = keep[:, None, :]  # (b, 1, Q)
    bad = ~(torch.isfinite(h_dir) & torch.isfinite(tv)) & valid  # (b, h, Q)
    ok = valid & ~bad
    values = torch.where(ok[..., None], torch.stack(columns, -1).to(torch.float64), 0.0).sum(-2)  # (b, h, m)
    log_n = metrics.normalizer(keep)[:, None]  # (b, 1)
    return finish(values, values[..., 0] / log_n, values[..., 1] / log_n, plain is not None, keep, sink, ok, bad)


def finish(values: torch.Tensor, direct_norm: torch.Tensor, indirect_norm: torch.Tensor, refined: bool,
           keep: torch.Tensor, sink: torch.Tensor, ok: torch.Tensor, bad: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sums dict from ``values`` ``(b, h, m)``, the summed columns in ``block_sums``' order (direct entropy,
    indirect entropy, GTD, self, local, first, special mass, then bp_shift if ``refined``), the normalized entropy
    sums, and the counts: ``sink_mass`` weighted by the sequence length where every row is finite, the rows
    summed (``ok``) and those left out as non-finite (``bad``), each ``(b, h)``."""
    names = ("direct_entropy", "indirect_entropy", "gtd", "self_mass", "local_mass", "first_mass", "special_mass")
    sums = {name: values[..., i] for i, name in enumerate(names)}
    sums["direct_entropy_norm"], sums["indirect_entropy_norm"] = direct_norm, indirect_norm
    if refined:
        sums["bp_shift"] = values[..., 7]
    return counts(sums, keep, sink, ok, bad)


def counts(sums: dict[str, torch.Tensor], keep: torch.Tensor, sink: torch.Tensor, ok: torch.Tensor,
           bad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Add ``sink_weighted``, ``sink_weight`` (the sequence length, where every row of the head is finite),
    ``queries`` and ``nonfinite`` to ``sums``; ``ok`` and ``bad`` are ``(b, h, Q)`` bool, ``sink`` ``(b, h)``."""
    n = keep.sum(-1).to(torch.float64)[:, None]  # (b, 1)
    head_ok = ~bad.any(-1)  # (b, h): a sequence-level value needs every row finite
    sums["sink_weighted"] = torch.where(head_ok, n * sink, 0.0)
    sums["sink_weight"] = torch.where(head_ok, n.expand_as(sink), 0.0)
    sums["queries"] = ok.to(torch.float64).sum(-1)
    sums["nonfinite"] = bad.to(torch.float64).sum(-1)
    return sums


def special_mass(probs: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """``metrics.special_mass`` as one batched matrix-vector product: ``(b, h, Q, K)``, ``(b, K)`` -> ``(b, h, Q)``."""
    return torch.matmul(probs, special[:, None, :, None].to(probs.dtype)).squeeze(-1)


class RowStats:
    """What the rows of a masked attention have in common across heads, computed once per layer.

    Attributes:
        scored: ``(B, Q)`` bool, the rows scored (real tokens that see at least 2 keys).
        log_n: ``(B, 1, Q)`` float64, each row's ``log n_i`` (1 where n_i < 2).
        count: ``(B, 1, K)`` float64, for each key the scored rows that see it.
    """

    def __init__(self, keep: torch.Tensor, allowed: torch.Tensor):
        self.scored = metrics.scored_rows(keep, allowed)
        self.log_n = metrics.row_normalizer(allowed)[:, None, :]
        self.count = (allowed & self.scored[..., None]).sum(-2, dtype=torch.float64)[:, None, :]

    def slice(self, b0: int, b1: int) -> RowStats:
        out = RowStats.__new__(RowStats)
        out.scored, out.log_n, out.count = self.scored[b0:b1], self.log_n[b0:b1], self.count[b0:b1]
        return out


def visible_sink(probs: torch.Tensor, stats: RowStats) -> torch.Tensor:
    """``metrics.row_sink_mass`` in one vector-matrix product per head, ``(b, h)`` float64.

    Each key's weight summed over the scored rows that see it is ``scored^T @ A``, because ``A`` is exactly 0
    where the mask hides a key (the softmax of the mask's most negative bias underflows to 0); the count of
    those rows comes from ``allowed`` alone, once for every head (``RowStats``).
    """
    count = stats.count.to(probs.dtype)  # (b, 1, K)
    weight = torch.matmul(stats.scored[:, None, None, :].to(probs.dtype), probs).squeeze(-2)  # (b, h, K)
    share = weight / count.clamp_min(1.0)
    return torch.where(count > 0, share, -1.0).amax(-1).clamp_min(0.0).to(torch.float64)


def masked_block_sums(
    probs: torch.Tensor,
    keep: torch.Tensor,
    allowed: torch.Tensor,
    special: torch.Tensor | None = None,
    hops: int = 2,
    plain: torch.Tensor | None = None,
    scratch: Scratch | None = None,
    scores: torch.Tensor | None = None,
    stats: RowStats | None = None,
) -> dict[str, torch.Tensor]:
    """``query_sums(query_metrics(probs, keep, special, hops, plain, allowed), keep)`` for attention whose rows
    see different keys (causal and sliding-window masks), into reused scratch buffers.

    Each row's entropies are normalized by its own ``log n_i``; rows that see fewer than 2 keys are left out
    and counted (``unscored``); ``first_mass`` is the mass on each sequence's first real token; ``sink_mass``
    takes each key's mean over the scored rows that see it. ``block_sums`` is the faster path for attention in
    which every real token sees every real token.

    Args:
        probs: ``(b, h, Q, K)`` attention probabilities.
        keep: ``(b, K)`` bool, True for real tokens.
        allowed: ``(b, Q, K)`` bool, the keys each row may see under the model's own mask (padding included).
        special: ``(b, K)`` bool special tokens, or None.
        hops: K of the multi-hop attention.
        plain: ``(b, h, Q, K)`` attention before SAOBP (for ``bp_shift``), or None.
        scratch: buffers to reuse (None: allocate).
        scores: ``(b, h, Q, K)`` logits with ``probs = softmax(scores)`` at ``probs``' precision, or None.
        stats: ``RowStats(keep, allowed)``, if the caller has it for this block (it is the same for every head).
    """
    scratch = scratch if scratch is not None else Scratch()
    stats = stats if stats is not None else RowStats(keep, allowed)
    h_dir, h_ind, tv, work = _row_values(probs, hops, scores, scratch)
    spec = special_mass(probs, special) if special is not None else torch.zeros_like(h_dir)
    first = metrics.first_key_mass(probs, metrics.first_position(keep))
    columns = [h_dir, h_ind, tv, metrics.self_mass(probs), metrics.local_mass(probs), first, spec]
    if plain is not None:
        columns.append(torch.sub(probs, plain, out=work).abs_().sum(-1).mul_(0.5))
    scored = stats.scored  # (b, Q)
    sink = visible_sink(probs, stats)  # (b, h)

    valid = scored[:, None, :]  # (b, 1, Q)
    bad = ~(torch.isfinite(h_dir) & torch.isfinite(tv)) & valid  # (b, h, Q)
    ok = valid & ~bad
    values = torch.where(ok[..., None], torch.stack(columns, -1).to(torch.float64), 0.0).sum(-2)  # (b, h, m)
    log_n = stats.log_n  # (b, 1, Q)

    def normalized(h: torch.Tensor) -> torch.Tensor:
        return torch.where(ok, h.to(torch.float64) / log_n, 0.0).sum(-1)

    sums = finish(values, normalized(h_dir), normalized(h_ind), plain is not None, keep, sink, ok, bad)
    sums["unscored"] = (keep & ~scored).to(torch.float64).sum(-1)[:, None].expand_as(sink).clone()
    return sums
