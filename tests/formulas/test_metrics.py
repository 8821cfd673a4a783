"""metrics.py against DESIGN §2's reference values, a numpy loop reference, and property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnprobe.formulas import metrics
from attnprobe.capture.probe import Probe, means
from tests import reference

A_REF = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=torch.float64)


def _reduce(probs: torch.Tensor, keep: torch.Tensor, special=None, hops=2) -> dict[str, torch.Tensor]:
    """Run probs (B, H, Q, K) through the probe path for one layer and return per-head means (H,)."""
    probe = Probe(num_layers=1, hops=hops, metric_dtype=torch.float64)
    probe.begin(keep, special)
    probe.observe(None, probs)
    probe.end()
    return {k: v[0] for k, v in means(probe.totals()).items()}


def test_design_reference_values():
    m = _reduce(A_REF[None, None], torch.ones(1, 3, dtype=torch.bool))
    assert m["direct_entropy"].item() == pytest.approx(0.843250, abs=1e-6)
    assert m["direct_entropy_norm"].item() == pytest.approx(0.767559, abs=1e-6)
    assert m["indirect_entropy"].item() == pytest.approx(0.953002, abs=1e-6)
    assert m["gtd"].item() == pytest.approx(0.150000, abs=1e-6)
    assert m["sink_mass"].item() == pytest.approx(0.433333, abs=1e-6)


def test_against_numpy_reference_random_heads():
    rng = np.random.default_rng(0)
    for n, hops in ((2, 2), (5, 2), (7, 3), (9, 4)):
        A = reference.random_attention(rng, n)
        special = [True] + [False] * (n - 2) + [True]
        expected = reference.head_metrics(A, hops, special)
        got = _reduce(torch.tensor(A)[None, None], torch.ones(1, n, dtype=torch.bool),
                      torch.tensor(special)[None], hops)
        for name, value in expected.items():
            assert got[name].item() == pytest.approx(value, abs=1e-10), name


def test_zero_log_zero_is_zero():
    p = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    assert metrics.entropy(p).item() == 0.0
    assert not torch.isnan(metrics.entropy(p)).any()


def test_gtd_zero_for_self_attention_sink_and_uniform():
    n = 4
    eye = torch.eye(n, dtype=torch.float64)
    sink = torch.zeros(n, n, dtype=torch.float64)
    sink[:, 0] = 1.0
    uniform = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    for A in (eye, sink, uniform):
        assert metrics.gtd(A, metrics.multi_hop(A)).abs().max().item() < 1e-12


def test_gtd_one_for_disjoint_two_hop_reach():
    A = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # A @ A = I, disjoint from A
    assert metrics.gtd(A, metrics.multi_hop(A)).tolist() == [1.0, 1.0]


def test_multi_hop_is_row_stochastic():
    rng = np.random.default_rng(1)
    A = torch.tensor(reference.random_attention(rng, 6))
    for hops in (2, 3, 5):
        assert torch.allclose(metrics.multi_hop(A, hops).sum(-1), torch.ones(6, dtype=torch.float64))


def test_multi_hop_rejects_one_hop():
    with pytest.raises(ValueError):
        metrics.multi_hop(A_REF, 1)


def test_nonfinite_rows_are_counted_not_averaged():
    """A NaN in one sequence's attention drops that sequence's rows (their two-hop rows are NaN too)
    and leaves the other sequence's metrics exactly as they would be alone."""
    rng = np.random.default_rng(5)
    good = torch.tensor(reference.random_attention(rng, 3))
    bad = A_REF.clone()
    bad[1, 0] = float("nan")
    batch = torch.stack([good, bad])[:, None]  # (2, 1, 3, 3)
    keep = torch.ones(2, 3, dtype=torch.bool)
    m = _reduce(batch, keep)
    alone = _reduce(good[None, None], keep[:1])
    assert m["nonfinite"].item() == 3 and m["queries"].item() == 3
    for name in ("direct_entropy", "indirect_entropy", "gtd", "sink_mass", "first_mass"):
        assert m[name].item() == pytest.approx(alone[name].item(), abs=1e-12), name


def test_flags_thresholds():
    t = metrics.FlagThresholds()
    assert metrics.flags(0.10, 0.2, 0.1, t) == {"entropy_collapse": True, "low_gtd": False, "high_gtd": False,
                                                "sink": False, "diffuse": False, "collapsed": True}
    assert metrics.flags(0.5, 0.01, 0.1, t)["collapsed"]
    assert metrics.flags(0.5, 0.7, 0.6, t)["high_gtd"] and metrics.flags(0.5, 0.7, 0.6, t)["sink"]
    assert metrics.flags(0.97, 0.2, 0.1, t)["diffuse"]
    assert not any(metrics.flags(float("nan"), float("nan"), float("nan"), t).values())


# ---- property tests -------------------------------------------------------------------------------

def _padded_batch(rng, lengths, H, pad_to=None):
    """Random attention for sequences of the given lengths, padded with exact zeros; (B, H, Q, K)."""
    n = pad_to or max(lengths)
    probs = torch.zeros(len(lengths), H, n, n, dtype=torch.float64)
    keep = torch.zeros(len(lengths), n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        keep[b, :length] = True
        for h in range(H):
            probs[b, h, :, :length] = torch.tensor(
                np.stack([reference.random_attention(rng, length)[0] for _ in range(n)]))
            probs[b, h, :length, :length] = torch.tensor(reference.random_attention(rng, length))
    return probs, keep


seeds = st.integers(0, 10_000)
lengths = st.lists(st.integers(2, 7), min_size=1, max_size=4)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, lens=lengths)
def test_entropy_in_range_and_gtd_in_unit_interval(seed, lens):
    rng = np.random.default_rng(seed)
    probs, keep = _padded_batch(rng, lens, 2)
    v = metrics.query_metrics(probs, keep)
    valid = keep[:, None, :].expand_as(v["gtd"])
    log_n = torch.tensor([math.log(n) for n in lens], dtype=torch.float64)[:, None, None].expand_as(v["gtd"])
    assert (v["direct_entropy"][valid] >= -1e-12).all()
    assert (v["direct_entropy"][valid] <= log_n[valid] + 1e-9).all()
    assert (v["indirect_entropy"][valid] <= log_n[valid] + 1e-9).all()
    assert (v["gtd"][valid] >= -1e-12).all() and (v["gtd"][valid] <= 1 + 1e-12).all()


@settings(max_examples=25, deadline=None)
@given(seed=seeds, lens=lengths, extra=st.integers(1, 4))
def test_padding_changes_nothing(seed, lens, extra):
    rng = np.random.default_rng(seed)
    probs, keep = _padded_batch(rng, lens, 2)
    n = probs.shape[-1]
    padded = torch.zeros(*probs.shape[:2], n + extra, n + extra, dtype=torch.float64)
    padded[..., :n, :n] = probs
    padded[..., n:, :n] = probs[..., :1, :]  # padded query rows hold junk that must be ignored
    keep_p = torch.zeros(len(lens), n + extra, dtype=torch.bool)
    keep_p[:, :n] = keep
    a, b = _reduce(probs, keep), _reduce(padded, keep_p)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-12, equal_nan=True), name


@settings(max_examples=20, deadline=None)
@given(seed=seeds, lens=lengths)
def test_batch_equals_examples_one_by_one(seed, lens):
    rng = np.random.default_rng(seed)
    probs, keep = _padded_batch(rng, lens, 3)
    probe = Probe(num_layers=1, metric_dtype=torch.float64)
    probe.begin(keep)
    probe.observe(None, probs)
    probe.end()
    one = Probe(num_layers=1, metric_dtype=torch.float64)
    for b, length in enumerate(lens):
        one.begin(keep[b:b + 1, :length])
        one.observe(None, probs[b:b + 1, :, :length, :length])
        one.end()
    for name, value in probe.totals().items():
        assert torch.allclose(value, one.totals()[name], atol=1e-10, equal_nan=True), name


@settings(max_examples=20, deadline=None)
@given(seed=seeds, lens=lengths, perm_seed=seeds)
def test_permuting_heads_permutes_results(seed, lens, perm_seed):
    rng = np.random.default_rng(seed)
    H = 4
    probs, keep = _padded_batch(rng, lens, H)
    perm = torch.tensor(np.random.default_rng(perm_seed).permutation(H))
    a, b = _reduce(probs, keep), _reduce(probs[:, perm], keep)
    for name in a:
        assert torch.allclose(a[name][perm], b[name], atol=1e-12, equal_nan=True), name


def test_head_chunking_gives_the_same_sums(monkeypatch):
    rng = np.random.default_rng(3)
    probs, keep = _padded_batch(rng, [5, 3, 6], 6)
    whole = _reduce(probs, keep)
    monkeypatch.setattr("attnprobe.formulas.blocks.CHUNK_ELEMENTS", 1)  # one head per chunk
    chunked = _reduce(probs, keep)
    for name in whole:
        assert torch.allclose(whole[name], chunked[name], atol=1e-12, equal_nan=True), name
