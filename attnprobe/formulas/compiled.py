"""An optional compiled path for the probe's per-block metrics (``scan --compile on``).

``blocks.block_sums`` makes a few passes over each ``(b, h, Q, K)`` block: a product and two sums for
the direct entropy, a clamp, a log, a product and a sum for the indirect entropy, a difference, an
absolute value and a sum for GTD, a product and a sum for the special-token mass, then the masses, the
validity masks and the float64 sums over queries as a few dozen small operations. ``block_reduce`` writes
the whole reduction of a block, from the attention, its logits and ``A @ A`` to the ``(b, h)`` sums, as one
function that ``torch.compile`` fuses into a few loops over the block; ``A @ A`` stays an ordinary matrix
product before it. The result is the plain path's numbers up to float rounding (the order of the row sums
differs), checked at start-up.

``prepare`` decides which path a scan runs. With ``on`` it compiles ``block_reduce`` (the first compile on a
CPU takes tens of seconds; torch caches it on disk for later runs), then, on a block the size of the scan's
own, checks the compiled sums against the plain path's (``block_sums``) and times both, and keeps the
compiled path only if it agrees and is faster. Any failure (no compiler, a compile error, disagreement,
slower) keeps the plain path, and run.json says which path ran and why. Layers without logits
(SAOBP-refined layers, lower-precision attention) always take the plain path, and so does a block in
which the log-sum-exp cannot serve some row (see ``blocks.entropy_from_scores``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from attnprobe.formulas import blocks, metrics

MODES = ("off", "on")
# Compiled and plain per-query columns must agree to this relative tolerance (float32 sums of <= K terms).
RTOL = 1e-4
TIMING_REPEATS = 3
# The sums block_reduce returns, in order: the keys of blocks.block_sums for a block without ``plain``.
SUMS = ("direct_entropy", "direct_entropy_norm", "indirect_entropy", "indirect_entropy_norm", "gtd",
        "self_mass", "local_mass", "first_mass", "special_mass", "sink_weighted", "sink_weight", "queries",
        "nonfinite")


def block_reduce(probs: torch.Tensor, scores: torch.Tensor, multi: torch.Tensor, keep: torch.Tensor,
                 special: torch.Tensor):
    """``blocks.block_sums`` of one unrefined block with logits, from ``multi`` (its multi-hop attention).

    Args:
        probs, scores, multi: ``(b, h, Q, K)``: the attention, its logits, ``multi_hop(probs)``.
        keep, special: ``(b, K)`` 0/1 in ``probs``' dtype: real tokens, special tokens.

    Returns:
        the ``(b, h)`` float64 sums named in ``SUMS``, in that order, then a 0-dim bool: True when the
        log-sum-exp served every valid row. Where it is False the sums are not those of ``block_sums``
        and the caller computes the block by the plain path.
    """
    tiny = torch.finfo(probs.dtype).tiny
    f64 = torch.float64
    first = probs[..., 0]
    lse = scores[..., 0] - first.log()
    # A key of probability 0 adds 0, also where its logit is -inf (a mask of -inf, not finfo.min).
    h_dir = lse * probs.sum(-1) - torch.where(probs > 0, probs * scores, 0.0).sum(-1)
    h_dir = torch.where(first >= tiny, h_dir, float("nan"))
    h_ind = -(multi * multi.clamp_min(tiny).log()).sum(-1)
    tv = (multi - probs).abs().sum(-1) * 0.5
    spec = (probs * special[:, None, None, :]).sum(-1)
    own, local, first_key = metrics.self_mass(probs), metrics.local_mass(probs), metrics.first_mass(probs)

    valid = keep[:, None, :] > 0  # (b, 1, Q)
    served = ~(valid & ~torch.isfinite(h_dir)).any()
    bad = ~torch.isfinite(tv) & valid
    ok = valid & ~bad
    d, i, g, s, lo, fi, sp = (torch.where(ok, c.to(f64), 0.0).sum(-1) for c in (h_dir, h_ind, tv, own, local,
                                                                               first_key, spec))
    n = keep.to(f64).sum(-1)  # (b,)
    log_n = metrics.normalizer(keep)[:, None]
    share = (keep[:, None, :, None] * probs).sum(-2) / n.clamp_min(1.0).to(probs.dtype)[:, None, None]
    head_ok = ~bad.any(-1)  # (b, h)
    n = n[:, None]
    return (d, d / log_n, i, i / log_n, g, s, lo, fi, sp,
            torch.where(head_ok, n * share.amax(-1).to(f64), 0.0), torch.where(head_ok, n.expand_as(head_ok), 0.0),
            ok.to(f64).sum(-1), bad.to(f64).sum(-1), served)


def fused_sums(reduce: Callable, probs: torch.Tensor, keep: torch.Tensor, special: torch.Tensor | None = None,
               hops: int = 2, plain: torch.Tensor | None = None, scores: torch.Tensor | None = None,
               scratch: blocks.Scratch | None = None) -> dict[str, torch.Tensor]:
    """``blocks.block_sums`` (same arguments) with ``reduce`` (``block_reduce``, compiled) where it serves.

    Blocks without logits, refined blocks and blocks the log-sum-exp cannot serve take ``block_sums``.
    """
    if scores is None or plain is not None:
        return blocks.block_sums(probs, keep, special, hops, plain, scores, scratch)
    scratch = scratch if scratch is not None else blocks.Scratch()
    multi = blocks.multi_hop_into(probs, hops, scratch)
    flags = special if special is not None else torch.zeros_like(keep)
    *sums, served = reduce(probs, scores, multi, keep.to(probs.dtype), flags.to(probs.dtype))
    if not bool(served):
        return blocks.block_sums(probs, keep, special, hops, plain, scores, scratch)
    return dict(zip(SUMS, sums))


@dataclass
class MetricsPath:
    """Which per-block function the probe runs, and why (run.json ``metrics_path`` and ``compile``)."""

    block_fn: Callable = blocks.block_sums
    name: str = "plain"
    info: dict = field(default_factory=dict)


def plain() -> MetricsPath:
    """The plain path, as ``--compile off`` runs it."""
    return MetricsPath(info={"requested": "off", "reason": "--compile off"})


def prepare(mode: str, device: torch.device | str, dtype: torch.dtype, num_heads: int, max_length: int,
            compiler: Callable | None = None) -> MetricsPath:
    """The metrics path for a scan: the plain one, or (``mode="on"``) the compiled one where it is checked.

    Args:
        mode: ``off`` or ``on``.
        device, dtype: where and in what precision the probe computes.
        num_heads, max_length: shape of the check block (the probe's block at the scan's longest sequence).
        compiler: replaces ``torch.compile`` (tests).
    """
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return plain()
    started = time.perf_counter()
    compiler = compiler or (lambda fn: torch.compile(fn, dynamic=True))
    probs, scores, keep, special = _check_block(device, dtype, num_heads, max_length)
    scratch = blocks.Scratch()
    try:
        fused_fn = partial(fused_sums, compiler(block_reduce))
        got = fused_fn(probs, keep, special, 2, None, scores, scratch)  # the first call compiles
        compile_s = time.perf_counter() - started
        worst = _disagreement(got, blocks.block_sums(probs, keep, special, 2, None, scores, scratch))
    except Exception as exc:  # no compiler, a backend error: the plain path, and say why
        first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
        return _fallback(f"compiling failed ({type(exc).__name__}: {first_line})", time.perf_counter() - started)
    if not worst <= RTOL:
        return _fallback(f"the compiled metrics disagreed with the plain ones (relative {worst:.2e} > {RTOL:g})",
                         compile_s)
    timing = {}
    for name, fn in (("plain", blocks.block_sums), ("compiled", fused_fn)):
        fn(probs, keep, special, 2, None, scores, scratch)  # warm
    for name, fn in (("plain", blocks.block_sums), ("compiled", fused_fn)) * TIMING_REPEATS:
        t = time.perf_counter()
        fn(probs, keep, special, 2, None, scores, scratch)
        timing.setdefault(name, []).append(time.perf_counter() - t)
    plain_s, fused_s = min(timing["plain"]), min(timing["compiled"])  # the least disturbed of each
    info = {"requested": "on", "compile_s": round(compile_s, 3), "check_block": list(probs.shape),
            "check_plain_ms": round(plain_s * 1e3, 3), "check_compiled_ms": round(fused_s * 1e3, 3),
            "max_rel_diff": worst}
    if not _faster(plain_s, fused_s):
        info["reason"] = "the compiled metrics were not faster on the check block"
        return MetricsPath(info=info)
    info["reason"] = "compiled, checked against the plain path, faster on the check block"
    return MetricsPath(block_fn=fused_fn, name="compiled", info=info)


def _faster(plain_s: float, fused_s: float) -> bool:
    return fused_s < plain_s


def _fallback(reason: str, seconds: float) -> MetricsPath:
    return MetricsPath(info={"requested": "on", "reason": reason, "compile_s": round(seconds, 3)})


def _check_block(device, dtype, num_heads: int, max_length: int):
    """A block like the probe's at the scan's longest sequence: ``(probs, scores, keep, special)``, softmax rows
    with a padded key (probability exactly 0) and special tokens at both ends."""
    n = max(4, max_length)
    limit = blocks.CHUNK_ELEMENTS if torch.device(device).type == "cpu" else blocks.DEVICE_CHUNK_ELEMENTS
    b0, b1, h0, h1 = blocks.blocks(1 << 16, num_heads, n * n, limit)[0]
    b, h = b1 - b0, h1 - h0
    gen = torch.Generator().manual_seed(0)
    scores = (torch.randn(b, h, n, n, generator=gen, dtype=torch.float64) * 4).to(dtype)
    scores[..., -1] = torch.finfo(dtype).min  # a padded key: probability exactly 0
    probs = scores.softmax(-1)
    keep = torch.ones(b, n, dtype=torch.bool)
    special = torch.zeros(b, n, dtype=torch.bool)
    special[:, 0] = special[:, -2] = True
    return tuple(t.to(device) for t in (probs, scores, keep, special))


def _disagreement(got: dict, want: dict) -> float:
    """The largest relative difference between two ``block_sums`` results (NaN where only one is NaN: inf)."""
    worst = 0.0
    for name in want:
        a, b = got[name].double().cpu(), want[name].double().cpu()
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return float("inf")
        a, b = torch.nan_to_num(a), torch.nan_to_num(b)
        scale = b.abs().clamp_min(1.0)
        worst = max(worst, float(((a - b).abs() / scale).max()))
    return worst
