"""refine --report-to (TensorBoard event files read back with TensorBoard's reader, a missing tracker
package named with its extra) and --diagnose-every (diagnostics rows between evaluations), through the CLI."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
from typer.testing import CliRunner

from attnprobe.runtime import outputs
from attnprobe.cli import app
from tests.conftest import make_tiny_model
from tests.training.test_refine import CLI_OPTIONS, write_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    return {"root": root, "bert": make_tiny_model("bert", root / "bert", task="sequence-classification"),
            "train": write_rows(root / "train.tsv", 24, seed=1), "dev": write_rows(root / "dev.tsv", 8, seed=2)}


def _refine(work, out, *extra):
    return CliRunner().invoke(app, ["refine", str(work["bert"]), "--train", str(work["train"]), "--eval",
                                    str(work["dev"]), "--variant", "bp-high", "--out", str(out), *CLI_OPTIONS,
                                    "--json", *extra])


def test_report_to_tensorboard_and_diagnose_every(work):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = work["root"] / "tb"
    res = _refine(work, out, "--report-to", "tensorboard", "--diagnose-every", "2", "--no-checkpoints")
    assert res.exit_code == 0, res.output
    meta = outputs.read_run_json(out)
    assert meta["options"]["report_to"] == "tensorboard" and meta["options"]["diagnose_every"] == 2
    assert meta["steps"] == 12  # 24 rows / batch 4 x 2 epochs
    acc = EventAccumulator(str(out / "tensorboard"))  # outside checkpoints/, which --no-checkpoints removes
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "eval/accuracy"} <= tags
    history = pd.read_parquet(out / outputs.HISTORY)
    logged = {e.step: e.value for e in acc.Scalars("eval/accuracy")}
    assert sorted(logged) == history["step"].tolist() == [0, 6, 12]
    assert [logged[s] for s in sorted(logged)] == pytest.approx(history["accuracy"].tolist(), abs=1e-6)
    diagnostics = pd.read_parquet(out / outputs.DIAGNOSTICS)
    # evaluations at steps 0, 6 and 12; --diagnose-every 2 adds 2, 4, 8 and 10 (6 and 12 are evaluations)
    assert diagnostics.groupby("step").size().to_dict() == {s: 8 for s in (0, 2, 4, 6, 8, 10, 12)}
    assert diagnostics.groupby("step")["epoch"].first().tolist() == pytest.approx(
        [0.0, 1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0], abs=1e-3)
    assert diagnostics["bp_shift"].notna().all()
    gtd = diagnostics.groupby("step")["gtd"].mean()
    assert gtd.nunique() == len(gtd)  # each block is the model at its own step
    # the diagnostics' scalars reach the tracker too: per-layer means of diagnostics.parquet at every step
    for layer in (0, 1):
        logged = {e.step: e.value for e in acc.Scalars(f"train/attnprobe/layer_{layer}/gtd")}
        want = diagnostics[diagnostics["layer"] == layer].groupby("step")["gtd"].mean()
        assert sorted(logged) == want.index.tolist()
        assert [logged[s] for s in sorted(logged)] == pytest.approx(want.tolist(), abs=1e-6)
    flagged = {e.step: e.value for e in acc.Scalars("train/attnprobe/flagged_heads")}
    assert sorted(flagged) == sorted(diagnostics["step"].unique())


@pytest.mark.parametrize("name", ["wandb", "mlflow", "trackio"])
def test_report_to_a_missing_tracker_names_the_extra(work, tmp_path, name):
    if importlib.util.find_spec(name):
        pytest.skip(f"{name} is installed")
    res = _refine(work, tmp_path / "o", "--report-to", name)
    assert res.exit_code == 1
    assert f"attnprobe[{name}]" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_report_to_unknown_and_bad_diagnose_every(work, tmp_path):
    res = _refine(work, tmp_path / "o", "--report-to", "visdom")
    assert res.exit_code == 1 and "unknown --report-to" in res.stderr
    res = _refine(work, tmp_path / "o", "--diagnose-every", "0")
    assert res.exit_code == 1 and "--diagnose-every must be 1 or more" in res.stderr
