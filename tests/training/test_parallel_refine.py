"""refine on two CPU processes (gloo) through torchrun and accelerate launch, against one process.

The two-process runs use per-device batch 4 and the single-process run batch 8, so the global batch is the
same. The tiny model has dropout switched off: every process draws its own dropout masks, so with dropout
the runs would differ by that noise and only a loose comparison would be possible. Without it the Trainer
gives both runs the same examples in the same order (the seeded sampler's permutation, each process taking
every other batch of it), DistributedDataParallel averages the two per-process mean gradients, which equals
the mean over the 8 examples, and what is left is float summation order. Observed after 8 steps: losses
equal to the printed digits, diagnostics within 3e-8, trained weights within 5e-6. The tolerances (1e-4
on losses, metrics and weights; 1e-6 on the diagnostics of the untrained model) leave room for other BLAS
builds, while processes that each train alone (gradients not all-reduced, the bug this file guards
against) end ~5e-2 apart in the weights and ~1e-3 in the eval loss. The tiny model stays near chance in
8 steps, so equal accuracy is a weak check; the weights are the strong one.

The eval set has 16 rows, a multiple of 2 processes x 4, because the Trainer pads a short last eval batch
with repeated examples on several processes and weights the eval loss by batch means (docs/scale.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from attnprobe.runtime import outputs
from attnprobe.config import RefineConfig
from tests.conftest import make_tiny_model
from tests.training.test_refine import write_rows

pytestmark = pytest.mark.slow

TRAIN_ROWS, EVAL_ROWS, PER_DEVICE = 32, 16, 4
OPTIONS = ["--variant", "bp-high", "--epochs", "2", "--lr", "1e-2", "--warmup-ratio", "0", "--max-length", "32",
           "--device", "cpu", "--seed", "0"]
TITLE = "attnprobe refine:"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel-refine")
    model = make_tiny_model("bert", root / "bert", task="sequence-classification")
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_path.write_text(json.dumps(config))
    return {"root": root, "model": model, "train": write_rows(root / "train.tsv", TRAIN_ROWS, seed=1),
            "dev": write_rows(root / "dev.tsv", EVAL_ROWS, seed=2)}


def _refine_args(work, out: Path, batch_size: int) -> list[str]:
    return ["-m", "attnprobe", "refine", str(work["model"]), "--train", str(work["train"]), "--eval",
            str(work["dev"]), *OPTIONS, "--batch-size", str(batch_size), "--out", str(out)]


def _launch(launcher: list[str], work, out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *launcher, *_refine_args(work, out, PER_DEVICE)], check=False,
                          capture_output=True, text=True, env=_env(), timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single(work):
    from attnprobe.training.refine import refine

    out = work["root"] / "one"
    cfg = RefineConfig(model=str(work["model"]), train=str(work["train"]), eval=str(work["dev"]), out=str(out),
                       variant="bp-high", epochs=2.0, lr=1e-2, warmup_ratio=0.0, max_length=32, device="cpu",
                       seed=0, batch_size=2 * PER_DEVICE)
    refine(cfg)
    return out


@pytest.fixture(scope="module")
def torchrun(work):
    out = work["root"] / "torchrun"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    return out, _launch(launcher, work, out)


def _check_written_once(out: Path, proc: subprocess.CompletedProcess) -> dict:
    assert proc.stdout.count(TITLE) == 1 and proc.stdout.count("wrote ") == 1  # only the main process prints
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoints", outputs.DIAGNOSTICS, outputs.HISTORY, "model", outputs.PATTERNS, outputs.RUN_JSON])  # no .partial leftovers
    assert [p.relative_to(out) for p in out.rglob(outputs.RUN_JSON)] == [Path(outputs.RUN_JSON)]
    assert (out / "model" / "model.safetensors").is_file()
    meta = outputs.read_run_json(out)
    assert meta["complete"] is True and meta["processes"] == 2
    newest = out / "checkpoints" / f"checkpoint-{meta['steps']}"
    assert (newest / "attnprobe-progress.json").is_file()  # --resume material, written once by the main process
    return meta


def _compare(one: Path, two: Path) -> None:
    meta_one, meta_two = outputs.read_run_json(one), outputs.read_run_json(two)
    assert meta_one["processes"] == 1
    assert meta_two["steps"] == meta_one["steps"] == 2 * TRAIN_ROWS // (2 * PER_DEVICE)  # same global batch
    assert meta_two["data"]["eval"]["rows_used"] == EVAL_ROWS
    for key in ("eval_loss", "accuracy", "f1", "mcc"):
        assert meta_two["final"][key] == pytest.approx(meta_one["final"][key], abs=1e-4), key

    w1, w2 = (load_file(d / "model" / "model.safetensors") for d in (one, two))
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-4, worst  # observed 4e-6; processes training alone drift apart by ~5e-2

    h1, h2 = (pd.read_parquet(d / outputs.HISTORY) for d in (one, two))
    assert h2["epoch"].tolist() == h1["epoch"].tolist() == [0.0, 1.0, 2.0]
    assert h2["step"].tolist() == h1["step"].tolist()
    for col in ("train_loss", "eval_loss", "accuracy"):
        np.testing.assert_allclose(h2[col], h1[col], atol=1e-4, equal_nan=True, err_msg=col)

    d1, d2 = (pd.read_parquet(d / outputs.DIAGNOSTICS) for d in (one, two))
    assert list(d2.columns) == list(d1.columns) and len(d2) == len(d1) == 3 * 2 * 4  # epochs x layers x heads
    # each process scans its share of the eval set; the all-reduced sums cover all of it
    assert d2["queries"].tolist() == d1["queries"].tolist()
    before = d1["epoch"] == 0.0
    num = [c for c in d1.select_dtypes("number").columns if c not in ("epoch", "step", "layer", "head")]
    np.testing.assert_allclose(d2.loc[before, num].to_numpy(float), d1.loc[before, num].to_numpy(float),
                               atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(d2[num].to_numpy(float), d1[num].to_numpy(float), atol=1e-4, equal_nan=True)

    # patterns are kept by the main process alone, of the same eval examples: before training equal, after
    # training as close as the trained weights
    p1, p2 = (pd.read_parquet(d / outputs.PATTERNS) for d in (one, two))
    pd.testing.assert_frame_equal(p2.drop(columns=["weight", "plain_weight"]), p1.drop(columns=["weight", "plain_weight"]))
    for stage, tol in (("before", 1e-6), ("after", 1e-4)):
        rows = p1["stage"] == stage
        for col in ("weight", "plain_weight"):
            np.testing.assert_allclose(p2.loc[rows, col], p1.loc[rows, col], atol=tol, err_msg=f"{stage} {col}")


def test_torchrun_two_processes_write_once(torchrun):
    out, proc = torchrun
    _check_written_once(out, proc)


def test_torchrun_two_processes_match_one_with_the_same_global_batch(single, torchrun):
    _compare(single, torchrun[0])


def test_accelerate_launch_two_cpu_processes_match_one(work, single):
    # `accelerate launch --cpu --num_processes 2` starts a single process (its CPU launcher needs an mpirun
    # hostfile for more), so two CPU processes go through the torchrun launcher (--multi_gpu) with
    # --device cpu. The explicit flags keep accelerate from asking for, or warning about, a config file.
    out = work["root"] / "accelerate"
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    proc = _launch(launcher, work, out)
    _check_written_once(out, proc)
    _compare(single, out)


def test_torchrun_diagnostics_count_each_eval_row_once_with_a_padded_last_batch(work):
    """13 eval rows on 2 processes x 4: the sharded eval loader repeats 3 rows to fill its last batch. The
    diagnostics, taken in the evaluation pass, must still cover each row once: equal to a separate
    single-process scan of the eval set by the model at that point (the start, and the saved final model)."""
    from attnprobe.data import sources
    from attnprobe.models import loading
    from attnprobe.scanning import passes, tables
    from attnprobe.config import Thresholds
    from attnprobe.formulas.saobp import SaobpSettings

    dev = write_rows(work["root"] / "dev13.tsv", 13, seed=5)
    out = work["root"] / "torchrun-13"
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m",
            "attnprobe", "refine", str(work["model"]), "--train", str(work["train"]), "--eval", str(dev), *OPTIONS,
            "--epochs", "1", "--batch-size", str(PER_DEVICE), "--no-checkpoints", "--out", str(out)]
    proc = subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, env=_env(),
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = outputs.read_run_json(out)
    assert meta["processes"] == 2 and meta["diagnostics_from"] == "evaluation"
    diag = pd.read_parquet(out / outputs.DIAGNOSTICS)
    texts = sources.read_labeled(str(dev)).texts
    starts = loading.load_model(str(work["model"]), device="cpu", saobp=SaobpSettings(gamma=0.9, variant="bp-high"))
    final = loading.load_model(str(out / "model"), device="cpu")
    num = ["queries", *tables.METRIC_COLUMNS, "nonfinite"]
    for epoch, loaded in ((0.0, starts), (1.0, final)):
        loaded.model.eval()
        probe, _ = passes.run_batches(loaded, [sources.Chunk(texts, None, None, list(range(len(texts))))],
                                       batch_size=PER_DEVICE, max_length=32, hops=2)
        expected = tables.head_frame(probe.totals(), Thresholds())
        got = diag[diag["epoch"] == epoch].reset_index(drop=True)
        assert got["queries"].tolist() == expected["queries"].tolist(), epoch  # no row counted twice
        np.testing.assert_allclose(got[num].to_numpy(float), expected[num].to_numpy(float), rtol=1e-5, atol=1e-6,
                                   equal_nan=True, err_msg=str(epoch))
