"""--sample-queries: the multi-hop metrics from sampled query rows, unbiased and with standard errors that hold;
exact (to the bit) where no sequence has more rows than N; the notice before a scan whose multi-hop work would
dwarf the forward pass; --max-length honoured up to the model's own limit."""

from __future__ import annotations

import json

import pytest
import torch

import attnprobe
from attnprobe.formulas import blocks, metrics, sampling
from tests.tiny_encoders import SENTENCES

SEEDS = 600


def _attention(seed: int = 0, B: int = 2, H: int = 3, Q: int = 40, causal: bool = False):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, Q, Q, generator=gen, dtype=torch.float64) * 3
    keep = torch.ones(B, Q, dtype=torch.bool)
    keep[1, 30:] = False
    allowed = keep[:, None, :] & keep[:, :, None]
    if causal:
        allowed = allowed & torch.ones(Q, Q, dtype=torch.bool).tril()
    probs = scores.masked_fill(~allowed[:, None], -1e300).softmax(-1)
    return probs, keep, (allowed if causal else None)


@pytest.mark.parametrize("causal", [False, True])
def test_every_row_sampled_equals_the_exact_sums(causal):
    probs, keep, allowed = _attention(causal=causal)
    exact = blocks.block_sums(probs, keep) if allowed is None else blocks.masked_block_sums(probs, keep, allowed)
    full = sampling.sampled_block_sums(probs, keep, 64, allowed=allowed)
    for name in (*sampling.SAMPLED, "direct_entropy", "direct_entropy_norm", "first_mass", "sink_weighted", "queries"):
        assert torch.allclose(full[name], exact[name], atol=1e-12), name
    for name in sampling.SAMPLED:
        assert torch.equal(full[f"{name}_var"], torch.zeros_like(full[f"{name}_var"]))


@pytest.mark.parametrize("causal", [False, True])
def test_sampled_estimates_are_unbiased_with_honest_standard_errors(causal):
    """Over many seeds the mean estimate is within 3 standard errors of the exact sum, and the reported
    variance matches the spread of the estimates within 20 %."""
    probs, keep, allowed = _attention(causal=causal)
    exact = blocks.block_sums(probs, keep) if allowed is None else blocks.masked_block_sums(probs, keep, allowed)
    gen = torch.Generator().manual_seed(7)
    runs = [sampling.sampled_block_sums(probs, keep, 6, allowed=allowed, generator=gen) for _ in range(SEEDS)]
    for name in sampling.SAMPLED:
        est = torch.stack([r[name] for r in runs])  # (seeds, B, H)
        var = torch.stack([r[f"{name}_var"] for r in runs])
        spread = est.std(0)
        assert (var > 0).all()
        assert ((est.mean(0) - exact[name]).abs() <= 3 * spread / SEEDS ** 0.5).all(), name
        ratio = spread / var.mean(0).sqrt()
        assert ((ratio > 0.8) & (ratio < 1.2)).all(), (name, ratio)


def test_draws_are_uniform_without_replacement():
    ok = torch.tensor([[[True, False, True, True, True]]])
    counts = torch.zeros(5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4000):
        rows, taken = sampling.draw_rows(ok, 2, gen)
        assert taken.all() and rows[0, 0, 0] != rows[0, 0, 1]
        counts[rows.flatten()] += 1
    assert counts[1] == 0 and ((counts[[0, 2, 3, 4]] / 4000 - 0.5).abs() < 0.05).all()
    rows, taken = sampling.draw_rows(ok, 8, gen)  # more slots than rows: every ok row, the rest not taken
    assert sorted(rows[taken].tolist()) == [0, 2, 3, 4] and int(taken.sum()) == 4


def test_scan_with_n_at_least_the_rows_equals_the_exact_scan(tiny_bert):
    exact = attnprobe.scan(str(tiny_bert), texts=SENTENCES, patterns=0).heads
    sampled = attnprobe.scan(str(tiny_bert), texts=SENTENCES, patterns=0, sample_queries=128)
    assert sampled.meta["multi_hop"]["sample_queries"] == 128
    assert exact.equals(sampled.heads)
    assert (exact[["gtd_se", "indirect_entropy_se", "indirect_entropy_norm_se"]] == 0).all().all()


def test_sampled_scan_reports_standard_errors(tiny_bert, tmp_path):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["scan", str(tiny_bert), "--text", SENTENCES[0], "--text", SENTENCES[-1],
                                      "--sample-queries", "3", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sample_queries"] == 3 and summary["layers"][0]["gtd_se"] > 0
    import pandas as pd

    heads, layers = pd.read_parquet(out / "heads.parquet"), pd.read_parquet(out / "layers.parquet")
    assert (heads["gtd_se"] > 0).all() and (heads["queries"] > 0).all()
    for layer, group in heads.groupby("layer"):
        want = (group["gtd_se"] ** 2).sum() ** 0.5 / len(group)
        assert layers.loc[layers["layer"] == layer, "gtd_se"].item() == pytest.approx(want)
    printed = CliRunner().invoke(app, ["scan", str(tiny_bert), "--text", SENTENCES[0], "--sample-queries", "3",
                                       "--out", str(tmp_path / "r2")])
    assert "±" in printed.output


def test_bad_sample_queries_is_refused(tiny_bert, tmp_path):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    result = CliRunner().invoke(app, ["scan", str(tiny_bert), "--text", "a b", "--sample-queries", "1",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--sample-queries must be 2 or more" in result.output
    assert not (tmp_path / "x").exists()


def test_long_multi_hop_work_gets_a_notice(tiny_bert, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from attnprobe.cli import app
    from attnprobe.scanning import passes

    monkeypatch.setattr(passes, "NOTICE_RATIO", 0.01)
    result = CliRunner().invoke(app, ["scan", str(tiny_bert), "--text", SENTENCES[0], "--out", str(tmp_path / "n")])
    assert result.exit_code == 0 and "--sample-queries 32" in result.output
    quiet = CliRunner().invoke(app, ["scan", str(tiny_bert), "--text", SENTENCES[0], "--sample-queries", "4",
                                     "--out", str(tmp_path / "q")])
    assert "--sample-queries 32" not in quiet.output
    assert passes.multi_hop_ratio(4096, 6, 384) > 4 > passes.multi_hop_ratio(128, 12, 384)


def test_explicit_max_length_is_honoured_above_the_tokenizers_limit(tiny_bert, tmp_path):
    import shutil

    folder = tmp_path / "short-tokenizer"
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 8
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    text = " ".join(["word"] * 60)
    default = attnprobe.scan(str(folder), texts=[text], patterns=0)
    assert default.meta["data"]["max_length"] == 8
    longer = attnprobe.scan(str(folder), texts=[text], patterns=0, max_length=40)
    assert longer.meta["data"]["max_length"] == 40 and longer.heads["queries"].max() == 40
    capped = attnprobe.scan(str(folder), texts=[text], patterns=0, max_length=500)
    assert capped.meta["data"]["max_length"] == 128
    assert any("--max-length 500 lowered to 128" in n for n in capped.meta["notices"])


def test_masked_blocks_equal_the_unblocked_sums(monkeypatch):
    """The probe's blocks (sequences, or heads of one sequence) give the sums of one whole block."""
    from attnprobe.capture.probe import Probe

    probs, keep, allowed = _attention(causal=True, B=3, H=4, Q=24)
    keep[2] = True
    totals = []
    for limit in (1 << 20, 24 * 24):  # everything at once; one head at a time
        monkeypatch.setattr(blocks, "CHUNK_ELEMENTS", limit)
        probe = Probe(1, metric_dtype=torch.float64)
        probe.begin(keep)
        probe.observe(None, probs, allowed=torch.ones(24, 24, dtype=torch.bool).tril()[None])
        probe.end()
        totals.append(probe.totals())
    for name, value in totals[0].items():
        assert torch.allclose(totals[1][name], value, atol=1e-12, equal_nan=True), name
    assert float(totals[0]["unscored"][0, 0]) == 3  # each sequence's first row
    assert metrics.scored_rows(keep, allowed).sum() > 0


def test_report_of_a_sampled_run_says_so(tiny_bert, tmp_path):
    from attnprobe.report.writer import flagged_table, load_run, run_notes

    attnprobe.scan(str(tiny_bert), texts=SENTENCES, patterns=0, sample_queries=3, out=str(tmp_path / "s"))
    attnprobe.scan(str(tiny_bert), texts=SENTENCES, patterns=0, out=str(tmp_path / "e"))
    sampled, exact = load_run(tmp_path / "s"), load_run(tmp_path / "e")
    assert any("estimated from 3 sampled query rows" in n for n in run_notes(sampled))
    assert not any("sampled query rows" in n for n in run_notes(exact))
    assert "gtd_se" not in flagged_table(exact.heads, exact.thresholds).columns
    table = flagged_table(sampled.heads, sampled.thresholds)
    assert table.empty or "gtd_se" in table.columns
