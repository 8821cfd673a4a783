"""scan --patterns: the golden structure of patterns.parquet, its rows against transformers' eager
output_attentions, the choice of examples, and flagged_heads in the --json summary."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from attnprobe.errors import AttnprobeError
from attnprobe.cli import app
from attnprobe.config import ScanConfig
from attnprobe.capture.patterns import PREFERRED, ExamplePicker
from attnprobe.scanning.patterns import COLUMNS
from attnprobe.data.batching import Encoded

TEXTS = [
    "Hi.",  # too short for the preferred range
    "The committee approved the new budget after a long debate on Tuesday.",
    "Rain.",
    "She walked to the station, bought a ticket and waited for the late train.",
    "Dogs bark.",
    "The museum opened a new wing for modern art, and thousands of visitors came on the first day.",
    "Stock prices rose sharply in early trading.",
    "A very long sentence " + "that keeps going and going " * 4 + "until it ends.",
]


def scan_patterns(folder, tmp_path, n=3):
    from attnprobe.scanning.scanner import scan

    out = tmp_path / "run"
    out.mkdir()
    result = scan(ScanConfig(model=str(folder), text=tuple(TEXTS), patterns=n, device="cpu"), out_dir=out)
    return result, out


def test_patterns_parquet_golden_structure(tiny_bert, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    result, out = scan_patterns(tiny_bert, tmp_path)
    df = pd.read_parquet(out / "patterns.parquet")
    assert list(df.columns) == list(COLUMNS)
    meta = json.loads((out / "run.json").read_text())
    kept = meta["patterns"]["examples"]
    assert len(kept) == 3 and kept == sorted(kept) and sorted(df.example.unique()) == kept
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModel.from_pretrained(tiny_bert, attn_implementation="eager").eval()
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    for row in kept:
        rows = df[df.example == row]
        enc = tok(TEXTS[row], return_tensors="pt")
        n = enc["input_ids"].shape[1]
        assert PREFERRED[0] <= n <= PREFERRED[1]
        assert len(rows) == L * H * n * n and (rows.tokens == n).all()
        sums = rows.groupby(["layer", "head", "query"]).weight.sum()
        assert len(sums) == L * H * n
        np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-5)
        with torch.no_grad():
            attn = model(**enc, output_attentions=True).attentions
        expected = np.stack([a[0].numpy() for a in attn])  # (L, H, n, n)
        got = rows.sort_values(["layer", "head", "query", "key"]).weight.to_numpy().reshape(L, H, n, n)
        np.testing.assert_allclose(got, expected, atol=2e-6)
        strings = tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
        assert rows.query_token.tolist() == [strings[q] for q in rows["query"]]
        assert rows.key_token.tolist() == [strings[k] for k in rows["key"]]
        assert rows.plain_weight.isna().all()
    # the scan's own numbers do not depend on --patterns
    from attnprobe.scanning.scanner import scan

    plain = scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS), patterns=0, device="cpu"))
    assert plain.patterns is None and "patterns" not in plain.meta
    pd.testing.assert_frame_equal(plain.heads, result.heads)


def encoded(lengths, start=0):
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return Encoded(ids=[[1] * lengths[i] for i in order], token_types=None, rows=[start + i for i in order])


def test_picker_spreads_over_the_length_distribution():
    picker = ExamplePicker(4)
    lengths = [10] * 10 + [20] * 10 + [30] * 10 + [40] * 5 + [3] * 5  # 30 rows in [8, 32]
    picker.add(encoded(lengths))
    chosen = picker.chosen()
    # quantiles 0.125, 0.375, 0.625, 0.875 of 30 rows -> lengths 10, 20, 20, 30; first rows of each length
    assert [(row, len(ids)) for row, ids, _ in chosen] == [(0, 10), (10, 20), (11, 20), (20, 30)]


def test_picker_falls_back_to_the_nearest_rows():
    picker = ExamplePicker(4)
    picker.add(encoded([12, 3, 50, 70, 5, 40]))
    # one row in range (12), then the nearest: 5 (3 short), 40 (8 long), 3 (5 short); 70 > MAX_TOKENS never
    assert sorted(len(ids) for _, ids, _ in picker.chosen()) == [3, 5, 12, 40]


def test_picker_merge_equals_one_pass():
    lengths = [9, 15, 22, 31, 8, 16, 30, 12, 25, 18]
    whole = ExamplePicker(3)
    whole.add(encoded(lengths))
    a, b = ExamplePicker(3), ExamplePicker(3)
    a.add(encoded(lengths[:5]))
    b.add(encoded(lengths[5:], start=5))
    a.merge(b)
    assert a.chosen() == whole.chosen()


def test_patterns_option_bounds():
    with pytest.raises(AttnprobeError, match="--patterns must be 0"):
        ScanConfig(patterns=65).validate()
    with pytest.raises(AttnprobeError, match="--patterns must be 0"):
        ScanConfig(patterns=-1).validate()


def test_json_summary_lists_flagged_heads(tiny_bert, tmp_path):
    out = tmp_path / "j"
    res = CliRunner().invoke(app, ["scan", str(tiny_bert), "--text", TEXTS[1], "--text", TEXTS[3], "--out", str(out),
                                   "--json", "--device", "cpu", "--sink", "0.2", "--patterns", "0"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    heads = pd.read_parquet(out / "heads.parquet")
    names = ("entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse")
    expected = [{"layer": int(r["layer"]), "head": int(r["head"]), "flags": [n for n in names if r[n]]}
                for r in heads.to_dict("records") if any(r[n] for n in names)]
    assert expected and summary["flagged_heads"] == expected
    assert not (out / "patterns.parquet").exists()


def test_table_summary_lists_flagged_heads_with_reasons(tiny_bert, tmp_path):
    out = tmp_path / "t"
    res = CliRunner().invoke(app, ["scan", str(tiny_bert), "--text", TEXTS[1], "--out", str(out), "--device", "cpu",
                                   "--sink", "0.2", "--patterns", "1"])
    assert res.exit_code == 0, res.output
    heads = pd.read_parquet(out / "heads.parquet")
    for r in heads[heads["sink"]].to_dict("records"):
        assert f"layer {r['layer']} head {r['head']}: " in res.stdout
        assert f"sink (sink mass {r['sink_mass']:.3f} > 0.2)" in res.stdout
    assert "patterns.parquet" in res.stdout and (out / "patterns.parquet").is_file()
