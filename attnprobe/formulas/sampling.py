"""The multi-hop metrics from sampled query rows (``--sample-queries N``), with their standard errors.

The exact multi-hop attention of a head costs ``A @ A``: ``2 n^3`` multiply-adds, against ``4 n^2 D`` for the
head's whole attention in the forward pass. Row ``i`` of ``M = A @ A`` needs only row ``i`` of ``A``, so N sampled
rows cost ``M_R = A[R] @ A``: ``2 N n^2``. Per sequence and head, N of its ``m`` scored rows are drawn uniformly
without replacement (every row when ``m <= N``: exact). For a per-row value ``x`` (GTD, indirect entropy and its
normalized form) the sequence's total ``T = sum_i x_i`` is estimated by ``T_hat = m * mean of the sample``, which
is unbiased; summed over sequences it is the unbiased estimate of the sum the exact scan computes, and divided
by the exact number of scored rows, of the token-weighted mean. Its variance (simple random sampling without
replacement) is ``m^2 (1 - N/m) s^2 / N`` with ``s^2`` the sample variance (denominator ``N - 1``): 0 for an exact
sequence. Draws are independent between sequences, heads and layers, so variances add. Pure torch.
"""

from __future__ import annotations

import torch

from attnprobe.formulas import blocks, metrics

SAMPLED = ("gtd", "indirect_entropy", "indirect_entropy_norm")  # the metrics that need multi-hop attention


def draw_rows(ok: torch.Tensor, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """N rows per ``(b, h)`` drawn uniformly without replacement among the rows where ``ok`` ``(b, h, Q)``.

    Returns ``(rows (b, h, N) long, taken (b, h, N) bool)``; where fewer than N rows are ``ok``, all of them are
    taken and the rest of the N slots are marked not taken.
    """
    n = min(n, ok.shape[-1])
    u = torch.rand(ok.shape, generator=generator, dtype=torch.float64, device="cpu").to(ok.device)
    u = torch.where(ok, u, float("inf"))
    keys, rows = torch.topk(u, n, dim=-1, largest=False)
    return rows, torch.isfinite(keys)


def sampled_multi_hop(probs: torch.Tensor, rows: torch.Tensor, hops: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A[R], M[R])``: the sampled rows of ``A`` and of ``M = (A^2 + ... + A^K) / (K - 1)``, each ``(b, h, N, K)``."""
    if hops < 2:
        raise ValueError(f"hops must be >= 2, got {hops}")
    picked = probs.gather(-2, rows[..., None].expand(*rows.shape, probs.shape[-1]))  # (b, h, N, K)
    power = picked @ probs
    total = power
    for _ in range(hops - 2):
        power = power @ probs
        total = total + power
    return picked, (total if hops == 2 else total / (hops - 1))


def estimate(values: torch.Tensor, taken: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T_hat, var)`` per ``(b, h)`` from sampled per-row ``values`` ``(b, h, N)``: the estimated sum over the
    ``m`` scored rows and its variance under sampling without replacement (0 where every row was taken)."""
    x = torch.where(taken, values.to(torch.float64), 0.0)
    k = taken.to(torch.float64).sum(-1)
    mean = x.sum(-1) / k.clamp_min(1.0)
    dev = torch.where(taken, values.to(torch.float64) - mean[..., None], 0.0)
    s2 = dev.pow(2).sum(-1) / (k - 1).clamp_min(1.0)
    var = torch.where(k < m, m.pow(2) * (1 - k / m.clamp_min(1.0)) * s2 / k.clamp_min(1.0), 0.0)
    return m * mean, var


def sampled_block_sums(
    probs: torch.Tensor,
    keep: torch.Tensor,
    n: int,
    special: torch.Tensor | None = None,
    hops: int = 2,
    plain: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    scratch: blocks.Scratch | None = None,
    scores: torch.Tensor | None = None,
    stats: blocks.RowStats | None = None,
) -> dict[str, torch.Tensor]:
    """The sums of ``blocks.block_sums`` (``allowed`` None) or ``blocks.masked_block_sums`` with the multi-hop ones
    (``SAMPLED``) estimated from ``n`` sampled rows per sequence and head; adds ``<name>_var`` for each.

    Direct entropy, the masses, ``sink_mass``, ``bp_shift`` and the counts are exact (every row). ``scores``
    (the logits of ``probs``, or None) let the direct entropy skip a log, as in ``blocks.block_sums``.
    """
    scratch = scratch if scratch is not None else blocks.Scratch()
    work = scratch.get("work", probs)
    if allowed is None:  # every real token sees every real token: an encoder
        rows_ok = keep & (keep.sum(-1, keepdim=True) >= 2)  # (b, Q)
        log_n = metrics.normalizer(keep)[:, None, None].expand(-1, 1, keep.shape[-1])  # (b, 1, Q)
        sink = metrics.sink_mass(probs, keep[:, None, :]).to(torch.float64)
    else:
        stats = stats if stats is not None else blocks.RowStats(keep, allowed)
        rows_ok, log_n = stats.scored, stats.log_n
        sink = blocks.visible_sink(probs, stats)
    if scores is not None:
        h_dir = blocks._lse_fallback(blocks.entropy_from_scores(probs, scores, work), probs, work)
    else:
        h_dir = blocks.entropy_into(probs, work)
    spec = blocks.special_mass(probs, special) if special is not None else torch.zeros_like(h_dir)
    first = metrics.first_key_mass(probs, metrics.first_position(keep))
    columns = [h_dir, metrics.self_mass(probs), metrics.local_mass(probs), first, spec]
    if plain is not None:
        columns.append(torch.sub(probs, plain, out=work).abs_().sum(-1).mul_(0.5))
    valid = rows_ok[:, None, :]
    bad = ~torch.isfinite(h_dir) & valid
    ok = valid & ~bad  # (b, h, Q)
    values = torch.where(ok[..., None], torch.stack(columns, -1).to(torch.float64), 0.0).sum(-2)
    sums = {"direct_entropy": values[..., 0],
            "direct_entropy_norm": torch.where(ok, h_dir.to(torch.float64) / log_n, 0.0).sum(-1),
            "self_mass": values[..., 1], "local_mass": values[..., 2], "first_mass": values[..., 3],
            "special_mass": values[..., 4]}
    if plain is not None:
        sums["bp_shift"] = values[..., 5]

    rows, taken = draw_rows(ok, n, generator)
    picked, multi = sampled_multi_hop(probs, rows, hops)
    tv = (multi - picked).abs().sum(-1) * 0.5  # (b, h, N)
    h_ind = metrics.entropy(multi)
    h_ind_norm = h_ind.to(torch.float64) / log_n.expand(*ok.shape).gather(-1, rows)
    m = ok.to(torch.float64).sum(-1)
    for name, x in (("gtd", tv), ("indirect_entropy", h_ind), ("indirect_entropy_norm", h_ind_norm)):
        sums[name], sums[f"{name}_var"] = estimate(x, taken, m)

    blocks.counts(sums, keep, sink, ok, bad)  # queries: m, the rows summed
    if allowed is not None:
        sums["unscored"] = (keep & ~rows_ok).to(torch.float64).sum(-1)[:, None].expand_as(sink).clone()
    return sums
