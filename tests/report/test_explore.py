"""explore.html from Python: its CSP and escaping, and that its JSON blocks hold the Parquet values."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attnprobe.report import explore
from attnprobe.report.datatypes import flag_reasons, run_thresholds
from attnprobe.report.writer import load_run, write_report
from tests.report.test_writer import write_refine_run, write_scan_run

HOSTILE = "</script><img src=x onerror=alert(1)>"


class Page(HTMLParser):
    """The parts of a page the tests look at: script elements, every tag's attributes, the CSP."""

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.scripts: list[tuple[dict, str]] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.csp = None
        self._in: dict | None = None
        self._text: list[str] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        d = dict(attrs)
        self.attrs += [(tag, k, v) for k, v in attrs]
        if tag == "meta" and (d.get("http-equiv") or "").lower() == "content-security-policy":
            self.csp = d["content"]
        if tag == "script":
            self._in, self._text = d, []

    def handle_endtag(self, tag):
        if tag == "script" and self._in is not None:
            self.scripts.append((self._in, "".join(self._text)))
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            self._text.append(data)

    def block(self, block_id: str):
        for attrs, text in self.scripts:
            if attrs.get("id") == block_id:
                assert attrs.get("type") == "application/json"
                return json.loads(text)
        raise KeyError(block_id)


def write_kept(run: Path, n_layers: int, n_heads: int, tokens_per_example, seed: int = 0, stage=None,
               causal: bool = False) -> list:
    """patterns.parquet with random (or causal) patterns over the given token lists; returns the Patterns."""
    import torch

    from attnprobe.capture.patterns import Pattern
    from attnprobe.scanning.patterns import pattern_frame

    rng = np.random.default_rng(seed)
    kept = []
    for row, tokens in enumerate(tokens_per_example):
        n = len(tokens)
        probs = rng.dirichlet(np.ones(n) * 0.3, size=(n_layers, n_heads, n))
        if causal:
            probs = np.tril(probs)
            probs /= probs.sum(-1, keepdims=True)
        kept.append(Pattern(row=row * 5, tokens=list(tokens), probs=torch.from_numpy(probs.astype(np.float32)),
                            stage=stage))
    pattern_frame(kept).to_parquet(run / "patterns.parquet", index=False)
    return kept


def dequantize(b64: str, n: int) -> np.ndarray:
    q = np.frombuffer(base64.b64decode(b64), dtype=np.uint8).reshape(n, n)
    return (q / 255.0) ** 2


def explore_markup(*runs: Path, budget: int | None = None) -> str:
    """explore.html of run folders, without the figures of a whole report."""
    return explore.render([load_run(r) for r in runs], title="t", notes=[], generated="now", version="0",
                          budget=budget).markup


@pytest.fixture(scope="module")
def scan_page(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("explore")
    run = write_scan_run(tmp_path / "s", n_layers=3, n_heads=4, seed=4)
    write_kept(run, 3, 4, [["[CLS]", "a", HOSTILE, "b", "[SEP]", "c", "d", "[SEP]"],
                           ["[CLS]", *[f"w{i}" for i in range(7)], "[SEP]"]])
    result = write_report([run], fmt="html")
    return run, result, result.explore.read_text(encoding="utf-8")


def test_script_is_allowed_by_its_hash_only_and_nothing_is_fetched(scan_page):
    _, result, markup = scan_page
    assert result.explore == result.out_dir / "explore.html" and result.html.is_file()
    page = Page(markup)
    code = [text for attrs, text in page.scripts if attrs.get("type") != "application/json"]
    assert len(code) == 1
    digest = base64.b64encode(hashlib.sha256(code[0].encode("utf-8")).digest()).decode()
    policy = dict(part.strip().split(" ", 1) for part in page.csp.split(";"))
    assert policy["script-src"] == f"'sha256-{digest}'"
    assert policy["default-src"] == "'none'" and "unsafe-inline" not in policy["script-src"]
    assert code[0] == explore.asset("explore.js")
    assert not [a for a in page.attrs if a[1].lower().startswith("on")]
    assert not [a for a in page.attrs if a[1].lower() in ("src", "href", "action", "srcset", "poster")]
    assert not re.search(r"https?:|ftp:", markup, re.I)
    outside = re.sub(r'<script type="application/json"[^>]*>.*?</script>', "", markup, flags=re.S)
    assert "//" not in outside  # no protocol-relative URL in markup, style or script
    assert "@import" not in outside and "url(" not in outside


def test_hostile_token_stays_text(scan_page):
    _, _, markup = scan_page
    assert HOSTILE not in markup and "<img" not in markup
    page = Page(markup)
    data = page.block("explore-data")
    assert HOSTILE in data["runs"][0]["examples"][0]["tokens"]
    assert len([1 for attrs, _ in page.scripts]) == 3  # data, one patterns block, the script: none injected


def test_json_escaping_round_trips():
    tricky = {"t": "</script>\u2028\u2029&<!--", "n": 0.1 + 0.2}
    text = explore.json_block(tricky)
    assert not set("<>&\u2028\u2029") & set(text)
    assert json.loads(text) == tricky


def test_metrics_equal_the_parquet_files(scan_page):
    run, _, markup = scan_page
    data = Page(markup).block("explore-data")
    heads = pd.read_parquet(run / "heads.parquet").sort_values(["layer", "head"])
    layers = pd.read_parquet(run / "layers.parquet")
    table = data["sets"][0]["heads"]
    assert "gtd" in data["metrics"] and "sink_mass" in data["metrics"]
    for column in heads.columns:
        embedded = table[column]
        expected = heads[column].tolist()
        if heads[column].dtype.kind == "f":
            expected = [None if np.isnan(v) else v for v in expected]
        assert embedded == expected, column  # exact: same float64 values
    thresholds = run_thresholds(json.loads((run / "run.json").read_text()))
    assert table["reasons"] == [flag_reasons(rec, thresholds) for rec in heads.to_dict("records")]
    assert any(table["reasons"])
    flagged = heads.collapsed | heads.high_gtd | heads.sink | heads.diffuse
    assert table["flagged"] == flagged.tolist()
    for column in layers.columns:
        assert data["runs"][0]["layers"][column] == [None if v != v else v for v in layers[column].tolist()]


def test_patterns_are_within_quantization_error(scan_page):
    run, _, markup = scan_page
    page = Page(markup)
    data, block = page.block("explore-data"), page.block("explore-patterns-0")
    frame = pd.read_parquet(run / "patterns.parquet")
    n_heads = data["runs"][0]["shape"][1]
    checked = 0
    for info, ex in zip(data["runs"][0]["examples"], block["examples"]):
        rows = frame[frame.example == info["example"]]
        n = len(info["tokens"])
        assert info["causal"] is False
        for (layer, head), cells in rows.groupby(["layer", "head"]):
            w = cells.sort_values(["query", "key"])["weight"].to_numpy(np.float64).reshape(n, n)
            i = layer * n_heads + head
            shown = dequantize(ex["weight"][i], n)
            assert np.abs(np.sqrt(shown) - np.sqrt(w)).max() <= 0.5 / 255 + 1e-6
            safe = np.where(w > 0, w, 1)
            entropy = -(np.where(w > 0, w * np.log(safe), 0)).sum(-1)
            assert np.allclose(ex["entropy"][i], entropy, atol=1e-6)
            assert np.allclose(ex["entropy_norm"][i], entropy / np.log(n), atol=1e-6)
            assert np.allclose(ex["first"][i], w[:, 0], atol=1e-6)
            checked += 1
    assert checked == 2 * 3 * 4
    pair = data["runs"][0]["examples"][0]
    assert pair["split"] == 5 and data["runs"][0]["examples"][1]["split"] is None
    w = frame[(frame.example == 0) & (frame.layer == 1) & (frame["head"] == 2)].sort_values(["query", "key"])
    w = w["weight"].to_numpy(np.float64).reshape(8, 8)
    a, b = slice(0, 5), slice(5, 8)
    expected = [w[a, a].sum(1).mean(), w[a, b].sum(1).mean(), w[b, a].sum(1).mean(), w[b, b].sum(1).mean()]
    assert np.allclose(block["examples"][0]["segments"][1 * n_heads + 2], expected, atol=1e-6)
    assert block["examples"][1]["segments"][0] is None


def test_causal_patterns_are_detected_from_the_data(tmp_path):
    run = write_scan_run(tmp_path / "dec", n_layers=2, n_heads=2)
    write_kept(run, 2, 2, [["<s>", "a", "b", "c", "d"]], causal=True)
    page = Page(explore_markup(run))
    info = page.block("explore-data")["runs"][0]["examples"][0]
    ex = page.block("explore-patterns-0")["examples"][0]
    assert info["causal"] is True
    assert np.allclose(ex["entropy_norm"][0][1], ex["entropy"][0][1] / np.log(2))  # query 1 sees 2 keys
    assert ex["entropy_norm"][0][0] is None  # query 0 sees one key: not scored
    assert (np.triu(dequantize(ex["weight"][3], 5), 1) == 0).all()


def test_over_the_budget_only_flagged_and_extreme_heads_keep_patterns(tmp_path, monkeypatch):
    run = write_scan_run(tmp_path / "big", n_layers=3, n_heads=4, seed=4)
    write_kept(run, 3, 4, [["[CLS]", *[f"w{i}" for i in range(20)], "[SEP]"]])
    full = explore_markup(run)
    full_size = len(full.encode("utf-8"))
    assert Page(full).block("explore-data")["notice"] is None
    monkeypatch.setattr(explore, "BUDGET_BYTES", full_size - 1)
    result = write_report([run], out=tmp_path / "cut", fmt="html")
    markup = result.explore.read_text(encoding="utf-8")
    assert result.explore.stat().st_size < full_size
    page = Page(markup)
    data, block = page.block("explore-data"), page.block("explore-patterns-0")
    assert "flagged and most extreme heads only" in data["notice"]
    assert any("over the" in n for n in result.notes)
    loaded = load_run(run)
    important = {(int(r.layer), int(r.head)) for r in loaded.heads.itertuples() if r.flagged}
    important |= {(int(r.layer), int(r.head)) for r in loaded.extremes.itertuples()}
    assert 0 < len(important) < 12
    kept = {divmod(i, 4) for i, s in enumerate(block["examples"][0]["weight"]) if s is not None}
    assert kept == important
    assert data["sets"][0]["heads"]["gtd"] == loaded.heads.sort_values(["layer", "head"])["gtd"].tolist()


def test_refine_run_has_before_and_after_tables_and_two_runs_compare(tmp_path):
    scan = write_scan_run(tmp_path / "a", n_layers=2, n_heads=4)
    refine = write_refine_run(tmp_path / "b", n_layers=2, n_heads=4, epochs=2)
    write_kept(refine, 2, 4, [["[CLS]", "x", "y", "[SEP]"]], stage="after")
    page = Page(explore_markup(scan, refine))
    data = page.block("explore-data")
    labels = [s["label"] for s in data["sets"]]
    assert [s["stage"] for s in data["sets"]] == [None, "before", "after"]
    assert "before training (epoch 0)" in labels[1] and "after training (epoch 2)" in labels[2]
    diag = pd.read_parquet(refine / "diagnostics.parquet")
    for s, epoch in ((data["sets"][1], 0), (data["sets"][2], 2)):
        rows = diag[diag.epoch == epoch].sort_values(["layer", "head"])
        assert s["heads"]["gtd"] == rows["gtd"].tolist()
        assert s["heads"]["bp_shift"] == [None if v != v else v for v in rows["bp_shift"]]
    assert data["runs"][1]["examples"][0]["stage"] == "after"


def test_cli_report_and_show_write_explore_for_a_real_model(tmp_path, tiny_bert):
    from typer.testing import CliRunner

    import attnprobe
    from attnprobe.cli import app

    out = tmp_path / "scan"
    attnprobe.scan(str(tiny_bert), texts=["the cat sat on the mat today", "a dog ran far away from home"],
                   patterns=2, out=str(out))
    res = CliRunner().invoke(app, ["report", str(out), "--format", "html"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out / 'report' / 'explore.html'}" in res.output.replace("\n", "")
    page = Page((out / "report" / "explore.html").read_text(encoding="utf-8"))
    heads = pd.read_parquet(out / "heads.parquet").sort_values(["layer", "head"])
    assert page.block("explore-data")["sets"][0]["heads"]["gtd"] == heads["gtd"].tolist()
    assert len(page.block("explore-patterns-0")["examples"]) == 2

    res = CliRunner().invoke(app, ["show", str(tiny_bert), "--text", "a <b> test", "--pair", "another one",
                                   "--out", str(tmp_path / "show"), "--format", "html", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    shown = Page((tmp_path / "show" / "explore.html").read_text(encoding="utf-8"))
    info = shown.block("explore-data")["runs"][0]["examples"][0]
    assert info["split"] is not None and info["tokens"][info["split"] - 1] == "[SEP]"
    assert shown.block("explore-patterns-0")["examples"][0]["segments"][0] is not None
    assert html.unescape(shown.csp).count("sha256-") == 1
