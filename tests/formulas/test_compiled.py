"""The compiled metrics path (attnprobe/compiled.py, ``scan --compile on``).

``compiled.block_reduce`` is checked uncompiled against the readable spec in float64 on every edge case of
``blocks.block_sums`` (padded keys, several hops, zero probabilities, NaN rows, rows the log-sum-exp
cannot serve); the compiled function against the plain path in float32, through a whole scan;
and ``prepare``'s fallbacks (a compiler that fails, disagrees or is slower) keep the plain path.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from attnprobe.formulas import compiled
from attnprobe.formulas import blocks
from attnprobe.config import ScanConfig
from attnprobe.scanning.scanner import scan
from tests.formulas.test_blocks import _assert_same, _logits_batch, _spec


def _reduce(probs, keep, special=None, hops=2, scores=None, calls=None):
    """``fused_sums`` with ``block_reduce`` uncompiled; ``calls`` collects whether each call served."""
    def reduce(*args):
        out = compiled.block_reduce(*args)
        if calls is not None:
            calls.append(bool(out[-1]))
        return out
    return compiled.fused_sums(reduce, probs, keep, special, hops, scores=scores)


@pytest.mark.parametrize("pad_bias", [None, float("-inf")])
@pytest.mark.parametrize("seed", [0, 1])
def test_block_reduce_equals_spec_float64(seed, pad_bias):
    scores, probs, keep = _logits_batch(seed, [5, 2, 7, 4], pad_bias=pad_bias)
    special = torch.zeros_like(keep)
    special[:, 0] = True
    special[2, 3] = True
    for hops in (2, 3):
        calls = []
        got = _reduce(probs, keep, special, hops, scores=scores, calls=calls)
        assert calls == [True]  # the compiled function's sums, not the fallback's
        assert set(got) == set(blocks.block_sums(probs, keep, special, hops, scores=scores))
        _assert_same(got, _spec(probs, keep, special, hops), 1e-12)
    _assert_same(_reduce(probs, keep, None, scores=scores), _spec(probs, keep), 1e-12)


def test_block_reduce_one_token_and_padded_query_rows():
    scores, probs, keep = _logits_batch(3, [1, 6], pad_bias=float("-inf"))
    calls = []
    _assert_same(_reduce(probs, keep, keep.clone(), scores=scores, calls=calls),
                 _spec(probs, keep, keep.clone()), 1e-12)
    assert calls == [True]


def test_block_reduce_falls_back_where_the_lse_cannot_serve():
    probs = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    probs[0, 0, 0, 0] = 1.0
    probs[0, 0, 1, 2] = 1.0  # key 0 has probability 0: the log-sum-exp cannot serve this row
    probs[0, 0, 2, :2] = 0.5
    keep = torch.ones(1, 3, dtype=torch.bool)
    calls = []
    _assert_same(_reduce(probs, keep, scores=torch.log(probs), calls=calls), _spec(probs, keep), 1e-15)
    assert calls == [False]  # computed by the plain path
    scores, probs, keep = _logits_batch(7, [4, 4])
    scores[1, 0, 2, 1] = float("nan")
    probs = torch.softmax(scores, -1)
    got = _reduce(probs, keep, scores=scores)
    assert got["nonfinite"][1, 0].item() > 0
    _assert_same(got, _spec(probs, keep), 1e-12)


def test_block_reduce_counts_nonfinite_gtd_rows():
    """A NaN in a padded query row reaches every row of A @ A (0 * NaN) but no valid row's direct entropy:
    the compiled sums drop the non-finite rows as the plain path does."""
    scores, probs, keep = _logits_batch(5, [4, 3])
    probs = probs.clone()
    probs[1, 1, 3, 0] = float("nan")  # sequence 1 has 3 tokens: query row 3 is padding
    calls = []
    got = _reduce(probs, keep, scores=scores, calls=calls)
    assert calls == [True]
    assert got["nonfinite"][1, 1].item() == 3 and got["queries"][1, 1].item() == 0
    assert got["sink_weight"][1, 1].item() == 0 and got["sink_weight"][1, 0].item() == 3
    _assert_same(got, blocks.block_sums(probs, keep, scores=scores), 1e-12)
    _assert_same(got, _spec(probs, keep), 1e-12)


def test_off_is_the_plain_path():
    path = compiled.prepare("off", "cpu", torch.float32, 4, 16)
    assert path.name == "plain" and path.block_fn is blocks.block_sums


def test_failing_compiler_keeps_plain_path():
    def broken(fn):
        def call(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return call

    path = compiled.prepare("on", "cpu", torch.float32, 4, 16, compiler=broken)
    assert path.name == "plain" and path.block_fn is blocks.block_sums
    assert path.info["reason"] == "compiling failed (RuntimeError: no C++ compiler found)"


def test_disagreeing_compiler_keeps_plain_path():
    def wrong(fn):
        def call(*args):
            *sums, served = fn(*args)
            return (*(x * 1.01 for x in sums), served)
        return call

    path = compiled.prepare("on", "cpu", torch.float32, 4, 16, compiler=wrong)
    assert path.name == "plain" and "disagreed" in path.info["reason"]


def test_slower_compiled_path_is_not_chosen():
    def slow(fn):
        def call(*args):
            time.sleep(0.05)
            return fn(*args)
        return call

    path = compiled.prepare("on", "cpu", torch.float32, 4, 16, compiler=slow)
    assert path.name == "plain" and path.info["reason"] == "the compiled metrics were not faster on the check block"


def test_eager_stand_in_is_chosen_and_used_by_scan(tiny_bert, tmp_path, monkeypatch):
    """With a 'compiler' that returns the function itself, the fused columns serve the scan's unrefined layers."""
    calls = []

    def identity(fn):
        def call(*args):
            calls.append(args[0].shape)
            return fn(*args)
        return call

    real = compiled.prepare
    monkeypatch.setattr(compiled, "prepare", lambda *a, **k: real(*a, **k, compiler=identity))
    texts = ("a short sentence here", "another one, a little longer than the first", "three")
    off = scan(ScanConfig(model=str(tiny_bert), text=texts, patterns=0))
    with monkeypatch.context() as m:
        m.setattr(compiled, "_faster", lambda plain_s, fused_s: True)
        (tmp_path / "on").mkdir()
        on = scan(ScanConfig(model=str(tiny_bert), text=texts, patterns=0, compile="on"), out_dir=tmp_path / "on")
    assert on.meta["metrics_path"] == "compiled" and off.meta["metrics_path"] == "plain"
    assert len(calls) > 2  # the check block, the warm-up, and every layer of every batch
    cols = [c for c in on.heads.columns if on.heads[c].dtype.kind == "f"]
    assert ((on.heads[cols] - off.heads[cols]).abs().max().max()) < 1e-5
    written = json.loads((tmp_path / "on" / "run.json").read_text())
    assert written["metrics_path"] == "compiled" and written["compile"]["requested"] == "on"


@pytest.mark.slow
def test_torch_compile_agrees_with_plain_scan(tiny_bert):
    """The real torch.compile: where it is chosen, the heads equal the plain scan's to float32 rounding;
    where it is not (no compiler, slower here), run.json says why and the numbers are the plain ones."""
    texts = tuple(f"sentence number {i} with a few more words than before" * (1 + i % 3) for i in range(12))
    off = scan(ScanConfig(model=str(tiny_bert), text=texts, patterns=0))
    on = scan(ScanConfig(model=str(tiny_bert), text=texts, patterns=0, compile="on"))
    assert on.meta["compile"]["reason"]
    if on.meta["metrics_path"] == "compiled":
        assert on.meta["compile"]["max_rel_diff"] <= compiled.RTOL
    cols = [c for c in on.heads.columns if on.heads[c].dtype.kind == "f"]
    assert ((on.heads[cols] - off.heads[cols]).abs().max().max()) < 1e-5


def test_bad_compile_value_is_one_line(tiny_bert, in_tmp):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    result = CliRunner().invoke(app, ["scan", str(tiny_bert), "--text", "hello there", "--compile", "maybe",
                                      "--out", "run"])
    assert result.exit_code == 1
    assert "--compile must be on or off" in result.output and len(result.output.strip().splitlines()) <= 2
    assert not (in_tmp / "run").exists()
