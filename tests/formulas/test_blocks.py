"""blocks.block_sums (the probe's fast path) against the readable spec, query_sums(query_metrics(...)),
and the numpy reference, one test per numerical edge case: exact zeros, padded keys, -inf logits, NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnprobe.formulas import blocks, metrics
from attnprobe.capture.probe import Probe, means
from tests import reference


def _spec(probs, keep, special=None, hops=2, plain=None):
    return metrics.query_sums(metrics.query_metrics(probs, keep, special, hops, plain=plain), keep)


def _assert_same(got, want, atol):
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=atol, rtol=0, equal_nan=True), name


def _logits_batch(seed, lengths, H=3, dtype=torch.float64, pad_bias=None, scale=3.0):
    """Random logits (B, H, n, n) with padded keys biased as the attention function does; probs, keep."""
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    scores = torch.randn(len(lengths), H, n, n, generator=gen, dtype=dtype) * scale
    keep = torch.zeros(len(lengths), n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        keep[b, :length] = True
    bias = torch.finfo(dtype).min if pad_bias is None else pad_bias
    scores = scores + torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, bias)[:, None, None, :]
    return scores, torch.softmax(scores, -1), keep


@pytest.mark.parametrize("hops", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_sums_equals_spec_float64(seed, hops):
    scores, probs, keep = _logits_batch(seed, [5, 2, 7, 4])
    special = torch.zeros_like(keep)
    special[:, 0] = True
    special[1, 1] = True
    plain = torch.softmax(scores.clamp_min(-1e300) * 0.5, -1)
    want = _spec(probs, keep, special, hops, plain=plain)
    _assert_same(blocks.block_sums(probs, keep, special, hops, plain=plain), want, 1e-12)
    _assert_same(blocks.block_sums(probs, keep, special, hops, scores=scores), _spec(probs, keep, special, hops),
                 1e-12)


def test_block_sums_equals_numpy_reference():
    rng = np.random.default_rng(4)
    for n, hops in ((2, 2), (6, 2), (7, 3)):
        A = reference.random_attention(rng, n)
        special = [True] + [False] * (n - 2) + [True]
        sums = blocks.block_sums(torch.tensor(A)[None, None], torch.ones(1, n, dtype=torch.bool),
                                  torch.tensor(special)[None], hops, scores=torch.tensor(np.log(A))[None, None])
        got = means(sums)
        for name, value in reference.head_metrics(A, hops, special).items():
            assert got[name].item() == pytest.approx(value, abs=1e-10), name


def test_entropy_from_scores_equals_xlogy_in_float32():
    scores, probs, keep = _logits_batch(3, [128, 100, 64], H=4, dtype=torch.float32, scale=6.0)
    work = torch.empty_like(probs)
    exact = metrics.entropy(probs.double())
    assert (blocks.entropy_from_scores(probs, scores, work).double() - exact).abs().max() < 2e-5
    assert (blocks.entropy_into(probs, work).double() - exact).abs().max() < 2e-5
    want = _spec(probs, keep)
    _assert_same(blocks.block_sums(probs, keep, scores=scores), want, 2e-5 * 128)  # sums over <= 128 rows


def test_zero_probabilities_contribute_zero():
    """One-hot and two-hot rows (exact zeros, 0 log 0 = 0) give exact entropies on both paths."""
    probs = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    probs[0, 0, 0, 0] = 1.0
    probs[0, 0, 1, 2] = 1.0
    probs[0, 0, 2, :2] = 0.5
    keep = torch.ones(1, 3, dtype=torch.bool)
    work = torch.empty_like(probs)
    assert blocks.entropy_into(probs, work).tolist() == [[[0.0, 0.0, pytest.approx(np.log(2), abs=1e-15)]]]
    _assert_same(blocks.block_sums(probs, keep), _spec(probs, keep), 1e-15)
    scores = torch.log(probs)  # -inf where the probability is 0: recomputed on the log path
    _assert_same(blocks.block_sums(probs, keep, scores=scores), _spec(probs, keep), 1e-15)


def test_minus_inf_padding_bias_falls_back_exactly():
    scores, probs, keep = _logits_batch(5, [4, 6, 3], pad_bias=float("-inf"))
    _assert_same(blocks.block_sums(probs, keep, scores=scores), _spec(probs, keep), 1e-12)


def test_padded_keys_and_queries_change_nothing():
    scores, probs, keep = _logits_batch(6, [3, 5])
    n, extra = probs.shape[-1], 3
    big_s = torch.full((2, 3, n + extra, n + extra), torch.finfo(torch.float64).min, dtype=torch.float64)
    big_s[..., :n, :n] = scores
    big_s[..., n:, :n] = scores[..., :1, :]  # padded query rows: junk that must be ignored
    big_p = torch.softmax(big_s, -1)
    big_keep = torch.zeros(2, n + extra, dtype=torch.bool)
    big_keep[:, :n] = keep
    a = blocks.block_sums(probs, keep, scores=scores)
    _assert_same(blocks.block_sums(big_p, big_keep, scores=big_s), a, 1e-12)
    _assert_same(blocks.block_sums(big_p, big_keep), a, 1e-12)


@pytest.mark.parametrize("with_scores", [False, True])
def test_nonfinite_row_counted_dropped_others_exact(with_scores):
    scores, probs, keep = _logits_batch(7, [4, 4])
    scores[1, 0, 2, 1] = float("nan")
    probs = torch.softmax(scores, -1)  # row (1, 0, 2) is NaN
    got = blocks.block_sums(probs, keep, scores=scores if with_scores else None)
    assert got["nonfinite"][1, 0].item() > 0 and got["nonfinite"][0].sum().item() == 0
    assert got["sink_weight"][1, 0].item() == 0.0
    alone = blocks.block_sums(probs[:1], keep[:1])
    for name in alone:
        assert torch.equal(got[name][:1], alone[name]) or torch.allclose(got[name][:1], alone[name], atol=1e-15), name
    _assert_same(got, _spec(probs, keep), 1e-12)


def test_scratch_reused_across_shapes_and_dtypes():
    scratch = blocks.Scratch()
    for seed, lengths, dtype in ((0, [6, 6], torch.float64), (1, [3], torch.float64), (2, [7, 2, 5], torch.float32),
                                 (3, [4, 4], torch.float64)):
        scores, probs, keep = _logits_batch(seed, lengths, dtype=dtype)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        _assert_same(blocks.block_sums(probs, keep, scores=scores, scratch=scratch), _spec(probs, keep), tol)


def test_probe_with_and_without_logits_agree():
    scores, probs, keep = _logits_batch(8, [5, 3, 6], H=4)
    totals = []
    for kwargs in ({}, {"scores": scores}):
        probe = Probe(num_layers=1, metric_dtype=torch.float64)
        probe.begin(keep)
        probe.observe(None, probs, **kwargs)
        probe.end()
        totals.append(probe.totals())
    _assert_same(totals[1], totals[0], 1e-12)


def test_probe_ignores_logits_it_cannot_use():
    """Logits in another precision than the metrics (bf16 models) are not used: the log path runs."""
    scores, probs, keep = _logits_batch(9, [5, 4], dtype=torch.float32)
    probe = Probe(num_layers=1, metric_dtype=torch.float64)
    probe.begin(keep)
    probe.observe(None, probs, scores=scores + 100.0)  # wrong logits: would change the entropy if used
    probe.end()
    ref = Probe(num_layers=1, metric_dtype=torch.float64)
    ref.begin(keep)
    ref.observe(None, probs)
    ref.end()
    _assert_same(probe.totals(), ref.totals(), 0.0)


def test_padded_key_zero_falls_back_exactly():
    """Left padding puts a padded key at position 0 (A_i0 = 0): the log-sum-exp cannot be read off it."""
    scores, probs, keep = _logits_batch(10, [6, 4])
    keep = keep.flip(-1)  # padding on the left
    bias = torch.zeros(keep.shape, dtype=scores.dtype).masked_fill(~keep, torch.finfo(scores.dtype).min)
    scores = torch.randn(scores.shape, generator=torch.Generator().manual_seed(11), dtype=scores.dtype)
    scores = scores + bias[:, None, None, :]
    probs = torch.softmax(scores, -1)
    assert (probs[1, :, :, 0] == 0).all()
    _assert_same(blocks.block_sums(probs, keep, scores=scores), _spec(probs, keep), 1e-12)
