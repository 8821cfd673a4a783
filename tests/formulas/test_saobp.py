"""SAOBP refinement: DESIGN §3 reference values, the loop reference, exactness at gamma = 0, padding,
gradients, batch invariance, properties, --bp-layers parsing, and a tiny BERT running it end to end."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnprobe.capture import probe
from attnprobe.capture.attention import attention_forward
from attnprobe.formulas import metrics
from attnprobe.formulas.saobp import (GAMMAS, SaobpSettings, _Messages, message_weights, parse_bp_layers, saobp_probs,
                                      saobp_probs_readable)
from tests import reference

A_REF = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]


def _bias(keep: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Additive padding bias ``(B, 1, 1, K)`` from a ``(B, K)`` keep mask, as transformers builds it."""
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]


def _module(gamma: float | None, strength: float = 1.0, layers=None, layer_idx: int = 0) -> nn.Module:
    module = nn.Module()
    settings_ = None if gamma is None else SaobpSettings(gamma=gamma, strength=strength, layers=layers).to_json()
    module.config = types.SimpleNamespace(saobp=settings_)
    module.layer_idx = layer_idx
    module.eval()
    return module


# ---- DESIGN §3 reference values -----------------------------------------------------------------


def test_reference_row_bp_high():
    S = torch.log(torch.tensor(A_REF, dtype=torch.float64))
    refined = saobp_probs(S, GAMMAS["bp-high"])
    assert refined[0].tolist() == pytest.approx([0.789299, 0.102782, 0.107919], abs=5e-7)


@pytest.mark.parametrize("variant, shift", [("bp-high", 0.087175), ("bp-low", 0.037458)])
def test_reference_mean_bp_shift(variant, shift):
    A = torch.tensor(A_REF, dtype=torch.float64)
    refined = saobp_probs(torch.log(A), GAMMAS[variant])
    assert metrics.bp_shift(refined, A).mean().item() == pytest.approx(shift, abs=5e-7)


def test_reference_values_match_the_loop_reference():
    S = np.log(np.array(A_REF))
    expected = reference.saobp(S, 0.9)
    got = saobp_probs(torch.from_numpy(S), 0.9).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_message_weights_zero_diagonal_rows_renormalized():
    A = torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=torch.float64)
    W = message_weights(A)
    assert W.tolist() == [[0.0, 0.0], [1.0, 0.0]]  # a row with no off-diagonal mass stays 0


# ---- against the slow numpy reference, with padding ---------------------------------------------


@pytest.mark.parametrize("gamma, strength", [(0.5, 1.0), (0.9, 1.0), (0.9, 2.5), (0.3, 0.4)])
def test_matches_loop_reference_with_padding(gamma, strength):
    rng = np.random.default_rng(int(gamma * 10 + strength * 100))
    B, H, K = 3, 2, 6
    lengths = [6, 4, 2]
    scores = torch.from_numpy(rng.normal(size=(B, H, K, K)) * 2.0)  # (B, H, Q, K)
    keep = torch.arange(K)[None, :] < torch.tensor(lengths)[:, None]  # (B, K)
    out = saobp_probs(scores + _bias(keep), gamma, strength)
    for b, n in enumerate(lengths):
        for h in range(H):
            expected = reference.saobp(scores[b, h, :n, :n].numpy(), gamma, strength)
            np.testing.assert_allclose(out[b, h, :n, :n].numpy(), expected, rtol=0, atol=1e-12)
            assert torch.all(out[b, h, :, n:] == 0.0), "padded keys must get exactly zero mass"


def test_padded_keys_get_exactly_zero_mass_in_float32():
    torch.manual_seed(0)
    scores = torch.randn(2, 4, 7, 7) * 4
    keep = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    out = saobp_probs(scores + _bias(keep, torch.float32), 0.9)
    assert torch.all(out[1, :, :, 3:] == 0.0)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 4, 7))


# ---- gamma = 0 is eager attention, exactly -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [None, 0.0])
def test_gamma_zero_equals_eager_attention_exactly(dtype, gamma):
    from transformers.models.bert.modeling_bert import eager_attention_forward

    torch.manual_seed(1)
    B, H, Q, D = 2, 3, 5, 8
    q, k, v = (torch.randn(B, H, Q, D, dtype=dtype) for _ in range(3))
    keep = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    bias = _bias(keep, dtype)
    module = _module(gamma)
    out, probs = attention_forward(module, q, k, v, bias, scaling=D ** -0.5)
    ref_out, ref_probs = eager_attention_forward(module, q, k, v, bias, scaling=D ** -0.5)
    assert torch.equal(out, ref_out)
    assert torch.equal(probs, ref_probs)


def test_refined_attention_forward_uses_saobp_probs():
    torch.manual_seed(2)
    B, H, Q, D = 2, 2, 4, 8
    q, k, v = (torch.randn(B, H, Q, D, dtype=torch.float64) for _ in range(3))
    bias = _bias(torch.tensor([[True] * 4, [True] * 2 + [False] * 2]))
    out, probs = attention_forward(_module(0.9, strength=1.5), q, k, v, bias)
    scores = q @ k.transpose(2, 3) * D ** -0.5 + bias
    expected = saobp_probs(scores, 0.9, 1.5)
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, (expected @ v).transpose(1, 2), rtol=0, atol=1e-15)


def test_layer_restriction_leaves_other_layers_plain():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    plain = torch.softmax(q @ k.transpose(2, 3) * 8 ** -0.5, -1)
    _, probs0 = attention_forward(_module(0.9, layers=(1,), layer_idx=0), q, k, v, None)
    _, probs1 = attention_forward(_module(0.9, layers=(1,), layer_idx=1), q, k, v, None)
    assert torch.equal(probs0, plain)
    assert not torch.allclose(probs1, plain)


# ---- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma, strength", [(0.9, 1.0), (0.5, 2.0)])
def test_gradcheck_through_saobp_probs(gamma, strength):
    torch.manual_seed(4)
    scores = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, 2, 4, 4, dtype=torch.float64)  # a random projection so all outputs matter

    def f(s):
        return (saobp_probs(s, gamma, strength) * weights).sum(-1)

    assert torch.autograd.gradcheck(f, (scores,), eps=1e-6, atol=1e-7)


def test_gradcheck_with_moderate_padding_bias():
    torch.manual_seed(5)
    scores = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.0, 0.0, 0.0, -30.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: saobp_probs(s + bias, 0.9), (scores,), eps=1e-6, atol=1e-7)


# ---- the fused message term against the readable form ---------------------------------------------


def _values_and_grads(fn, scores, weights, gamma, strength):
    scores = scores.clone().requires_grad_()
    probs = torch.softmax(scores, -1)
    probs.retain_grad()
    out = fn(scores, gamma, strength, probs=probs)
    (out * weights).sum().backward()
    return out.detach(), scores.grad, probs.grad


@pytest.mark.parametrize("gamma, strength", [(0.9, 1.0), (0.5, 1.0), (0.3, 2.5), (0.99, 0.4)])
def test_fused_values_and_gradients_equal_autograd_of_the_readable_form(gamma, strength):
    torch.manual_seed(7)
    lengths = [6, 4, 1]  # the 1-token sequence's row has no off-diagonal mass (W row stays 0)
    B, H, K = len(lengths), 3, 6
    keep = torch.arange(K)[None, :] < torch.tensor(lengths)[:, None]
    scores = torch.randn(B, H, K, K, dtype=torch.float64) * 3 + _bias(keep)  # (B, H, Q, K)
    weights = torch.randn(B, H, K, K, dtype=torch.float64)
    fused = _values_and_grads(saobp_probs, scores, weights, gamma, strength)
    readable = _values_and_grads(saobp_probs_readable, scores, weights, gamma, strength)
    for name, got, expected in zip(("values", "grad of scores", "grad of probs"), fused, readable):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=name)
        assert torch.isfinite(got).all(), name


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), pad=st.integers(0, 2), gamma=st.floats(0.01, 0.99), strength=st.floats(0.1, 3.0),
       sharp=st.floats(0.1, 8.0), seed=st.integers(0, 2**16))
def test_fused_equals_readable_on_random_scores(n, pad, gamma, strength, sharp, seed):
    gen = torch.Generator().manual_seed(seed)
    K = n + pad
    keep = (torch.arange(K) < n)[None, :]
    scores = torch.randn(2, 2, K, K, generator=gen, dtype=torch.float64) * sharp + _bias(keep)
    weights = torch.randn(2, 2, K, K, generator=gen, dtype=torch.float64)
    fused = _values_and_grads(saobp_probs, scores, weights, gamma, strength)
    readable = _values_and_grads(saobp_probs_readable, scores, weights, gamma, strength)
    for got, expected in zip(fused, readable):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_gradcheck_of_the_message_term_on_any_probabilities():
    # the hand-written backward of S + strength * W @ log1p(-gamma * A), for A that need not be softmax(S)
    torch.manual_seed(8)
    probs = torch.softmax(torch.randn(2, 2, 5, 5, dtype=torch.float64), -1).requires_grad_()
    scores = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    for gamma, strength in ((0.9, 1.0), (0.5, 1.0), (0.9, 0.7)):
        assert torch.autograd.gradcheck(lambda s, a: _Messages.apply(s, a, gamma, strength), (scores, probs),
                                        eps=1e-6, atol=1e-7)


def test_fused_runs_under_bfloat16_autocast_like_the_readable_form():
    torch.manual_seed(9)
    q, k = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    weights = torch.randn(2, 3, 7, 7)
    results = {}
    for fn in (saobp_probs, saobp_probs_readable):
        leaf = q.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = leaf @ k.transpose(-1, -2)
            out = fn(scores, 0.9, 1.0, probs=torch.softmax(scores, -1))
        (out.float() * weights).sum().backward()
        results[fn] = (out.float().detach(), leaf.grad)
    (out_f, grad_f), (out_r, grad_r) = results.values()
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=2e-2)  # bfloat16 rounding
    torch.testing.assert_close(grad_f, grad_r, rtol=5e-2, atol=5e-2)


# ---- batch invariance ----------------------------------------------------------------------------


def test_a_padded_batch_equals_its_examples_one_by_one():
    torch.manual_seed(6)
    lengths = [5, 3, 1]
    B, H, K, D = len(lengths), 2, 5, 4
    q, k, v = (torch.randn(B, H, K, D, dtype=torch.float64) for _ in range(3))
    keep = torch.arange(K)[None, :] < torch.tensor(lengths)[:, None]
    module = _module(0.9)
    out, probs = attention_forward(module, q, k, v, _bias(keep))  # out (B, Q, H, D)
    for b, n in enumerate(lengths):
        one_out, one_probs = attention_forward(module, q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n], None)
        torch.testing.assert_close(probs[b:b + 1, :, :n, :n], one_probs, rtol=0, atol=1e-12)
        torch.testing.assert_close(out[b:b + 1, :n], one_out, rtol=0, atol=1e-12)


# ---- properties ----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), pad=st.integers(0, 3), gamma=st.floats(0.0, 0.99), strength=st.floats(0.0, 3.0),
       sharp=st.floats(0.1, 8.0), seed=st.integers(0, 2**16))
def test_rows_sum_to_one_and_padding_stays_zero(n, pad, gamma, strength, sharp, seed):
    gen = torch.Generator().manual_seed(seed)
    K = n + pad
    scores = torch.randn(1, 2, K, K, generator=gen, dtype=torch.float64) * sharp
    keep = (torch.arange(K) < n)[None, :]
    out = saobp_probs(scores + _bias(keep), gamma, strength)
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 2, K, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.all(out >= 0)
    assert torch.all(out[..., n:] == 0.0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 8), strength=st.floats(0.0, 3.0), seed=st.integers(0, 2**16))
def test_gamma_zero_is_the_identity(n, strength, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, n, n, generator=gen) * 3
    assert torch.equal(saobp_probs(scores, 0.0, strength), torch.softmax(scores, -1))
    assert torch.equal(saobp_probs(scores, 0.9, 0.0), torch.softmax(scores, -1))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 6), gamma=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_matches_loop_reference_on_random_scores(n, gamma, seed):
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(n, n)) * 3.0
    got = saobp_probs(torch.from_numpy(S), gamma).numpy()
    np.testing.assert_allclose(got, reference.saobp(S, gamma), rtol=0, atol=1e-12)


# ---- settings and --bp-layers --------------------------------------------------------------------


@pytest.mark.parametrize("spec, num_layers, expected", [
    ("all", 6, None),
    ("ALL ", 6, None),
    ("lower", 6, (0, 1, 2)),
    ("upper", 6, (3, 4, 5)),
    ("lower", 5, (0, 1)),
    ("upper", 5, (2, 3, 4)),
    ("lower", 1, (0,)),
    ("upper", 1, (0,)),
    ("0,2", 4, (0, 2)),
    ("3, 1,1", 4, (1, 3)),
    ("0", 1, (0,)),
])
def test_parse_bp_layers(spec, num_layers, expected):
    assert parse_bp_layers(spec, num_layers) == expected


@pytest.mark.parametrize("spec, message", [
    ("middle", "expected all, lower, upper"),
    ("1;2", "expected all, lower, upper"),
    ("4", r"0\.\.3"),
    ("-1", r"0\.\.3"),
    (",", r"0\.\.3"),
])
def test_parse_bp_layers_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_bp_layers(spec, 4)


def test_settings_json_round_trip():
    for s in (SaobpSettings(), SaobpSettings(gamma=0.5, strength=2.0, layers=(0, 3), variant="bp-low")):
        assert SaobpSettings.from_json(s.to_json()) == s
    assert SaobpSettings().to_json()["layers"] == "all"
    assert SaobpSettings.from_json(None) is None
    assert not SaobpSettings(gamma=0.0).applies_to(0)
    assert SaobpSettings(layers=(1,)).applies_to(1) and not SaobpSettings(layers=(1,)).applies_to(0)


# ---- end to end on a tiny BERT -------------------------------------------------------------------


class _Recorder:
    """A probe stand-in that keeps each layer's (probs, plain) attention."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def observe(self, module, probs, plain=None):
        self.calls.append((probs, plain))


def _attention(loaded, text="the film was good but the plot was thin"):
    enc = loaded.tokenizer([text], return_tensors="pt")
    recorder = _Recorder()
    with torch.no_grad(), probe.capturing(recorder):
        hidden = loaded.model(**enc).last_hidden_state
    return recorder.calls, hidden


def test_tiny_bert_with_saobp_differs_from_baseline_and_reports_bp_shift(tiny_bert):
    from attnprobe.models import loading
    from attnprobe.config import ScanConfig
    from attnprobe.scanning.scanner import scan

    base = loading.load_model(str(tiny_bert))
    refined = loading.load_model(str(tiny_bert), saobp=SaobpSettings(gamma=0.9))
    assert base.saobp is None and refined.model.config._attn_implementation == "saobp"
    base_calls, base_out = _attention(base)
    ref_calls, ref_out = _attention(refined)
    assert len(base_calls) == len(ref_calls) == 2
    for (plain_probs, none), (probs, plain) in zip(base_calls, ref_calls):
        assert none is None and plain is not None
        assert not torch.allclose(probs, plain)
        # Â is the closed form applied to the scores the layer computed (log plain differs by a row constant)
        torch.testing.assert_close(probs, saobp_probs(torch.log(plain), 0.9), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(base_calls[0][0], ref_calls[0][1])  # same weights, same plain first layer
    assert not torch.allclose(base_out, ref_out)

    cfg = ScanConfig(model=str(tiny_bert), text=("a good film", "the plot was thin and slow"), device="cpu")
    heads_ref = scan(cfg, loaded=refined).heads
    heads_base = scan(cfg, loaded=base).heads
    assert heads_ref["bp_shift"].notna().all() and (heads_ref["bp_shift"] > 0).all()
    assert heads_base["bp_shift"].isna().all()


def test_tiny_bert_bp_layers_refines_only_those_layers(tiny_bert):
    from attnprobe.models import loading
    from attnprobe.config import ScanConfig
    from attnprobe.scanning.scanner import scan

    loaded = loading.load_model(str(tiny_bert), saobp=SaobpSettings(gamma=0.5, layers=(1,), variant="bp-low"))
    calls, _ = _attention(loaded)
    assert calls[0][1] is None and calls[1][1] is not None
    heads = scan(ScanConfig(model=str(tiny_bert), text=("a good film",), device="cpu"), loaded=loaded).heads
    assert heads.loc[heads.layer == 0, "bp_shift"].isna().all()
    assert heads.loc[heads.layer == 1, "bp_shift"].notna().all()
