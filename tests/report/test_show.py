"""attnprobe show: the attention drawn equals transformers' eager output_attentions, the metrics equal the
numpy reference, the page is self-contained, and the command works on tiny models and the bundled one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnprobe.cli import app
from attnprobe.config import ShowConfig
from tests import reference
from tests.conftest import TINY_KINDS, bundled_path, make_tiny_model
from tests.report.test_writer import assert_png_ok, embedded_pngs

TEXT = "The quick brown fox jumps over the lazy dog near the river bank."
PAIR = "A dog sleeps."
HOSTILE = "<script>alert(1)</script> & \"quotes\""
METRICS = ("direct_entropy", "direct_entropy_norm", "indirect_entropy", "indirect_entropy_norm", "gtd",
           "self_mass", "local_mass", "first_mass", "special_mass", "sink_mass")


def eager(folder: Path, text: str, pair: str | None = None):
    """(ids, (L, H, n, n) float64 attention) from a plain transformers eager model with output_attentions."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    enc = tok(text, pair, return_tensors="pt")
    model = AutoModel.from_pretrained(folder, attn_implementation="eager", local_files_only=True).eval()
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc and model.config.model_type in ("bert", "albert"):
        inputs["token_type_ids"] = enc["token_type_ids"]
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return enc["input_ids"][0].tolist(), np.stack([a[0].double().numpy() for a in out.attentions]), tok


def run_show(folder, **options):
    from attnprobe.report.show import show

    return show(ShowConfig(model=str(folder), device="cpu", **options), write=False)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_attention_and_metrics_match_references(tiny_models, kind):
    result = run_show(tiny_models[kind], text=TEXT, pair=PAIR if kind == "bert" else None)
    ids, attn, tok = eager(tiny_models[kind], TEXT, PAIR if kind == "bert" else None)
    assert result.tokens == tok.convert_ids_to_tokens(ids)
    np.testing.assert_allclose(result.pattern.probs.numpy(), attn, atol=2e-6)
    assert result.pattern.plain is None
    special = [i in set(tok.all_special_ids) for i in ids]
    L, H = attn.shape[:2]
    assert len(result.heads) == L * H
    for rec in result.heads.to_dict("records"):
        ref = reference.head_metrics(attn[rec["layer"], rec["head"]], hops=2, special=special)
        for name in METRICS:
            assert rec[name] == pytest.approx(ref[name], abs=1e-4), (kind, rec["layer"], rec["head"], name)
        assert rec["bp_shift"] is None or np.isnan(rec["bp_shift"])
        assert rec["queries"] == len(ids)


def test_saobp_model_draws_plain_and_refined(tmp_path):
    folder = make_tiny_model("bert", tmp_path / "refined", seed=3)
    config = json.loads((folder / "config.json").read_text())
    config["saobp"] = {"gamma": 0.9, "strength": 1.0, "layers": "all", "variant": "bp-high"}
    (folder / "config.json").write_text(json.dumps(config))
    result = run_show(folder, text=TEXT, layers=(1,), heads=(0, 2))
    _, plain, _ = eager(folder, TEXT)  # plain eager attention: transformers ignores the saobp settings
    np.testing.assert_allclose(result.pattern.plain.numpy(), plain, atol=2e-6)
    for layer in range(plain.shape[0]):
        for head in range(plain.shape[1]):
            refined = reference.saobp(np.log(plain[layer, head]), gamma=0.9)
            np.testing.assert_allclose(result.pattern.probs[layer, head].numpy(), refined, atol=2e-5)
            rec = result.heads[(result.heads["layer"] == layer) & (result.heads["head"] == head)].iloc[0]
            shift = 0.5 * np.abs(refined - plain[layer, head]).sum(-1).mean()
            assert rec["bp_shift"] == pytest.approx(shift, abs=1e-4)
            assert rec["gtd"] == pytest.approx(reference.head_metrics(refined)["gtd"], abs=1e-4)
    assert result.selected == [(1, 0), (1, 2)]
    assert [p.file for p in result.plots] == ["head-L1-H0.png", "head-L1-H2.png"]
    assert all("bp_shift" in p.title or p.hover for p in result.plots)


def test_cli_show_head_view_writes_png_and_page(tiny_bert, tmp_path):
    out = tmp_path / "show"
    res = CliRunner().invoke(app, ["show", str(tiny_bert), "--text", HOSTILE, "--pair", PAIR, "--layer", "1",
                                   "--head", "3", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["explore.html", "head-L1-H3.png", "show.html"]
    assert_png_ok(out / "head-L1-H3.png")
    page = (out / "show.html").read_text(encoding="utf-8")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Content-Security-Policy" in page
    for needle in ("http://", "https://", "<link", "url("):
        assert needle not in page.lower()
    assert len(embedded_pngs(page)) == 1
    titles = re.findall(r"<title>([^<]*)</title>", page)[1:]  # the first is the page's own
    n = len(run_show(tiny_bert, text=HOSTILE, pair=PAIR).tokens)
    assert len(titles) == n * n  # one hover value per (query, key)
    assert "Per-head metrics of this sentence" in page


def test_cli_show_model_view_on_bundled_model(tmp_path):
    out = tmp_path / "mv"
    res = CliRunner().invoke(app, ["show", "minilm-l6", "--text", TEXT, "--out", str(out), "--format", "png",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in out.iterdir()] == ["model-view.png"]
    assert_png_ok(out / "model-view.png")
    assert "heads flagged on this sentence" in res.output


def test_bundled_model_attention_matches_eager():
    result = run_show(bundled_path(), text=TEXT, layers=(0,), heads=(2,))
    _, attn, _ = eager(bundled_path(), TEXT)
    np.testing.assert_allclose(result.pattern.probs.numpy(), attn, atol=2e-6)


def test_long_text_is_cut_with_a_notice(tiny_bert):
    result = run_show(tiny_bert, text=TEXT, max_tokens=6)
    assert len(result.tokens) == 6 and result.pattern.probs.shape[-1] == 6
    assert any("show reads only the first 6" in n for n in result.notes)


@pytest.mark.parametrize("args, message", [
    (["--layer", "9"], "--layer 9 is out of range"),
    (["--head", "4"], "--head 4 is out of range"),
    (["--format", "pdf"], "unknown --format"),
])
def test_cli_show_errors(tiny_bert, tmp_path, args, message):
    res = CliRunner().invoke(app, ["show", str(tiny_bert), "--text", TEXT, "--out", str(tmp_path / "o"),
                                   "--device", "cpu", *args])
    assert res.exit_code == 1
    assert message in res.output
    assert not (tmp_path / "o").exists()


def test_cli_show_needs_text(tiny_bert):
    res = CliRunner().invoke(app, ["show", str(tiny_bert)])
    assert res.exit_code == 1
    assert "show needs --text" in res.output
