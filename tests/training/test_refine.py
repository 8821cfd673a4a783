"""refine: classification scores by hand, tiny runs through the library and the CLI, the files they write,
reloading the saved model, text pairs, --resume, error messages, and the sample configs."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import TrainerCallback
from typer.testing import CliRunner

from attnprobe.errors import AttnprobeError
from attnprobe.runtime import memory
from attnprobe.runtime import outputs
from attnprobe.cli import app
from attnprobe.config import RefineConfig, build_config
from attnprobe.training.scores import classification_scores, confusion_matrix, f1, matthews_corrcoef
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FILLER = "the a film movie story plot actor scene was is very quite really".split()
TRAIN_OPTIONS = dict(epochs=2.0, batch_size=4, lr=1e-2, warmup_ratio=0.0, max_length=32, device="cpu", seed=0)
CLI_OPTIONS = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--warmup-ratio", "0", "--max-length", "32",
               "--device", "cpu", "--seed", "0"]


# ---- classification scores, by hand --------------------------------------------------------------


def test_binary_scores_hand_computed():
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    preds = [0, 0, 0, 1, 0, 0, 1, 1, 1, 1]  # TN 3, FP 1, FN 2, TP 4
    assert confusion_matrix(np.array(labels), np.array(preds), 2).tolist() == [[3, 1], [2, 4]]
    scores = classification_scores(labels, preds, 2)
    assert scores["accuracy"] == pytest.approx(0.7)
    assert scores["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))  # 8/11
    assert scores["mcc"] == pytest.approx((4 * 3 - 1 * 2) / np.sqrt(5 * 6 * 4 * 5))  # 10/sqrt(600)


def test_multiclass_scores_hand_computed():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]  # C = [[1,1,0],[0,2,0],[1,0,1]]
    scores = classification_scores(labels, preds, 3)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["f1"] == pytest.approx((2 / 4 + 4 / 5 + 2 / 3) / 3)  # per-class F1: 0.5, 0.8, 0.667
    # Gorodkin: c=4, s=6, t=(2,2,2), p=(2,3,1): (24-12)/sqrt((36-14)(36-12))
    assert scores["mcc"] == pytest.approx(12 / np.sqrt(22 * 24))
    # a class absent from labels and predictions does not enter the macro mean
    assert classification_scores(labels, preds, 4)["f1"] == pytest.approx(scores["f1"])


def test_score_edge_cases():
    assert matthews_corrcoef(np.array([[5, 0], [3, 0]])) == 0.0  # constant predictions
    assert f1(np.array([[4, 0], [0, 0]])) == 0.0  # no positive class at all
    perfect = classification_scores([0, 1, 2, 1], [0, 1, 2, 1], 3)
    assert perfect == {"accuracy": 1.0, "f1": 1.0, "mcc": 1.0}
    inverse = classification_scores([0, 1, 0, 1], [1, 0, 1, 0], 2)
    assert inverse["mcc"] == pytest.approx(-1.0) and inverse["accuracy"] == 0.0


# ---- tiny data and models ------------------------------------------------------------------------


def write_rows(path: Path, n: int, seed: int, *, pairs: bool = False, labels=("0", "1"), header=None) -> Path:
    """A learnable set: label 1 sentences contain 'good' twice, label 0 ones 'bad' twice."""
    rng = random.Random(seed)
    header = header or (["sentence1", "sentence2", "label"] if pairs else ["sentence", "label"])
    lines = ["\t".join(header)]
    for i in range(n):
        lab = i % len(labels)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 4))]
        for _ in range(2):
            words.insert(rng.randint(0, len(words)), "good" if lab else "bad")
        text = " ".join(words)
        row = [text, " ".join(rng.choice(FILLER) for _ in range(3)), labels[lab]] if pairs else [text, labels[lab]]
        lines.append("\t".join(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    return {
        "root": root,
        "bert": make_tiny_model("bert", root / "bert", task="sequence-classification"),
        "distilbert": make_tiny_model("distilbert", root / "distilbert", task="sequence-classification"),
        "albert": make_tiny_model("albert", root / "albert", task="sequence-classification"),
        "train": write_rows(root / "train.tsv", 40, seed=1),
        "dev": write_rows(root / "dev.tsv", 12, seed=2),
    }


def _cfg(work, out: Path, variant: str, **extra) -> RefineConfig:
    return RefineConfig(model=str(work["bert"]), train=str(work["train"]), eval=str(work["dev"]), out=str(out),
                        variant=variant, **{**TRAIN_OPTIONS, **extra})


@pytest.fixture(scope="module")
def library_runs(work):
    from attnprobe.training.refine import refine

    return {v: refine(_cfg(work, work["root"] / f"lib-{v}", v)) for v in ("baseline", "bp-high")}


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args)


# ---- the library ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["baseline", "bp-high"])
def test_library_run_writes_every_file(library_runs, variant):
    result = library_runs[variant]
    out = result.out_dir
    for name in (outputs.HISTORY, outputs.DIAGNOSTICS, outputs.RUN_JSON, "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*partial*")) and not (out / "model" / "training_args.bin").exists()
    meta = json.loads((out / outputs.RUN_JSON).read_text())
    assert meta["kind"] == "refine" and meta["complete"] is True and meta["variant"] == variant
    assert set(meta["final"]) == {"accuracy", "f1", "mcc", "eval_loss"}
    assert meta["data"]["label_names"] == ["0", "1"]
    assert meta["data"]["train"]["rows_used"] == 40 and meta["data"]["eval"]["rows_used"] == 12
    assert {"versions", "wall_time_s", "seed", "options", "model"} <= set(meta)
    assert (meta["saobp"] is None) == (variant == "baseline")
    # on the CPU refine applies the runtime wing's memory setting (tests/runtime/test_memory.py checks that it takes effect)
    assert meta["cpu_allocator"] == ("keeps freed memory" if memory.keep_freed_memory() else "default")
    outputs.read_run_json(out)  # a finished run

    history = pd.read_parquet(out / outputs.HISTORY)
    assert list(history.columns) == ["epoch", "step", "train_loss", "eval_loss", "accuracy", "f1", "mcc"]
    assert history["epoch"].tolist() == [0.0, 1.0, 2.0]
    assert np.isnan(history["train_loss"].iloc[0]) and history["train_loss"].iloc[1:].notna().all()
    assert meta["final"]["accuracy"] == pytest.approx(history["accuracy"].iloc[-1])

    diag = pd.read_parquet(out / outputs.DIAGNOSTICS)
    assert sorted(diag["epoch"].unique()) == [0.0, 1.0, 2.0]
    assert (diag["variant"] == variant).all()
    assert len(diag) == 3 * 2 * 4  # epochs x layers x heads
    for col in ("layer", "head", "queries", "direct_entropy_norm", "gtd", "bp_shift", "collapsed"):
        assert col in diag.columns
    assert diag["gtd"].notna().all()
    if variant == "baseline":
        assert diag["bp_shift"].isna().all()
    else:
        assert diag["bp_shift"].notna().all() and (diag["bp_shift"] > 0).all()


@pytest.mark.parametrize("variant", ["baseline", "bp-high"])
def test_training_loss_decreases(library_runs, variant):
    losses = library_runs[variant].history["train_loss"].dropna().tolist()
    assert len(losses) == 2 and losses[-1] < losses[0]


def _logits(folder: Path, texts: list[str]) -> tuple[np.ndarray, str]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    return logits.numpy(), model.config._attn_implementation


def test_saved_baseline_reloads_with_the_same_logits(library_runs):
    result = library_runs["baseline"]
    logits, impl = _logits(result.out_dir / "model", result.eval_data.texts)
    assert impl != "saobp"
    np.testing.assert_allclose(logits, result.eval_logits, atol=1e-5)


def test_saved_refined_model_reloads_with_saobp_after_import_attnprobe(library_runs):
    result = library_runs["bp-high"]
    config = json.loads((result.out_dir / "model" / "config.json").read_text())
    assert config["attn_implementation"] == "saobp"
    assert config["saobp"] == {"gamma": 0.9, "strength": 1.0, "layers": "all", "variant": "bp-high"}
    code = (
        "import json, sys, torch, attnprobe\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "folder, texts = sys.argv[1], json.loads(sys.argv[2])\n"
        "m = AutoModelForSequenceClassification.from_pretrained(folder).eval()\n"
        "t = AutoTokenizer.from_pretrained(folder)\n"
        "with torch.no_grad():\n"
        "    out = m(**t(texts, padding=True, truncation=True, max_length=32, return_tensors='pt')).logits\n"
        "print(json.dumps({'impl': m.config._attn_implementation, 'logits': out.tolist()}))\n"
    )
    argv = [sys.executable, "-c", code, str(result.out_dir / "model"), json.dumps(result.eval_data.texts)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["impl"] == "saobp"
    np.testing.assert_allclose(np.array(got["logits"]), result.eval_logits, atol=1e-5)
    # and plain attention would give other logits: the reload really runs SAOBP
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(result.out_dir / "model", attn_implementation="eager")
    tok = result.tokenizer
    with torch.no_grad():
        eager = plain.eval()(**tok(result.eval_data.texts, padding=True, return_tensors="pt")).logits.numpy()
    assert not np.allclose(eager, result.eval_logits, atol=1e-6)


@pytest.mark.parametrize("variant, has_shift", [("baseline", False), ("bp-high", True)])
def test_scan_of_the_saved_model(library_runs, variant, has_shift, tmp_path):
    folder = library_runs[variant].out_dir / "model"
    res = _invoke(["scan", str(folder), "--text", "a good film", "--text", "a bad plot", "--out",
                   str(tmp_path / "scan"), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    layers = json.loads(res.stdout)["layers"]
    shifts = [row["bp_shift"] for row in layers]
    assert all((s is not None and s > 0) if has_shift else s is None for s in shifts), shifts


def test_summary_and_print_summary(library_runs):
    from rich.console import Console

    from attnprobe.report.summaries import print_summary, summary

    result = library_runs["bp-high"]
    s = summary(result)
    json.dumps(s)  # JSON-ready
    assert s["variant"] == "bp-high" and s["accuracy"]["after"] == result.meta["final"]["accuracy"]
    assert [row["layer"] for row in s["layers"]] == [0, 1]
    assert s["layers"][0]["before"]["gtd"] is not None and s["layers"][1]["after"]["bp_shift"] > 0
    console = Console(record=True, width=120)
    print_summary(result, console)
    text = console.export_text()
    assert "GTD" in text and "accuracy" in text and "bp-high" in text


# ---- the CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["baseline", "bp-high"])
def test_cli_refine(work, variant):
    out = work["root"] / f"cli-{variant}"
    res = _invoke(["refine", str(work["bert"]), "--train", str(work["train"]), "--eval", str(work["dev"]),
                   "--variant", variant, "--out", str(out), *CLI_OPTIONS, "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["variant"] == variant and s["epochs"] == [0.0, 1.0, 2.0]
    for name in (outputs.HISTORY, outputs.DIAGNOSTICS, outputs.RUN_JSON, "model/config.json"):
        assert (out / name).exists(), name
    diag = pd.read_parquet(out / outputs.DIAGNOSTICS)
    assert sorted(diag["epoch"].unique()) == [0.0, 1.0, 2.0] and (diag["variant"] == variant).all()
    assert json.loads((out / outputs.RUN_JSON).read_text())["complete"] is True

    again = _invoke(["refine", str(work["bert"]), "--train", str(work["train"]), "--out", str(out), "--epochs", "1"])
    assert again.exit_code == 1 and "already holds a run" in again.stderr


def test_cli_refine_text_pairs_with_string_labels(work):
    root = work["root"]
    train = write_rows(root / "pairs-train.tsv", 40, seed=3, pairs=True, labels=("no", "yes"))
    dev = write_rows(root / "pairs-dev.tsv", 10, seed=4, pairs=True, labels=("no", "yes"))
    out = root / "pairs"
    res = _invoke(["refine", str(work["bert"]), "--train", str(train), "--eval", str(dev), "--variant", "bp-low",
                   "--bp-layers", "upper", "--out", str(out), *CLI_OPTIONS[:-2], "--epochs", "1", "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / outputs.RUN_JSON).read_text())
    assert meta["data"]["label_names"] == ["no", "yes"]
    assert meta["data"]["train"]["pair_column"] == "sentence2"
    assert meta["saobp"] == {"gamma": 0.5, "strength": 1.0, "layers": [1], "variant": "bp-low"}
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "no", "1": "yes"}
    diag = pd.read_parquet(out / outputs.DIAGNOSTICS)
    assert diag.loc[diag.layer == 0, "bp_shift"].isna().all()
    assert diag.loc[diag.layer == 1, "bp_shift"].notna().all()


def test_eval_split_without_eval_file(work, tmp_path):
    from attnprobe.training.refine import prepare_data

    train_file = tmp_path / "unique.tsv"
    train_file.write_text("sentence\tlabel\n" + "".join(f"row {i} is {'good' if i % 2 else 'bad'}\t{i % 2}\n"
                                                         for i in range(40)), encoding="utf-8")
    cfg = RefineConfig(model=str(work["bert"]), train=str(train_file), eval_split=0.25, max_train_samples=20, seed=7)
    train, evaluation = prepare_data(cfg)
    assert len(evaluation.texts) == 10 and len(train.texts) == 20
    assert not set(train.texts) & set(evaluation.texts)
    assert evaluation.stats["source"].startswith("seeded 0.25 split")
    again = prepare_data(cfg)
    assert again[0].texts == train.texts and again[1].texts == evaluation.texts  # seeded
    other = prepare_data(dataclasses.replace(cfg, seed=8))
    assert other[1].texts != evaluation.texts


# ---- --resume ------------------------------------------------------------------------------------


class _Crash(Exception):
    pass


class _CrashAfterFirstEpoch(TrainerCallback):
    """Dies right after the epoch-1 checkpoint is saved, as a killed run would."""

    def on_save(self, args, state, control, **kwargs):
        if state.epoch >= 1:
            raise _Crash()


def test_resume_matches_an_uninterrupted_run(work, library_runs):
    from attnprobe.training.refine import refine

    out = work["root"] / "resumed"
    with pytest.raises(_Crash):
        refine(_cfg(work, out, "bp-high"), callbacks=[_CrashAfterFirstEpoch()])
    assert not (out / outputs.RUN_JSON).exists() and (out / "checkpoints").is_dir()
    res = _invoke(["refine", str(work["bert"]), "--train", str(work["train"]), "--eval", str(work["dev"]),
                   "--variant", "bp-high", "--out", str(out), *CLI_OPTIONS, "--resume", "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / outputs.RUN_JSON).read_text())
    full = library_runs["bp-high"]
    assert meta["resumed_from"] == "checkpoint-10"
    for key, value in full.meta["final"].items():
        assert meta["final"][key] == pytest.approx(value, abs=1e-6), key
    history = pd.read_parquet(out / outputs.HISTORY)
    pd.testing.assert_frame_equal(history, full.history, atol=1e-6)
    diag = pd.read_parquet(out / outputs.DIAGNOSTICS)
    assert sorted(diag["epoch"].unique()) == [0.0, 1.0, 2.0]
    np.testing.assert_allclose(diag["gtd"], full.diagnostics["gtd"], atol=1e-6)

    changed = _invoke(["refine", str(work["bert"]), "--train", str(work["train"]), "--eval", str(work["dev"]),
                       "--variant", "bp-low", "--out", str(out), *CLI_OPTIONS, "--resume"])
    assert changed.exit_code == 1 and "was trained with" in changed.stderr


# ---- --no-checkpoints and --group-by-length -------------------------------------------------------


class _KeepLoader(TrainerCallback):
    """Keeps the training DataLoader so a test can look at the batches it makes."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.loader = train_dataloader


def _padded_tokens(loader) -> tuple[int, int]:
    """(tokens in the padded batches, real tokens) over one pass of a training DataLoader."""
    padded = real = 0
    for batch in loader:
        mask = batch["attention_mask"]
        padded += mask.numel()
        real += int(mask.sum())
    return padded, real


def test_no_checkpoints_and_group_by_length(work, tmp_path):
    from attnprobe.training.refine import refine

    rng = random.Random(3)  # lengths from 1 to 24 words, so random batches pad a lot
    rows = [f"{' '.join(rng.choice(FILLER) for _ in range(rng.randint(1, 24)))} {'good' if i % 2 else 'bad'}\t{i % 2}"
            for i in range(48)]
    train = tmp_path / "varied.tsv"
    train.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    runs = {}
    for grouped in (False, True):
        keep = _KeepLoader()
        cfg = RefineConfig(model=str(work["bert"]), train=str(train), eval=str(work["dev"]),
                           out=str(tmp_path / f"grouped-{grouped}"), variant="bp-high",
                           **{**TRAIN_OPTIONS, "epochs": 1.0}, checkpoints=False, group_by_length=grouped)
        runs[grouped] = (refine(cfg, callbacks=[keep]), _padded_tokens(keep.loader))
    (plain, (pad_plain, real_plain)), (grouped, (pad_grouped, real_grouped)) = runs[False], runs[True]
    assert real_plain == real_grouped  # the same rows, in other batches
    assert pad_grouped - real_grouped < 0.5 * (pad_plain - real_plain), (pad_grouped, pad_plain, real_plain)
    for result in (plain, grouped):
        out = result.out_dir
        assert not (out / "checkpoints").exists() and result.meta["checkpoints"] is None
        assert result.meta["complete"] and (out / "model" / "model.safetensors").is_file()
        assert result.history["epoch"].tolist() == [0.0, 1.0]
    assert grouped.meta["options"]["group_by_length"] is True
    message = _refine_error(work, "--train", str(train), "--out", str(grouped.out_dir), "--resume")
    assert "no finished checkpoint" in message


def test_cli_no_checkpoints_and_group_by_length_flags(work, tmp_path):
    out = tmp_path / "flags"
    res = _invoke(["refine", str(work["bert"]), "--train", str(work["train"]), "--eval", str(work["dev"]),
                   "--variant", "baseline", "--out", str(out), *CLI_OPTIONS, "--epochs", "1",
                   "--no-checkpoints", "--group-by-length", "--json"])
    assert res.exit_code == 0, res.output
    options = json.loads((out / outputs.RUN_JSON).read_text())["options"]
    assert options["checkpoints"] is False and options["group_by_length"] is True
    assert not (out / "checkpoints").exists()


# ---- errors --------------------------------------------------------------------------------------


def _refine_error(work, *args: str) -> str:
    res = _invoke(["refine", str(work["bert"]), *args, "--epochs", "1", "--device", "cpu"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    return res.stderr


def test_error_single_class(work, tmp_path):
    train = write_rows(tmp_path / "one.tsv", 10, seed=5, labels=("1",))
    assert "all one class" in _refine_error(work, "--train", str(train), "--out", str(tmp_path / "o"))


def test_error_no_label_column(work, tmp_path):
    train = tmp_path / "nolabel.tsv"
    train.write_text("sentence\tscore\na good film\tx\n", encoding="utf-8")
    assert "no label column" in _refine_error(work, "--train", str(train), "--out", str(tmp_path / "o"))


def test_error_text_column_not_found(work, tmp_path):
    train = write_rows(tmp_path / "body.tsv", 10, seed=5, header=["body", "label"])
    assert "no recognisable text column" in _refine_error(work, "--train", str(train), "--out", str(tmp_path / "o"))
    assert "no column 'review'" in _refine_error(work, "--train", str(work["train"]), "--text-column", "review",
                                                 "--out", str(tmp_path / "o"))


def test_error_eval_labels_unseen(work, tmp_path):
    dev = write_rows(tmp_path / "dev3.tsv", 9, seed=6, labels=("0", "1", "2"))
    message = _refine_error(work, "--train", str(work["train"]), "--eval", str(dev), "--out", str(tmp_path / "o"))
    assert "labels the training file never had" in message and "2" in message


def test_error_resume_with_nothing_to_resume(work, tmp_path):
    message = _refine_error(work, "--train", str(work["train"]), "--out", str(tmp_path / "empty"), "--resume")
    assert "no finished checkpoint" in message
    assert "--resume needs --out" in _refine_error(work, "--train", str(work["train"]), "--resume")


def test_error_model_cannot_take_the_variant(work, tmp_path):
    """ALBERT calls one shared attention module in every layer: SAOBP cannot be limited to some layers."""
    res = _invoke(["refine", str(work["albert"]), "--train", str(work["train"]), "--variant", "bp-high",
                   "--bp-layers", "1", "--out", str(tmp_path / "o"), "--epochs", "1", "--device", "cpu"])
    assert res.exit_code == 1 and "--bp-layers all" in res.stderr, res.stderr
    assert not (tmp_path / "o" / "run.json").exists()


def test_library_errors_are_attnprobe_errors(work, tmp_path):
    from attnprobe.training.refine import refine

    with pytest.raises(AttnprobeError, match="--bp-layers"):
        refine(_cfg(work, tmp_path / "o", "bp-high", bp_layers="5"))
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(AttnprobeError, match="pass --resume"):
        refine(_cfg(work, crashed, "bp-high"))


# ---- sample configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, variant, gamma", [("refine-bp-high.toml", "bp-high", 0.9),
                                                  ("refine-bp-low.toml", "bp-low", 0.5)])
def test_sample_configs_parse(name, variant, gamma):
    cfg = build_config(RefineConfig, str(REPO / "sample_configs" / name), "refine", {})
    assert cfg.variant == variant and cfg.effective_gamma == gamma
    assert cfg.train and cfg.train.endswith("train.tsv")
    override = build_config(RefineConfig, str(REPO / "sample_configs" / name), "refine", {"epochs": 1.0})
    assert override.epochs == 1.0
