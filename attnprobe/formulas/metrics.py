"""Attention metrics as pure torch functions: entropies, multi-hop attention, GTD, mass shares, flags.

Every metric function returns *unreduced* per-query (or per-sequence) values; reduction over queries
is a separate, explicit step (``query_sums``), and flags are computed from reduced values. These pure
functions are the readable spec. ``blocks.block_sums`` is the fast path the probe runs: the same
sums in as few passes over memory as the math allows, into reused scratch buffers, tested against
``query_sums(query_metrics(...))``. The definitions are those of docs/method.md (this project's
reconstruction, see there). This module depends on torch alone: no transformers, no pandas.

Shapes: ``probs`` is ``(..., Q, K)`` with rows summing to 1 over valid keys and padded keys exactly 0;
``keep`` is ``(..., K)`` bool, True for real tokens (queries and keys share it, Q == K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Names of the per-query metrics that are averaged over valid queries (token-weighted).
QUERY_METRICS = (
    "direct_entropy",
    "direct_entropy_norm",
    "indirect_entropy",
    "indirect_entropy_norm",
    "gtd",
    "self_mass",
    "local_mass",
    "first_mass",
    "special_mass",
)
FLAGS = ("entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse", "collapsed")


def _safe_xlogx(p: torch.Tensor) -> torch.Tensor:
    """``p * log p`` with ``0 log 0 = 0``."""
    return torch.special.xlogy(p, p)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Row entropy in nats, ``H(p) = -sum_k p_k log p_k``; ``(..., Q, K) -> (..., Q)``.

    >>> round(entropy(torch.tensor([[0.5, 0.5, 0.0]])).item(), 6)  # log 2
    0.693147
    """
    return -_safe_xlogx(probs).sum(-1)


def direct_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``H_dir(i) = H(A_i)``: entropy of each query's attention row, ``(..., Q)``."""
    return entropy(probs)


def multi_hop(probs: torch.Tensor, hops: int = 2) -> torch.Tensor:
    """``M = (A^2 + ... + A^K) / (K - 1)``, row-stochastic; ``(..., Q, K) -> (..., Q, K)``.

    >>> A = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> multi_hop(A, 2).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    if hops < 2:
        raise ValueError(f"hops must be >= 2, got {hops}")
    power = probs @ probs  # (..., Q, K)
    total = power
    for _ in range(hops - 2):
        power = power @ probs
        total = total + power
    return total if hops == 2 else total / (hops - 1)


def indirect_entropy(multi: torch.Tensor) -> torch.Tensor:
    """``H_ind(i) = H(M_i)`` of the multi-hop rows, ``(..., Q)``."""
    return entropy(multi)


def gtd(probs: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
    """Global Token Dependency ``gtd(i) = 1/2 sum_k |M_ik - A_ik|`` in [0, 1], ``(..., Q)``."""
    return 0.5 * torch.linalg.vector_norm(multi - probs, ord=1, dim=-1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``1/2 sum_k |p_k - q_k|`` per row, ``(..., Q)``; ``bp_shift`` is this for (refined, plain)."""
    return 0.5 * (p - q).abs().sum(-1)


def bp_shift(refined: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Attention mass the SAOBP messages moved, ``1/2 sum_k |Â_ik - A_ik|``, ``(..., Q)``."""
    return total_variation(refined, probs)


def self_mass(probs: torch.Tensor) -> torch.Tensor:
    """``A_ii``, ``(..., Q)``."""
    return probs.diagonal(dim1=-2, dim2=-1)


def local_mass(probs: torch.Tensor) -> torch.Tensor:
    """``A_i,i-1 + A_i,i+1`` (neighbours that exist), ``(..., Q)``."""
    out = torch.zeros(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    if probs.shape[-1] > 1:
        out[..., 1:] += probs.diagonal(offset=-1, dim1=-2, dim2=-1)
        out[..., :-1] += probs.diagonal(offset=1, dim1=-2, dim2=-1)
    return out


def first_mass(probs: torch.Tensor) -> torch.Tensor:
    """Mass on key position 0 ([CLS] / ``<s>``), ``(..., Q)``."""
    return probs[..., 0]


def special_mass(probs: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """Mass on the tokenizer's special tokens; ``special`` is ``(..., K)`` bool, result ``(..., Q)``."""
    return (probs @ special.to(probs.dtype).unsqueeze(-1)).squeeze(-1)  # a matrix-vector product


def key_share(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Share of all attention that each key receives, ``(1/n) sum_i A_ik`` over valid queries, ``(..., K)``."""
    w = keep.to(probs.dtype)
    n = w.sum(-1, keepdim=True).clamp_min(1.0)
    return (w.unsqueeze(-2) @ probs).squeeze(-2) / n  # (..., 1, Q) @ (..., Q, K): a vector-matrix product


def sink_mass(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``max_k (1/n) sum_i A_ik`` per sequence: the largest share one key receives, ``(...,)``."""
    return key_share(probs, keep).amax(-1)


def normalizer(keep: torch.Tensor) -> torch.Tensor:
    """``log n`` per sequence for normalizing entropies, ``(...,)``; sequences with n < 2 get 1."""
    n = keep.sum(-1).to(torch.float64)
    return torch.where(n >= 2, n.log(), torch.ones_like(n))


# ---- attention whose rows see different keys (causal and sliding-window masks) ----------------------
#
# ``allowed`` is ``(B, Q, K)`` bool: the keys each query row may see under the model's own mask, padding
# included. Row i has ``n_i = sum_k allowed_ik`` keys; rows with ``n_i < 2`` (a causal sequence's first token)
# are not scored. For an encoder (``allowed_ik = keep_i and keep_k``) every definition below reduces to the
# per-sequence one above.


def row_keys(allowed: torch.Tensor) -> torch.Tensor:
    """``n_i``, the keys each query row may see, ``(..., Q, K) -> (..., Q)`` float64."""
    return allowed.sum(-1).to(torch.float64)


def scored_rows(keep: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Rows that are scored: real tokens that see at least 2 keys, ``(B, Q)`` bool."""
    return keep & (allowed.sum(-1) >= 2)


def row_normalizer(allowed: torch.Tensor) -> torch.Tensor:
    """``log n_i`` per query row for normalizing entropies, ``(..., Q)`` float64; rows with n_i < 2 get 1."""
    n = row_keys(allowed)
    return torch.where(n >= 2, n.log(), torch.ones_like(n))


def first_position(keep: torch.Tensor) -> torch.Tensor:
    """Index of each sequence's first real token, ``(B, K) -> (B,)`` (0 unless the batch is left-padded)."""
    return keep.to(torch.int8).argmax(-1)


def first_key_mass(probs: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Mass on each sequence's first real token, ``probs`` ``(B, H, Q, K)``, ``first`` ``(B,)`` -> ``(B, H, Q)``."""
    B, H, Q, _ = probs.shape
    return probs.gather(-1, first.view(B, 1, 1, 1).expand(B, H, Q, 1)).squeeze(-1)


def visible_key_share(probs: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Each key's mean weight over the rows that see it, ``(..., Q, K) -> (..., K)``; NaN for a key no row sees.

    ``seen`` (broadcast against ``probs``) marks, for scored rows only, the keys each row may see.
    """
    w = seen.to(probs.dtype)
    count = w.sum(-2)
    share = (w * probs).sum(-2) / count.clamp_min(1.0)
    return torch.where(count > 0, share, float("nan"))


def row_sink_mass(probs: torch.Tensor, keep: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``max_k`` of ``visible_key_share`` over the scored rows, per sequence and head, ``(B, H)``."""
    seen = (allowed & scored_rows(keep, allowed)[..., None])[:, None]  # (B, 1, Q, K)
    share = visible_key_share(probs, seen)
    return torch.nan_to_num(share, nan=-1.0).amax(-1).clamp_min(0.0)


def query_metrics(
    probs: torch.Tensor,
    keep: torch.Tensor,
    special: torch.Tensor | None = None,
    hops: int = 2,
    plain: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All per-query metrics of one batch of heads, unreduced.

    Args:
        probs: ``(B, H, Q, K)`` attention probabilities (the attention the model uses).
        keep: ``(B, K)`` bool, True for real tokens.
        special: ``(B, K)`` bool, True for special tokens (None: no special tokens).
        hops: K of the multi-hop attention.
        plain: ``(B, H, Q, K)`` attention before SAOBP refinement, for ``bp_shift`` (None: not refined).
        allowed: ``(B, Q, K)`` bool, the keys each row may see under the model's mask (causal attention);
            None: every real token sees every real token (an encoder).

    Returns:
        dict of ``(B, H, Q)`` tensors named as in ``QUERY_METRICS`` (plus ``bp_shift`` when ``plain``
        is given), ``sink_mass`` as ``(B, H)`` and ``nonfinite`` as ``(B, H, Q)`` bool; with ``allowed``
        also ``scored`` ``(B, Q)`` bool, the rows ``query_sums`` averages over.
    """
    if allowed is None:  # every real token sees every real token: per-sequence n
        log_n = normalizer(keep).to(probs.dtype)[:, None, None]  # (B, 1, 1)
        first, sink = first_mass(probs), sink_mass(probs, keep[:, None, :])
    else:  # each row sees its own keys: log n_i, the first real token, keys over the rows that see them
        log_n = row_normalizer(allowed).to(probs.dtype)[:, None, :]  # (B, 1, Q)
        first, sink = first_key_mass(probs, first_position(keep)), row_sink_mass(probs, keep, allowed)
    multi = multi_hop(probs, hops)
    h_dir = direct_entropy(probs)
    h_ind = indirect_entropy(multi)
    # gtd(probs, multi), computed in place: multi is not needed after this.
    tv = 0.5 * torch.linalg.vector_norm(multi.sub_(probs), ord=1, dim=-1)
    del multi
    out = {
        "direct_entropy": h_dir,
        "direct_entropy_norm": h_dir / log_n,
        "indirect_entropy": h_ind,
        "indirect_entropy_norm": h_ind / log_n,
        "gtd": tv,
        "self_mass": self_mass(probs),
        "local_mass": local_mass(probs),  # padded keys hold exactly 0
        "first_mass": first,
        "special_mass": special_mass(probs, special[:, None, :]) if special is not None
        else torch.zeros_like(h_dir),
        "sink_mass": sink,
    }
    if allowed is not None:
        out["scored"] = scored_rows(keep, allowed)
    if plain is not None:
        out["bp_shift"] = bp_shift(probs, plain)
    # A NaN or Inf anywhere in a row makes its entropy non-finite, so this costs no pass over (Q, K).
    out["nonfinite"] = ~(torch.isfinite(h_dir) & torch.isfinite(out["gtd"]))
    return out


def query_sums(values: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reduce per-query values to per-(sequence, head) sums over valid, finite query rows.

    Args:
        values: output of ``query_metrics`` for a ``(B, H, Q, K)`` batch.
        keep: ``(B, Q)`` bool.

    Returns:
        dict with ``(B, H)`` float64 sums for each per-query metric, ``queries`` (B, H) the count of
        rows summed, ``nonfinite`` (B, H) the count of valid rows dropped for NaN/Inf, and
        ``sink_weighted`` (B, H) = ``n * sink_mass`` with ``n`` the valid tokens of the sequence.
    """
    rows = values.get("scored", keep)  # (B, Q): causal attention leaves out rows that see < 2 keys
    valid = rows[:, None, :].expand_as(values["nonfinite"])  # (B, H, Q)
    bad = values["nonfinite"] & valid
    ok = valid & ~bad
    okf = ok.to(torch.float64)
    sums = {}
    for name, v in values.items():
        if name in ("nonfinite", "sink_mass", "scored"):
            continue
        sums[name] = torch.where(ok, v.to(torch.float64), 0.0).sum(-1)
    n = keep.sum(-1).to(torch.float64)[:, None]  # (B, 1)
    sink = values["sink_mass"].to(torch.float64)
    head_ok = ~bad.any(-1)  # (B, H): a sequence-level value needs every row finite
    sums["sink_weighted"] = torch.where(head_ok, n * sink, 0.0)
    sums["sink_weight"] = torch.where(head_ok, n.expand_as(sink), 0.0)
    sums["queries"] = okf.sum(-1)
    sums["nonfinite"] = bad.to(torch.float64).sum(-1)
    if "scored" in values:
        unscored = (keep & ~rows).to(torch.float64).sum(-1)[:, None]  # (B, 1)
        sums["unscored"] = unscored.expand_as(sums["queries"]).clone()
    return sums


@dataclass(frozen=True)
class FlagThresholds:
    """Thresholds for ``flags``; mirrors attnprobe.config.Thresholds without importing it."""

    entropy_collapse: float = 0.15
    low_gtd: float = 0.05
    high_gtd: float = 0.60
    sink: float = 0.5
    diffuse: float = 0.95


def flags(direct_entropy_norm: float, gtd_value: float, sink_value: float, t: FlagThresholds | object) -> dict[str, bool]:
    """Collapse flags of one head from its reduced metrics (DESIGN §2.5).

    >>> flags(0.1, 0.2, 0.3, FlagThresholds())["collapsed"]
    True
    """

    def lt(x, y):
        return bool(x < y) if not math.isnan(x) else False

    def gt(x, y):
        return bool(x > y) if not math.isnan(x) else False

    out = {
        "entropy_collapse": lt(direct_entropy_norm, t.entropy_collapse),
        "low_gtd": lt(gtd_value, t.low_gtd),
        "high_gtd": gt(gtd_value, t.high_gtd),
        "sink": gt(sink_value, t.sink),
        "diffuse": gt(direct_entropy_norm, t.diffuse),
    }
    out["collapsed"] = out["entropy_collapse"] or out["low_gtd"]
    return out
