"""Tests of attnprobe.report (with figures.py and htmlpage.py) on fake run folders built with pandas."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attnprobe.errors import AttnprobeError
from attnprobe.report.writer import find_latest_run, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert(1)</script>"


# --- fake run folders -------------------------------------------------------------------------------

def fake_heads(rng: np.random.Generator, n_layers: int, n_heads: int, bp_shift: bool = False) -> pd.DataFrame:
    """Random but plausible heads.parquet rows, flagged with the default thresholds."""
    layer, head = np.divmod(np.arange(n_layers * n_heads), n_heads)
    depth = layer / max(1, n_layers - 1)
    h_dir = np.clip(0.9 - 0.7 * depth + rng.normal(0, 0.12, layer.size), 0.01, 0.99)
    h_ind = np.clip(h_dir + rng.uniform(0.02, 0.15, layer.size), 0.0, 1.0)
    gtd = np.clip(rng.uniform(0.0, 0.7, layer.size), 0.0, 1.0)
    sink = rng.uniform(0.1, 0.7, layer.size)
    df = pd.DataFrame({
        "layer": layer, "head": head, "queries": rng.integers(100, 1000, layer.size),
        "direct_entropy": h_dir * np.log(20), "direct_entropy_norm": h_dir,
        "indirect_entropy": h_ind * np.log(20), "indirect_entropy_norm": h_ind, "gtd": gtd,
        "self_mass": rng.uniform(0, 0.3, layer.size), "local_mass": rng.uniform(0, 0.3, layer.size),
        "first_mass": rng.uniform(0, 0.5, layer.size), "special_mass": rng.uniform(0, 0.6, layer.size),
        "sink_mass": sink,
        "bp_shift": rng.uniform(0, 0.1, layer.size) if bp_shift else np.full(layer.size, np.nan),
        "nonfinite": np.zeros(layer.size, dtype=int),
    })
    df["entropy_collapse"] = df.direct_entropy_norm < 0.15
    df["low_gtd"] = df.gtd < 0.05
    df["high_gtd"] = df.gtd > 0.60
    df["sink"] = df.sink_mass > 0.5
    df["diffuse"] = df.direct_entropy_norm > 0.95
    df["collapsed"] = df.entropy_collapse | df.low_gtd
    df["nonfinite_flag"] = df.nonfinite > 0
    return df


def fake_layers(heads: pd.DataFrame) -> pd.DataFrame:
    metrics = [c for c in heads.select_dtypes("number").columns if c not in ("layer", "head", "queries", "epoch")]
    layers = heads.groupby("layer")[metrics].mean().reset_index()
    layers["heads"] = heads.groupby("layer").size().to_numpy()
    flagged = heads.collapsed | heads.high_gtd | heads.sink | heads.diffuse
    layers["flagged_heads"] = flagged.groupby(heads.layer).sum().to_numpy()
    return layers


def model_meta(name: str, n_layers: int, n_heads: int) -> dict:
    return {"name": name, "architecture": "BertModel", "layers": n_layers, "heads": n_heads,
            "revision": "sha256:abc"}


def write_scan_run(path: Path, n_layers: int = 4, n_heads: int = 6, seed: int = 0, model: str = "tiny-bert",
                   options: dict | None = None, complete: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    heads = fake_heads(rng, n_layers, n_heads)
    heads.to_parquet(path / "heads.parquet", index=False)
    fake_layers(heads).to_parquet(path / "layers.parquet", index=False)
    meta = {
        "kind": "scan", "complete": complete, "model": model_meta(model, n_layers, n_heads),
        "data": {"path": "sample.txt", "rows_read": 64, "rows_skipped": {"too short": 1}, "sha256": "00ff"},
        "options": {"hops": 2, "batch_size": 8, "max_length": 128, "lr": 5e-5, **(options or {})},
        "thresholds": {"entropy_collapse": 0.15, "low_gtd": 0.05, "high_gtd": 0.6, "sink": 0.5, "diffuse": 0.95},
        "attnprobe_version": "0.1.0", "torch_version": "2.5.0", "transformers_version": "5.0.0",
        "wall_time_s": 1.25, "seed": 0,
    }
    (path / "run.json").write_text(json.dumps(meta))
    return path


def write_refine_run(path: Path, n_layers: int = 2, n_heads: int = 4, epochs: int = 3, variant: str = "bp-high",
                     seed: int = 1, model: str = "tiny-bert") -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    frames = []
    for epoch in range(epochs + 1):
        heads = fake_heads(rng, n_layers, n_heads, bp_shift=variant != "baseline" and epoch > 0)
        heads["epoch"] = epoch
        heads["variant"] = variant
        frames.append(heads)
    pd.concat(frames, ignore_index=True).to_parquet(path / "diagnostics.parquet", index=False)
    rows = []
    for step, epoch in enumerate(np.arange(0.5, epochs + 0.01, 0.5), start=1):
        rows.append({"epoch": float(epoch), "step": step * 10, "train_loss": 0.7 / epoch, "eval_loss": np.nan,
                     "accuracy": np.nan, "f1": np.nan, "mcc": np.nan})
        if float(epoch).is_integer():
            rows.append({"epoch": float(epoch), "step": step * 10, "train_loss": np.nan, "eval_loss": 0.6 / epoch,
                         "accuracy": 0.6 + 0.1 * epoch / epochs, "f1": 0.55 + 0.1 * epoch / epochs,
                         "mcc": 0.2 + 0.2 * epoch / epochs})
    pd.DataFrame(rows).to_parquet(path / "history.parquet", index=False)
    meta = {
        "kind": "refine", "complete": True, "variant": variant, "model": model_meta(model, n_layers, n_heads),
        "data": {"train": "train.tsv", "eval": "dev.tsv"}, "options": {"epochs": epochs, "gamma": 0.9},
        "final": {"accuracy": 0.7, "f1": 0.65, "mcc": 0.4, "eval_loss": 0.2}, "attnprobe_version": "0.1.0",
        "wall_time_s": 30.5,
    }
    (path / "run.json").write_text(json.dumps(meta))
    return path


def assert_png_ok(path_or_bytes) -> None:
    """A PNG file that decodes and is not one flat colour."""
    from matplotlib.image import imread

    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    pixels = imread(BytesIO(data), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels[..., :3].std() > 0.01


def embedded_pngs(page: str) -> list[bytes]:
    import base64

    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


# --- happy paths ------------------------------------------------------------------------------------

def test_scan_run_writes_html_and_pngs(tmp_path):
    run = write_scan_run(tmp_path / "scan-a")
    result = write_report([run])
    assert result.out_dir == run / "report"
    assert result.html == run / "report" / "report.html"
    assert sorted(p.name for p in result.pngs) == ["scan-a-heatmaps.png", "scan-a-layers.png"]
    for png in result.pngs:
        assert png.is_file()
        assert_png_ok(png)
    page = result.html.read_text(encoding="utf-8")
    assert len(embedded_pngs(page)) == 2
    for section in ("Run metadata", "Summary per layer", "Figures", "Flagged heads"):
        assert section in page
    # no temporary files left behind
    assert not [p for p in result.out_dir.iterdir() if p.name.startswith(".")]


def test_refine_run_writes_training_figure(tmp_path):
    run = write_refine_run(tmp_path / "refine-b", epochs=3)
    result = write_report([run])
    names = sorted(p.name for p in result.pngs)
    assert names == ["refine-b-heatmaps.png", "refine-b-layers.png", "refine-b-training.png"]
    for png in result.pngs:
        assert_png_ok(png)
    page = result.html.read_text(encoding="utf-8")
    assert "refine-b (bp-high)" in page
    assert "After epoch 3, from diagnostics.parquet" in page
    assert not any("bp_shift is null" in n for n in result.notes)


def test_refine_run_uses_last_epoch_and_computes_layer_means(tmp_path):
    from attnprobe.report.writer import load_run

    run = load_run(write_refine_run(tmp_path / "r", n_layers=3, n_heads=5, epochs=2))
    diagnostics = pd.read_parquet(tmp_path / "r" / "diagnostics.parquet")
    last = diagnostics[diagnostics.epoch == 2].reset_index(drop=True)
    assert len(run.heads) == 15 and run.shape == (3, 5)
    np.testing.assert_allclose(run.heads.gtd.to_numpy(), last.gtd.to_numpy())
    expected = fake_layers(last)
    for column in ("direct_entropy_norm", "indirect_entropy_norm", "gtd", "bp_shift", "heads", "flagged_heads"):
        np.testing.assert_allclose(run.layers[column].to_numpy(float), expected[column].to_numpy(float))
    assert sorted(run.epoch_layers) == [0.0, 1.0, 2.0]
    assert run.epoch_layers[0.0]["bp_shift"].isna().all()


def test_nonfinite_heads_get_a_note(tmp_path):
    run = write_scan_run(tmp_path / "nan")
    heads = pd.read_parquet(run / "heads.parquet")
    heads.loc[0, ["nonfinite", "nonfinite_flag", "diffuse"]] = [3, True, True]
    heads.to_parquet(run / "heads.parquet", index=False)
    result = write_report([run], fmt="html")
    assert any("NaN/Inf" in n for n in result.notes)
    assert "non-finite attention (3 rows with NaN/Inf)" in result.html.read_text(encoding="utf-8")


def test_baseline_refine_notes_missing_bp_shift(tmp_path):
    run = write_refine_run(tmp_path / "base", variant="baseline")
    result = write_report([run], fmt="png")
    assert any("bp_shift is null" in n for n in result.notes)
    assert result.html is None


def test_comparison_of_two_runs(tmp_path):
    a = write_scan_run(tmp_path / "run-a", n_layers=3, n_heads=4, seed=1)
    b = write_refine_run(tmp_path / "run-b", n_layers=3, n_heads=4, seed=2)
    result = write_report([a, b], out=tmp_path / "cmp")
    assert result.out_dir == tmp_path / "cmp"
    names = {p.name for p in result.pngs}
    assert {"compare-layers.png", "compare-diff-run-b.png", "run-a-heatmaps.png", "run-b-training.png"} <= names
    for png in result.pngs:
        assert_png_ok(png)
    page = result.html.read_text(encoding="utf-8")
    assert "Runs compared" in page
    for header in ("run", "model", "variant", "accuracy", "mean GTD", "mean normalized direct entropy",
                   "flagged heads"):
        assert f"<th>{header}</th>" in page
    assert "0.700" in page  # the refine run's final accuracy
    assert not any("shape" in n for n in result.notes)


def test_comparison_default_out_is_a_new_compare_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = write_scan_run(Path("attnprobe-runs") / "scan-1", seed=1)
    b = write_scan_run(Path("attnprobe-runs") / "scan-2", seed=2)
    result = write_report([a, b], fmt="html")
    assert result.out_dir.parent == Path("attnprobe-runs")
    assert result.out_dir.name.startswith("compare-")
    assert result.html.is_file() and result.pngs == []
    assert not list(result.out_dir.glob("*.png"))


def test_png_only_writes_no_html(tmp_path):
    result = write_report([write_scan_run(tmp_path / "s")], out=tmp_path / "o", fmt="png")
    assert result.html is None and not (tmp_path / "o" / "report.html").exists()
    assert len(result.pngs) == 2


def test_mismatched_shapes_skip_diff_with_note(tmp_path):
    a = write_scan_run(tmp_path / "big", n_layers=6, n_heads=12, model="model-a")
    b = write_scan_run(tmp_path / "small", n_layers=2, n_heads=4, model="model-b")
    result = write_report([a, b], out=tmp_path / "cmp")
    names = {p.name for p in result.pngs}
    assert "compare-layers.png" in names
    assert not any(n.startswith("compare-diff") for n in names)
    assert any("shape" in n and "per-head differences" in n for n in result.notes)
    assert "per-head differences" in result.html.read_text(encoding="utf-8")


def test_same_shape_different_models_note(tmp_path):
    a = write_scan_run(tmp_path / "a", model="model-a")
    b = write_scan_run(tmp_path / "b", model="model-b", seed=3)
    result = write_report([a, b], out=tmp_path / "cmp", fmt="png")
    assert (tmp_path / "cmp" / "compare-diff-b.png").is_file()
    assert any("different models" in n for n in result.notes)


def test_duplicate_run_names_are_made_unique(tmp_path):
    a = write_scan_run(tmp_path / "x" / "run", seed=1)
    b = write_scan_run(tmp_path / "y" / "run", seed=2)
    result = write_report([a, b], out=tmp_path / "cmp", fmt="png")
    names = {p.name for p in result.pngs}
    assert {"run-heatmaps.png", "run-2-heatmaps.png", "compare-diff-run-2.png"} <= names


def test_run_names_are_sanitised_in_file_names(tmp_path):
    run = write_scan_run(tmp_path / "my run (ä)")
    result = write_report([run], fmt="png")
    for png in result.pngs:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", png.name), png.name


def test_flagged_heads_table_lists_reasons(tmp_path):
    run = write_scan_run(tmp_path / "s", n_layers=2, n_heads=2)
    heads = pd.read_parquet(run / "heads.parquet")
    heads.loc[0, ["gtd", "low_gtd", "collapsed"]] = [0.01, True, True]
    heads.loc[3, ["sink_mass", "sink"]] = [0.9, True]
    heads.loc[[1, 2], ["high_gtd", "sink", "diffuse", "entropy_collapse", "low_gtd", "collapsed"]] = False
    heads.to_parquet(run / "heads.parquet", index=False)
    page = write_report([run], fmt="html").html.read_text(encoding="utf-8")
    assert "low GTD (0.010 &lt; 0.05)" in page
    assert "sink (sink mass 0.900 &gt; 0.5)" in page
    assert "Flagged heads (2 of 4)" in page


# --- the HTML page: self-contained and escaped ------------------------------------------------------

def test_html_has_no_external_references(tmp_path):
    a = write_scan_run(tmp_path / "a")
    b = write_refine_run(tmp_path / "b")
    page = write_report([a, b], out=tmp_path / "cmp", fmt="html").html.read_text(encoding="utf-8")
    for needle in ("http://", "https://", 'src="//', "<script", "<link", "@import", "url("):
        assert needle not in page.lower()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert all(h.startswith("#") for h in hrefs)
    for png in embedded_pngs(page):
        assert_png_ok(png)


def test_html_escapes_hostile_strings(tmp_path):
    run = write_scan_run(tmp_path / "evil", model=HOSTILE, options={"text_column": HOSTILE, HOSTILE: "x"})
    meta = json.loads((run / "run.json").read_text())
    meta["variant"] = '"><img src=x onerror=alert(1)>'
    (run / "run.json").write_text(json.dumps(meta))
    result = write_report([run])
    page = result.html.read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("&lt;script&gt;") >= 3  # model name, option value, option key
    for png in result.pngs:  # the hostile strings (with '$'-free text) do not break the figures
        assert_png_ok(png)


def test_mathtext_in_names_does_not_break_figures(tmp_path):
    run = write_scan_run(tmp_path / "m")
    meta = json.loads((run / "run.json").read_text())
    meta.update(kind="scan", variant="$\\frac{1}{$")
    (run / "run.json").write_text(json.dumps(meta))
    result = write_report([run], fmt="png")
    assert len(result.pngs) == 2


# --- errors and nothing half-written ----------------------------------------------------------------

def test_not_a_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttnprobeError, match="no run.json"):
        write_report([tmp_path / "empty"])
    with pytest.raises(AttnprobeError, match="not a folder"):
        write_report([tmp_path / "missing"])


def test_incomplete_run(tmp_path):
    run = write_scan_run(tmp_path / "half", complete=False)
    with pytest.raises(AttnprobeError, match="incomplete run"):
        write_report([run])
    assert not (run / "report").exists()


def test_corrupt_heads_parquet(tmp_path):
    run = write_scan_run(tmp_path / "bad")
    (run / "heads.parquet").write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(AttnprobeError, match=r"heads\.parquet is missing or not readable Parquet .*rerun the scan"):
        write_report([run])


def test_missing_layers_parquet(tmp_path):
    run = write_scan_run(tmp_path / "nolayers")
    (run / "layers.parquet").unlink()
    with pytest.raises(AttnprobeError, match=r"layers\.parquet is missing or not readable Parquet"):
        write_report([run])


def test_corrupt_refine_diagnostics(tmp_path):
    run = write_refine_run(tmp_path / "r")
    (run / "diagnostics.parquet").write_bytes(b"PAR1garbagePAR1")
    with pytest.raises(AttnprobeError, match=r"diagnostics\.parquet is missing or not readable Parquet .*refine"):
        write_report([run])


def test_heads_without_required_columns(tmp_path):
    run = write_scan_run(tmp_path / "cols")
    pd.read_parquet(run / "heads.parquet").drop(columns=["gtd"]).to_parquet(run / "heads.parquet")
    with pytest.raises(AttnprobeError, match="lacks the column"):
        write_report([run])


def test_unknown_format(tmp_path):
    with pytest.raises(AttnprobeError, match="unknown --format"):
        write_report([write_scan_run(tmp_path / "s")], fmt="pdf")


def test_failure_leaves_nothing_half_written(tmp_path):
    good = write_scan_run(tmp_path / "good")
    bad = write_scan_run(tmp_path / "bad")
    (bad / "heads.parquet").write_bytes(b"\x00" * 64)
    out = tmp_path / "cmp"
    with pytest.raises(AttnprobeError, match="bad"):
        write_report([good, bad], out=out)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(AttnprobeError):
        write_report([good, bad], out=out)
    assert not (out / "report.html").exists()
    assert list(out.iterdir()) == []


def test_out_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(AttnprobeError, match="is a file"):
        write_report([write_scan_run(tmp_path / "s")], out=tmp_path / "file")


# --- finding the newest run -------------------------------------------------------------------------

def test_find_latest_run_picks_newest_complete(tmp_path):
    base = tmp_path / "attnprobe-runs"
    old = write_scan_run(base / "scan-old")
    new = write_refine_run(base / "refine-new")
    newest_but_incomplete = write_scan_run(base / "scan-broken", complete=False)
    (base / "compare-x").mkdir()
    os.utime(old / "run.json", (1_000_000, 1_000_000))
    os.utime(new / "run.json", (2_000_000, 2_000_000))
    os.utime(newest_but_incomplete / "run.json", (3_000_000, 3_000_000))
    assert find_latest_run(base) == new


def test_find_latest_run_none(tmp_path):
    with pytest.raises(AttnprobeError, match="no finished runs"):
        find_latest_run(tmp_path / "nothing")
    (tmp_path / "runs").mkdir()
    with pytest.raises(AttnprobeError, match="no finished runs"):
        find_latest_run(tmp_path / "runs")


def test_report_without_runs_uses_latest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = write_scan_run(Path("attnprobe-runs") / "scan-old")
    new = write_scan_run(Path("attnprobe-runs") / "scan-new", seed=5)
    os.utime(old / "run.json", (1_000_000, 1_000_000))
    os.utime(new / "run.json", (2_000_000, 2_000_000))
    result = write_report([])
    assert result.out_dir == new / "report"
    assert any("newest finished run" in n and "scan-new" in n for n in result.notes)


def test_report_without_any_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AttnprobeError, match="no finished runs"):
        write_report([])


# --- figure sizes across the supported grid range ---------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 2), (8, 16), (24, 16), (24, 2), (2, 16)])
def test_heatmaps_render_for_small_and_large_grids(shape):
    from attnprobe.report import heatmaps

    heads = fake_heads(np.random.default_rng(0), *shape)
    heads["flagged"] = heads.collapsed | heads.high_gtd | heads.sink | heads.diffuse
    png = heatmaps.heatmaps(heads, shape, "grid")
    assert_png_ok(png)
    other = heads.assign(gtd=heads.gtd * 0.5)
    assert_png_ok(heatmaps.diff_heatmaps(heads, other, shape, "a", "b"))


# --- the page in a real browser ---------------------------------------------------------------------

@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI; .ci/run must install Debian's chromium")
        pytest.skip("chromium not installed; CI installs Debian's chromium (apt-get install chromium) to run this test")
    a = write_scan_run(tmp_path / "a", n_layers=6, n_heads=12)
    b = write_refine_run(tmp_path / "b", n_layers=6, n_heads=12)
    page = write_report([a, b], out=tmp_path / "cmp", fmt="html").html
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
         page.resolve().as_uri()],
        check=False, capture_output=True, timeout=60,
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    from matplotlib.image import imread

    pixels = imread(BytesIO(shot.read_bytes()), format="png")[..., :3]
    assert pixels.std() > 0.01
    assert (pixels < 0.95).any()  # not all white


# --- flagged heads explained: thumbnails, extremes, flag legend, hover values -------------------------

def write_patterns(run: Path, n_layers: int, n_heads: int, examples=(3, 7), seed: int = 0) -> None:
    import torch

    from attnprobe.capture.patterns import Pattern
    from attnprobe.scanning.patterns import pattern_frame

    rng = np.random.default_rng(seed)
    kept = []
    for i, row in enumerate(examples):
        n = 6 + 3 * i
        probs = torch.from_numpy(rng.dirichlet(np.ones(n) * 0.3, size=(n_layers, n_heads, n)).astype(np.float32))
        kept.append(Pattern(row=row, tokens=["[CLS]", *[f"w{k}" for k in range(n - 2)], "[SEP]"], probs=probs))
    pattern_frame(kept).to_parquet(run / "patterns.parquet", index=False)


def html_table(page: str, css: str) -> list[list[str]]:
    """The cells (text, tags stripped) of each data row of the table with class ``css``."""
    import html as html_mod

    body = re.search(rf'<table class="{css}">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]
    return [[html_mod.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)]
            for r in rows]


def expected_reasons(rec: dict) -> list[str]:
    out = []
    if rec["entropy_collapse"]:
        out.append(f"entropy collapse (normalized direct entropy {rec['direct_entropy_norm']:.3f} < 0.15)")
    if rec["low_gtd"]:
        out.append(f"low GTD ({rec['gtd']:.3f} < 0.05)")
    if rec["high_gtd"]:
        out.append(f"high GTD ({rec['gtd']:.3f} > 0.6)")
    if rec["sink"]:
        out.append(f"sink (sink mass {rec['sink_mass']:.3f} > 0.5)")
    if rec["diffuse"]:
        out.append(f"diffuse (normalized direct entropy {rec['direct_entropy_norm']:.3f} > 0.95)")
    return out


def test_flagged_section_lists_exactly_the_flagged_heads_with_thumbnails(tmp_path):
    run = write_scan_run(tmp_path / "s", n_layers=3, n_heads=4, seed=4)
    write_patterns(run, 3, 4)
    heads = pd.read_parquet(run / "heads.parquet")
    result = write_report([run])
    page = result.html.read_text(encoding="utf-8")
    flagged = heads[heads.collapsed | heads.high_gtd | heads.sink | heads.diffuse]
    assert len(flagged) > 0
    rows = html_table(page, "flagged")
    assert [(int(r[0]), int(r[1])) for r in rows] == list(zip(flagged.layer, flagged["head"]))
    for cells, rec in zip(rows, flagged.to_dict("records")):
        assert cells[-2] == "; ".join(expected_reasons(rec))
    thumbs = re.findall(r'<td class="thumb"><div class="hov"><img alt="layer (\d+), head (\d+)"', page)
    extremes = html_table(page, "extremes")
    wanted = {(int(r[0]), int(r[1])) for r in rows} | {(int(r[1]), int(r[2])) for r in extremes}
    assert {(int(a), int(b)) for a, b in thumbs} == wanted
    names = {p.name for p in result.pngs}
    assert {f"s-head-L{layer}-H{head}.png" for layer, head in wanted} <= names
    for png in result.pngs:
        assert_png_ok(png)
    assert not any("no attention patterns" in n for n in result.notes)


def test_extreme_heads_are_shown_when_nothing_is_flagged(tmp_path):
    run = write_scan_run(tmp_path / "calm", n_layers=2, n_heads=3)
    heads = pd.read_parquet(run / "heads.parquet")
    for flag in ("entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse", "collapsed"):
        heads[flag] = False
    heads.to_parquet(run / "heads.parquet", index=False)
    write_patterns(run, 2, 3)
    page = write_report([run], fmt="html").html.read_text(encoding="utf-8")
    assert "No head is flagged." in page
    extremes = html_table(page, "extremes")
    top = heads.sort_values("gtd").iloc[-1]
    assert extremes[0][:3] == ["highest GTD", str(int(top.layer)), str(int(top["head"]))]
    assert len(re.findall(r'<td class="thumb"><div class="hov"><img', page)) == len(extremes)


def test_report_without_patterns_says_so(tmp_path):
    result = write_report([write_scan_run(tmp_path / "old")], fmt="html")
    assert any("no attention patterns" in n for n in result.notes)


def test_heatmap_cells_have_hover_values(tmp_path):
    run = write_scan_run(tmp_path / "h", n_layers=2, n_heads=3)
    heads = pd.read_parquet(run / "heads.parquet")
    page = write_report([run], fmt="html").html.read_text(encoding="utf-8")
    titles = re.findall(r"<rect [^>]*><title>([^<]*)</title></rect>", page)
    assert len(titles) == 3 * len(heads)  # GTD, direct and indirect entropy panels
    first = heads.iloc[0]
    assert f"layer 0, head 0: GTD {first.gtd:.4f}" in titles[0]


@pytest.mark.browser
def test_pages_make_no_request_in_headless_chromium(tmp_path, tiny_bert):
    """The report (with thumbnails) and a show page render, and the browser's network log holds only the
    page itself and its data: images."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI; .ci/run must install Debian's chromium")
        pytest.skip("chromium not installed; CI installs Debian's chromium (apt-get install chromium)")
    from attnprobe.config import ShowConfig
    from attnprobe.report.show import show

    run = write_scan_run(tmp_path / "a", n_layers=3, n_heads=4)
    write_patterns(run, 3, 4)
    control = tmp_path / "control.html"  # proves the check sees a request a page makes
    control.write_text('<html><body><img src="http://127.0.0.1:9/x.png">control</body></html>')
    pages = [control, write_report([run], fmt="html").html,
             show(ShowConfig(model=str(tiny_bert), text="a <b>bold</b> test", layers=(0,), heads=(1,),
                             out=str(tmp_path / "show"), format="html", device="cpu")).html]
    for i, page in enumerate(pages):
        shot, log = tmp_path / f"shot{i}.png", tmp_path / f"net{i}.json"
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / f'profile{i}'}", f"--log-net-log={log}", f"--screenshot={shot}",
             "--window-size=1280,1600", page.resolve().as_uri()],
            check=False, capture_output=True, timeout=90,
        )
        assert shot.is_file(), "chromium wrote no screenshot"
        from matplotlib.image import imread

        pixels = imread(BytesIO(shot.read_bytes()), format="png")[..., :3]
        assert page == control or pixels.std() > 0.01
        leaving = page_requests(log)
        if page == control:
            assert leaving == {"http://127.0.0.1:9/x.png"}
        else:
            assert not leaving, leaving


def page_requests(net_log: Path) -> set[str]:
    """URLs the page itself asked the network stack for: requests whose initiator is the page's (opaque
    file://) origin. Chromium's own background requests carry the initiator "not an origin"."""
    urls = set()
    for line in net_log.read_text(encoding="utf-8", errors="replace").splitlines():  # one event per line
        try:
            entry = json.loads(line.strip().rstrip(",")).get("params", {})
        except (json.JSONDecodeError, AttributeError):
            continue
        initiator = str(entry.get("initiator", ""))
        if "url" in entry and (initiator == "null" or initiator.startswith("file")):
            urls.add(entry["url"])
    return urls


def test_diagnostics_over_steps_get_their_own_figure(tmp_path):
    from attnprobe.report.writer import load_run

    path = write_refine_run(tmp_path / "steps", n_layers=3, n_heads=4, epochs=3)
    diagnostics = pd.read_parquet(path / "diagnostics.parquet")
    diagnostics["step"] = (diagnostics["epoch"] * 7).astype(int)  # a diagnosis every 7 steps
    diagnostics.to_parquet(path / "diagnostics.parquet", index=False)
    run = load_run(path)
    assert sorted(run.step_layers) == [0, 7, 14, 21]
    for step, layers in run.step_layers.items():
        rows = diagnostics[diagnostics["step"] == step]
        expected = rows.groupby("layer")["gtd"].mean().to_numpy()
        np.testing.assert_allclose(layers["gtd"].to_numpy(float), expected)
    result = write_report([path])
    names = sorted(p.name for p in result.pngs)
    assert "steps-steps.png" in names
    assert_png_ok(path / "report" / "steps-steps.png")
    assert "diagnostics over training steps" in result.html.read_text(encoding="utf-8")


def test_a_single_diagnosis_per_epoch_draws_no_step_figure(tmp_path):
    path = write_refine_run(tmp_path / "few", epochs=1)  # two diagnoses: before training and after epoch 1
    diagnostics = pd.read_parquet(path / "diagnostics.parquet")
    diagnostics["step"] = (diagnostics["epoch"] * 5).astype(int)
    diagnostics.to_parquet(path / "diagnostics.parquet", index=False)
    names = sorted(p.name for p in write_report([path]).pngs)
    assert not any(n.endswith("-steps.png") for n in names)


# --- refine runs: thumbnails before and after training, plain against refined; hover values -----------

def write_staged_patterns(run: Path, n_layers: int, n_heads: int, examples=(2, 5), refined_layers=(),
                          stages=("before", "after"), seed: int = 0) -> list:
    """A refine run's patterns.parquet (``stage`` column); ``plain`` filled in ``refined_layers``, else NaN."""
    import torch

    from attnprobe.capture.patterns import Pattern
    from attnprobe.scanning.patterns import pattern_frame

    rng = np.random.default_rng(seed)
    kept = []
    for stage in stages:
        for i, row in enumerate(examples):
            n = 5 + 2 * i
            probs = rng.dirichlet(np.ones(n) * 0.3, size=(n_layers, n_heads, n)).astype(np.float32)
            plain = None
            if refined_layers:
                plain = np.full_like(probs, np.nan)
                for layer in refined_layers:
                    plain[layer] = rng.dirichlet(np.ones(n) * 0.3, size=(n_heads, n))
                plain = torch.from_numpy(plain)
            tokens = ["[CLS]", *[f"w{k}<&'" for k in range(n - 2)], "[SEP]"]  # markup to escape
            kept.append(Pattern(row=row, tokens=tokens, probs=torch.from_numpy(probs), plain=plain, stage=stage))
    pattern_frame(kept).to_parquet(run / "patterns.parquet", index=False)
    return kept


THUMB = re.compile(r'<td class="thumb"><div class="hov"><img alt="layer (\d+), head (\d+)" '
                   r'src="data:image/png;base64,([^"]+)"><svg viewBox="0 0 (\d+) (\d+)"[^>]*>(.*?)</svg></div></td>', re.S)
RECT = re.compile(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"><title>([^<]*)</title></rect>')
TITLE = re.compile(r"^example (\d+)(?:, (before|after) training(?: \((refined|plain)\))?)?: "
                   r"query (\d+) (.*) -> key (\d+) (.*): ([\d.]+)$")


def thumbnails_of(page: str) -> dict:
    """{(layer, head): (PNG pixels, [(x, y, w, h, parsed title)])} of every thumbnail in the head tables."""
    import base64
    import html as html_mod

    from matplotlib.image import imread

    out = {}
    for layer, head, data, width, height, svg in THUMB.findall(page):
        pixels = imread(BytesIO(base64.b64decode(data)), format="png")[..., :3]
        assert pixels.shape[:2] == (int(height), int(width))
        rects = [(float(x), float(y), float(w), float(h), TITLE.match(html_mod.unescape(t)))
                 for x, y, w, h, t in RECT.findall(svg)]
        assert all(r[-1] is not None for r in rects), [r for r in RECT.findall(svg)][:2]
        out[(int(layer), int(head))] = (pixels, rects)
    return out


def check_hovers(thumbs: dict, kept: list) -> None:
    """Every hover title names a kept weight, to 4 decimals, and sits over a cell of that colour."""
    from matplotlib import colormaps

    viridis = colormaps["viridis"]
    by_key = {(p.stage, p.row): p for p in kept}
    for (layer, head), (pixels, rects) in thumbs.items():
        seen = set()
        for x, y, w, h, m in rects:
            row, stage, kind, q, qtok, k, ktok, weight = m.groups()
            p = by_key[(stage, int(row))]
            grid = (p.plain if kind == "plain" else p.probs)[layer, head].numpy()
            q, k = int(q), int(k)
            assert qtok == repr(p.tokens[q]) and ktok == repr(p.tokens[k])
            assert abs(float(weight) - grid[q, k]) <= 5e-5
            centre = pixels[int(y + h / 2), int(x + w / 2)]
            assert np.abs(centre - np.array(viridis(float(grid[q, k]))[:3])).max() < 0.03, (layer, head, m.group(0))
            seen.add((stage, kind, int(row)))
        refined = any(p.plain is not None and np.isfinite(p.plain[layer, head].numpy()).all() for p in kept)
        expected = {(p.stage, kind, p.row) for p in kept for kind in (("refined", "plain") if refined else (None,))}
        assert seen == expected, (layer, head)


def test_refine_report_has_before_and_after_thumbnails_of_exactly_the_flagged_and_extreme_heads(tmp_path):
    run = write_refine_run(tmp_path / "r", n_layers=3, n_heads=4, epochs=2, seed=4)
    kept = write_staged_patterns(run, 3, 4, refined_layers=(1, 2))
    meta = json.loads((run / "run.json").read_text())
    meta["patterns"] = {"requested": 2, "examples": [2, 5], "stages": ["before", "after"], "notes": []}
    (run / "run.json").write_text(json.dumps(meta))
    diagnostics = pd.read_parquet(run / "diagnostics.parquet")
    last = diagnostics[diagnostics.epoch == diagnostics.epoch.max()]
    flagged = last[last.collapsed | last.high_gtd | last.sink | last.diffuse].sort_values(["layer", "head"])
    assert 0 < len(flagged) < len(last)
    result = write_report([run])
    page = result.html.read_text(encoding="utf-8")
    rows = html_table(page, "flagged")
    assert [(int(r[0]), int(r[1])) for r in rows] == list(zip(flagged.layer, flagged["head"]))
    extremes = html_table(page, "extremes")
    wanted = {(int(r[0]), int(r[1])) for r in rows} | {(int(r[1]), int(r[2])) for r in extremes}
    thumbs = thumbnails_of(page)
    assert set(thumbs) == wanted
    assert {f"r-head-L{layer}-H{head}.png" for layer, head in wanted} <= {p.name for p in result.pngs}
    for (layer, head), (_, rects) in thumbs.items():
        kinds = {(m.group(2), m.group(3)) for *_, m in rects}
        if layer == 0:  # not refined: before and after training, no plain rows
            assert kinds == {("before", None), ("after", None)}
        else:
            assert kinds == {(s, k) for s in ("before", "after") for k in ("refined", "plain")}
    check_hovers(thumbs, kept)
    assert "before training and after it" in page and "w0&lt;&amp;&#x27;" in page
    assert "<w0" not in page  # token text is escaped in the hover titles


def test_scan_thumbnails_carry_hover_values(tmp_path):
    run = write_scan_run(tmp_path / "s", n_layers=2, n_heads=3, seed=4)
    import torch

    from attnprobe.capture.patterns import Pattern
    from attnprobe.scanning.patterns import pattern_frame

    rng = np.random.default_rng(1)
    kept = [Pattern(row=r, tokens=[f"t{i}" for i in range(n)],
                    probs=torch.from_numpy(rng.dirichlet(np.ones(n) * 0.3, size=(2, 3, n)).astype(np.float32)))
            for r, n in ((0, 6), (4, 9))]
    pattern_frame(kept).to_parquet(run / "patterns.parquet", index=False)
    page = write_report([run], fmt="html").html.read_text(encoding="utf-8")
    thumbs = thumbnails_of(page)
    assert thumbs
    for (layer, head), (pixels, rects) in thumbs.items():
        assert len(rects) == 6 * 6 + 9 * 9
        assert {m.group(2) for *_, m in rects} == {None}
    check_hovers(thumbs, kept)


def test_thumbnail_hovers_stop_at_the_cap(monkeypatch):
    from attnprobe.report import thumbnails

    monkeypatch.setattr(thumbnails, "MAX_HOVER_CELLS", 100)
    grids = [np.full((n, n), 1.0 / n) for n in (6, 9, 5)]
    columns = [(f"example {i}", [f"t{k}" for k in range(len(g))]) for i, g in enumerate(grids)]
    _, hovers, _, hovered = thumbnails.thumbnail_grid(columns, [("", grids)])
    assert hovered == 1 and len(hovers) == 36  # 36 + 81 > 100: the second example gets none, nor the later ones
    caption = thumbnails._caption(0, 0, False, hovered, 3)
    assert "first 1 of 3 examples" in caption


def test_refine_report_without_patterns_says_so(tmp_path):
    run = write_refine_run(tmp_path / "old")
    result = write_report([run], fmt="html")
    assert any("the refine kept no attention patterns" in n for n in result.notes)
    assert '<td class="thumb">' not in result.html.read_text(encoding="utf-8")


def test_refine_patterns_with_an_unknown_stage_or_no_stage_are_refused(tmp_path):
    run = write_refine_run(tmp_path / "bad")
    write_staged_patterns(run, 2, 4)
    df = pd.read_parquet(run / "patterns.parquet")
    df.loc[df.stage == "after", "stage"] = "middle"
    df.to_parquet(run / "patterns.parquet", index=False)
    with pytest.raises(AttnprobeError, match=r"stage values \['middle'\] are not before or after\); rerun the refine"):
        write_report([run], fmt="html")
    df.drop(columns="stage").to_parquet(run / "patterns.parquet", index=False)
    with pytest.raises(AttnprobeError, match="lacks the column.s. stage; rerun the refine"):
        write_report([run], fmt="html")
    assert not (run / "report").exists()
