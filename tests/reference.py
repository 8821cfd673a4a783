"""Slow, obviously-correct numpy float64 references for the metrics (loops, no vectorization tricks)."""

from __future__ import annotations

import math

import numpy as np


def entropy(p) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def multi_hop(A: np.ndarray, hops: int = 2) -> np.ndarray:
    """``(A^2 + ... + A^K) / (K - 1)`` by repeated products."""
    powers, P = [], A.copy()
    for _ in range(hops - 1):
        P = P @ A if powers else A @ A
        powers.append(P)
    return sum(powers) / (hops - 1)


def head_metrics(A: np.ndarray, hops: int = 2, special: list[bool] | None = None) -> dict[str, float]:
    """Per-query means of every metric for one head of one sequence, ``A`` (n, n) over valid tokens."""
    n = A.shape[0]
    M = multi_hop(A, hops)
    rows = {k: [] for k in ("direct_entropy", "direct_entropy_norm", "indirect_entropy",
                            "indirect_entropy_norm", "gtd", "self_mass", "local_mass", "first_mass",
                            "special_mass")}
    for i in range(n):
        hd, hi = entropy(A[i]), entropy(M[i])
        rows["direct_entropy"].append(hd)
        rows["direct_entropy_norm"].append(hd / math.log(n))
        rows["indirect_entropy"].append(hi)
        rows["indirect_entropy_norm"].append(hi / math.log(n))
        rows["gtd"].append(0.5 * sum(abs(M[i, k] - A[i, k]) for k in range(n)))
        rows["self_mass"].append(A[i, i])
        rows["local_mass"].append((A[i, i - 1] if i > 0 else 0.0) + (A[i, i + 1] if i + 1 < n else 0.0))
        rows["first_mass"].append(A[i, 0])
        rows["special_mass"].append(sum(A[i, k] for k in range(n) if special and special[k]))
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out["sink_mass"] = max(sum(A[i, k] for i in range(n)) / n for k in range(n))
    return out


def saobp(S: np.ndarray, gamma: float, strength: float = 1.0) -> np.ndarray:
    """Refined attention for one head, ``S`` (n, n) logits over valid tokens, by explicit loops."""
    n = S.shape[0]
    A = np.exp(S - S.max(1, keepdims=True))
    A /= A.sum(1, keepdims=True)
    W = A.copy()
    for i in range(n):
        W[i, i] = 0.0
        total = W[i].sum()
        W[i] = W[i] / total if total > 0 else 0.0
    out = np.zeros_like(S)
    for i in range(n):
        logits = np.array([S[i, k] + strength * sum(W[i, j] * math.log1p(-gamma * A[j, k]) for j in range(n))
                           for k in range(n)])
        e = np.exp(logits - logits.max())
        out[i] = e / e.sum()
    return out


def random_attention(rng: np.random.Generator, n: int, sharp: float = 2.0) -> np.ndarray:
    S = rng.normal(size=(n, n)) * sharp
    A = np.exp(S - S.max(1, keepdims=True))
    return A / A.sum(1, keepdims=True)


def causal_head_sums(A: np.ndarray, visible: np.ndarray, hops: int = 2,
                     special: list[bool] | None = None) -> dict[str, float]:
    """Sums over the scored rows of one head of one sequence whose rows see different keys (a decoder).

    ``A`` (n, n) over the sequence's real tokens, ``visible`` (n, n) bool: the keys row i may see (causal, and
    a sliding window). Row i is scored when it sees ``n_i >= 2`` keys; its entropies are normalized by
    ``log n_i``. ``sink`` takes each key's mean over the scored rows that see it, weighted by ``n``.
    Returns the sums of every per-query metric, ``queries`` (scored rows), ``unscored``, and ``sink_weighted``
    / ``sink_weight`` (n * sink_mass, n).
    """
    n = A.shape[0]
    M = multi_hop(A, hops)
    out = {k: 0.0 for k in ("direct_entropy", "direct_entropy_norm", "indirect_entropy", "indirect_entropy_norm",
                            "gtd", "self_mass", "local_mass", "first_mass", "special_mass", "queries", "unscored")}
    scored = []
    for i in range(n):
        n_i = int(visible[i].sum())
        if n_i < 2:
            out["unscored"] += 1
            continue
        scored.append(i)
        hd, hi = entropy(A[i]), entropy(M[i])
        out["direct_entropy"] += hd
        out["direct_entropy_norm"] += hd / math.log(n_i)
        out["indirect_entropy"] += hi
        out["indirect_entropy_norm"] += hi / math.log(n_i)
        out["gtd"] += 0.5 * sum(abs(M[i, k] - A[i, k]) for k in range(n))
        out["self_mass"] += A[i, i]
        out["local_mass"] += (A[i, i - 1] if i > 0 else 0.0) + (A[i, i + 1] if i + 1 < n else 0.0)
        out["first_mass"] += A[i, 0]
        out["special_mass"] += sum(A[i, k] for k in range(n) if special and special[k])
        out["queries"] += 1
    shares = []
    for k in range(n):
        rows = [i for i in scored if visible[i, k]]
        if rows:
            shares.append(sum(A[i, k] for i in rows) / len(rows))
    out["sink_weighted"] = n * max(shares) if shares else 0.0
    out["sink_weight"] = float(n) if shares else 0.0
    return out
