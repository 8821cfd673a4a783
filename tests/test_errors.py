"""Bad input through the real commands: each case exits 1 with a short message and writes nothing.

The list mirrors docs/cli.md "Errors"; cases that need a model use the tiny BERT fixture.
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from attnprobe.cli import app

runner = CliRunner()


def _files(d):
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text("\n   \n\n")
    (d / "data.xyz").write_text("hello\n")
    (d / "nocol.csv").write_text("foo,bar\n1,2\n")
    (d / "ok.tsv").write_text("sentence\tlabel\nhello there\t1\nbye now\t0\n")
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{broken\n')
    (d / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    (d / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "one-class.tsv").write_text("sentence\tlabel\n" + "".join(f"text {i}\tpos\n" for i in range(10)))
    (d / "bad.toml").write_text("hopz = 3\n")
    (d / "badtype.toml").write_text('batch_size = "big"\n')


SCAN_CASES = [
    ("missing file", ["--data", "nope.txt"], "does not exist"),
    ("empty file", ["--data", "empty.txt"], "is empty"),
    ("only blank lines", ["--data", "blank.txt"], "only blank lines"),
    ("unknown extension", ["--data", "data.xyz"], "unknown extension"),
    ("no text column", ["--data", "nocol.csv"], "columns found: foo, bar"),
    ("text column missing", ["--data", "ok.tsv", "--text-column", "body"], "body"),
    ("malformed jsonl", ["--data", "bad.jsonl"], "line 3 is not valid JSON"),
    ("corrupt parquet", ["--data", "bad.parquet"], "not a readable Parquet file"),
    ("non-utf-8", ["--data", "latin.txt"], "--encoding latin-1"),
    ("batch size 0", ["--text", "hi there", "--batch-size", "0"], "--batch-size must be 1 or more"),
    ("negative batch size", ["--text", "hi there", "--batch-size", "-1"], "--batch-size must be 1 or more"),
    ("too many layers", ["--text", "hi there", "--num-layers", "7"], "more than the 2 layers"),
    ("one hop", ["--text", "hi there", "--hops", "1"], "--hops must be 2 or more"),
    ("threshold above 1", ["--text", "hi there", "--sink", "1.2"], "outside [0, 1]"),
    ("threshold below 0", ["--text", "hi there", "--diffuse", "-0.1"], "outside [0, 1]"),
    ("config unknown key", ["--config", "bad.toml"], "unknown key 'hopz'"),
    ("config wrong type", ["--config", "badtype.toml"], "'batch_size' must be an integer"),
]


@pytest.mark.parametrize("name, args, message", SCAN_CASES, ids=[c[0] for c in SCAN_CASES])
def test_scan_errors(tiny_bert, in_tmp, name, args, message):
    _files(in_tmp)
    result = runner.invoke(app, ["scan", str(tiny_bert), *args, "--out", "out"])
    assert result.exit_code == 1, (name, result.output)
    assert message in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) <= 2
    assert "Traceback" not in result.output
    assert not (in_tmp / "out").exists(), "nothing half-written"


def test_non_utf8_reads_with_the_named_encoding(tiny_bert, in_tmp):
    _files(in_tmp)
    result = runner.invoke(app, ["scan", str(tiny_bert), "--data", "latin.txt", "--encoding", "latin-1", "--out", "o"])
    assert result.exit_code == 0, result.output


def test_model_errors(tiny_bert, in_tmp):
    folder = in_tmp / "corrupt"
    shutil.copytree(tiny_bert, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = [
        (str(folder), "cannot load the weights"),
        (str(in_tmp / "missing-model"), "does not exist"),
        (str(in_tmp), "has no config.json"),
        ("not-an-alias", "attnprobe models"),
    ]
    for model, message in cases:
        result = runner.invoke(app, ["scan", model, "--text", "hello world", "--out", "out"])
        assert result.exit_code == 1 and message in result.stderr, (model, result.stderr)
        assert not (in_tmp / "out").exists()


def test_out_folder_with_another_run(tiny_bert, in_tmp):
    assert runner.invoke(app, ["scan", str(tiny_bert), "--text", "hello world", "--out", "o"]).exit_code == 0
    before = (in_tmp / "o" / "run.json").read_text()
    result = runner.invoke(app, ["scan", str(tiny_bert), "--text", "other text", "--out", "o"])
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    assert (in_tmp / "o" / "run.json").read_text() == before  # the old run is untouched


def test_refine_single_class_labels(tiny_models, in_tmp):
    _files(in_tmp)
    result = runner.invoke(app, ["refine", str(tiny_models["bert"]), "--train", "one-class.tsv", "--out", "r"])
    assert result.exit_code == 1 and "one class" in result.stderr, result.stderr
    assert not (in_tmp / "r" / "run.json").exists()


def test_report_errors(in_tmp, tiny_bert):
    (in_tmp / "not-a-run").mkdir()
    result = runner.invoke(app, ["report", "not-a-run"])
    assert result.exit_code == 1 and "run.json" in result.stderr
    assert runner.invoke(app, ["scan", str(tiny_bert), "--text", "hello world", "--out", "run"]).exit_code == 0
    meta = json.loads((in_tmp / "run" / "run.json").read_text())
    (in_tmp / "run" / "run.json").write_text(json.dumps({**meta, "complete": False}))
    result = runner.invoke(app, ["report", "run"])
    assert result.exit_code == 1 and "incomplete" in result.stderr
    (in_tmp / "run" / "run.json").write_text(json.dumps(meta))
    (in_tmp / "run" / "heads.parquet").write_bytes(b"junk")
    result = runner.invoke(app, ["report", "run"])
    assert result.exit_code == 1 and "heads.parquet" in result.stderr
    assert not (in_tmp / "run" / "report" / "report.html").exists()
