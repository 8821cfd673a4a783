"""The real commands through typer's CliRunner in an isolated folder: files, columns, exit codes, messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from attnprobe.cli import app

HEAD_COLUMNS = ["layer", "head", "queries", "direct_entropy", "direct_entropy_norm", "indirect_entropy",
                "indirect_entropy_norm", "gtd", "self_mass", "local_mass", "first_mass", "special_mass",
                "sink_mass", "bp_shift", "nonfinite", "entropy_collapse", "low_gtd", "high_gtd", "sink",
                "diffuse", "collapsed"]

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_version_and_help():
    assert run("--version").stdout.strip().startswith("attnprobe ")
    for cmd in ("scan", "refine", "report", "models"):
        result = run(cmd, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout


def test_help_imports_nothing_heavy():
    code = ("import sys; from attnprobe.cli import app; "
            "heavy = [m for m in ('torch', 'transformers', 'pandas', 'matplotlib') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_scan_writes_every_file(tiny_bert, in_tmp):
    data = in_tmp / "texts.txt"
    data.write_text("The cat sat on the mat.\n\nA second, longer line of text to scan.\nshort\n")
    result = run("scan", tiny_bert, "--data", data, "--out", "run", "--per-example")
    assert result.exit_code == 0, result.output
    out = in_tmp / "run"
    heads = pd.read_parquet(out / "heads.parquet")
    assert list(heads.columns[: len(HEAD_COLUMNS)]) == HEAD_COLUMNS
    assert len(heads) == 2 * 4
    layers = pd.read_parquet(out / "layers.parquet")
    assert {"layer", "heads", "flagged_heads", "gtd", "direct_entropy_norm"} <= set(layers.columns)
    examples = pd.read_parquet(out / "examples.parquet")
    assert len(examples) == 3 * 2 * 4
    meta = json.loads((out / "run.json").read_text())
    assert meta["complete"] is True and meta["kind"] == "scan"
    assert meta["data"]["rows_read"] >= 3 and meta["data"]["rows_skipped"].get("empty text") == 1
    assert meta["model"]["layers"] == 2 and meta["backend"] == "attnprobe"
    for key in ("versions", "wall_time_s", "seed", "thresholds", "options", "device", "dtype"):
        assert key in meta
    from attnprobe.runtime import memory  # the scan command asks for the memory setting on the CPU

    assert meta["cpu_allocator"] == ("keeps freed memory" if memory.keep_freed_memory() else "default")
    assert "layer" in result.stdout and "wrote" in result.stdout
    assert not list(out.glob(".*tmp*"))


def test_scan_json_summary(tiny_bert, in_tmp):
    result = run("scan", tiny_bert, "--text", "hello there world", "--text", "another one", "--json", "--out", "j")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sequences"] == 2 and len(summary["layers"]) == 2


def test_scan_default_out_under_runs_folder(tiny_bert, in_tmp):
    result = run("scan", tiny_bert, "--text", "hello world")
    assert result.exit_code == 0, result.output
    runs = list((in_tmp / "attnprobe-runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "run.json").is_file()


def test_scan_config_file_and_flag_precedence(tiny_bert, in_tmp):
    cfg = in_tmp / "scan.toml"
    cfg.write_text(f'model = "{tiny_bert}"\nhops = 3\nbatch_size = 2\n[thresholds]\nlow_gtd = 0.2\n')
    result = run("scan", "--config", cfg, "--text", "some text here", "--hops", "2", "--out", "c")
    assert result.exit_code == 0, result.output
    meta = json.loads((in_tmp / "c" / "run.json").read_text())
    assert meta["options"]["hops"] == 2 and meta["options"]["batch_size"] == 2
    assert meta["thresholds"]["low_gtd"] == 0.2


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be 1 or more"),
    (["--batch-size", "-3"], "--batch-size must be 1 or more"),
    (["--hops", "1"], "--hops must be 2 or more"),
    (["--low-gtd", "1.5"], "outside [0, 1]"),
    (["--num-layers", "9"], "more than the 2 layers"),
    (["--data", "missing.tsv"], "does not exist"),
    (["--device", "tpu"], "unknown --device"),
])
def test_scan_bad_options_exit_1(tiny_bert, in_tmp, args, message):
    texts = [] if "--data" in args else ["--text", "hello world"]
    result = runner.invoke(app, ["scan", str(tiny_bert), *texts, *args, "--out", "x"])
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not (in_tmp / "x").exists()


def test_scan_unknown_model_and_alias(in_tmp):
    result = runner.invoke(app, ["scan", "./no-such-folder", "--text", "hi there"])
    assert result.exit_code == 1 and "does not exist" in result.stderr
    result = runner.invoke(app, ["scan", "not-an-alias-or-cached", "--text", "hi there"])
    assert result.exit_code == 1 and "attnprobe models" in result.stderr


def test_config_unknown_key_and_wrong_type(in_tmp):
    (in_tmp / "bad.toml").write_text("hopz = 2\n")
    result = runner.invoke(app, ["scan", "--config", "bad.toml"])
    assert result.exit_code == 1 and "unknown key 'hopz'" in result.stderr
    (in_tmp / "bad2.toml").write_text('hops = "two"\n')
    result = runner.invoke(app, ["scan", "--config", "bad2.toml"])
    assert result.exit_code == 1 and "'hops' must be an integer" in result.stderr


def test_out_folder_holding_another_run_is_refused(tiny_bert, in_tmp):
    assert run("scan", tiny_bert, "--text", "hello world", "--out", "r").exit_code == 0
    result = runner.invoke(app, ["scan", str(tiny_bert), "--text", "hello world", "--out", "r"])
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    assert run("scan", tiny_bert, "--text", "hello world", "--out", "r", "--overwrite").exit_code == 0


def test_unwritable_out_folder(tiny_bert, in_tmp):
    blocker = in_tmp / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["scan", str(tiny_bert), "--text", "hello world", "--out", str(blocker / "sub")])
    assert result.exit_code == 1 and "output" in result.stderr


def test_models_lists_the_alias():
    result = run("models")
    assert result.exit_code == 0 and "minilm-l6" in result.stdout


def test_sample_configs_parse():
    from attnprobe.config import RefineConfig, ScanConfig, build_config

    root = Path(__file__).resolve().parents[1] / "sample_configs"
    configs = sorted(root.glob("*.toml"))
    assert configs
    for path in configs:
        cls, section = (RefineConfig, "refine") if path.name.startswith("refine") else (ScanConfig, "scan")
        overrides = {"train": "x.tsv"} if cls is RefineConfig else {}
        build_config(cls, str(path), section, overrides)


@pytest.mark.slow
def test_default_scan_on_bundled_model_and_sample_corpus(in_tmp):
    result = run("scan", "--out", "default", "--limit", "64")
    assert result.exit_code == 0, result.output
    heads = pd.read_parquet(in_tmp / "default" / "heads.parquet")
    assert len(heads) == 72
    meta = json.loads((in_tmp / "default" / "run.json").read_text())
    assert meta["model"]["name"] == "minilm-l6" and meta["data"]["format"] == "sample"
