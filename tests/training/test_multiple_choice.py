"""refine --task multiple-choice: the HellaSwag and RACE layouts and named columns, errors, a learnable toy set
whose accuracy rises and equals its predictions.jsonl, diagnostics over every choice's sequence, reloading in
plain transformers, a masked-LM run fine-tuned further, and two processes against one."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from attnprobe.cli import app
from attnprobe.errors import AttnprobeError
from attnprobe.runtime import outputs
from attnprobe.training.multiple_choice import read_choices
from tests.conftest import make_tiny_model
from tests.data.test_datasets_folder import write_dataset_folder

FILLER = "the a man woman walks runs into house car street slowly then".split()
COLUMNS = dict(context_column=None, question_column=None, choices_column=None, label_column=None, encoding="utf-8")


def hellaswag_rows(n: int, seed: int) -> list[dict]:
    """Four endings; the right one says 'bad bad', the others 'good good': learnable by a tiny model, and the
    untrained tiny model happens to prefer 'good', so its accuracy starts near 0 (asserted below)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.randrange(4)
        endings = [" ".join(rng.choices(FILLER, k=3)) + (" bad bad" if k == label else " good good") for k in range(4)]
        rows.append({"ind": i, "ctx_a": " ".join(rng.choices(FILLER, k=6)), "ctx_b": "then he",
                     "endings": endings, "label": label})
    return rows


def race_rows(n: int, seed: int) -> list[dict]:
    return [{"example_id": f"r{i}", "article": r["ctx_a"], "question": "what _ next?", "options": r["endings"],
             "answer": "ABCD"[r["label"]]} for i, r in enumerate(hellaswag_rows(n, seed))]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_layouts_read_alike(tmp_path):
    rows = hellaswag_rows(6, 0)
    hs = read_choices(str(write_jsonl(tmp_path / "hs.jsonl", rows)), SimpleNamespace(**COLUMNS))
    assert hs.stats["layout"] == "hellaswag" and hs.labels == [r["label"] for r in rows] and hs.ids == list(range(6))
    assert hs.firsts[0] == [rows[0]["ctx_a"]] * 4
    assert hs.seconds[0] == [f"then he {e}" for e in rows[0]["endings"]]
    pd.DataFrame(race_rows(6, 0)).to_parquet(tmp_path / "race.parquet")
    race = read_choices(str(tmp_path / "race.parquet"), SimpleNamespace(**COLUMNS))
    assert race.stats["layout"] == "race" and race.labels == hs.labels and race.ids == [f"r{i}" for i in range(6)]
    assert race.seconds[0] == [f"what {e} next?" for e in rows[0]["endings"]]  # the blank filled
    named = [{"story": r["ctx_a"], "ask": "which?", "opts": r["endings"], "gold": r["label"]} for r in rows]
    folder = write_dataset_folder(tmp_path / "named", named)
    cfg = SimpleNamespace(**{**COLUMNS, "context_column": "story", "question_column": "ask",
                             "choices_column": "opts", "label_column": "gold"})
    got = read_choices(str(folder), cfg)
    assert got.labels == hs.labels and got.seconds[0] == [f"which? {e}" for e in rows[0]["endings"]]


def test_bad_rows_fail_with_one_line(tmp_path):
    rows = hellaswag_rows(4, 1)
    rows[2]["label"] = 4
    with pytest.raises(AttnprobeError, match="row 3 has the label 4, out of range for its 4 choices"):
        read_choices(str(write_jsonl(tmp_path / "a.jsonl", rows)), SimpleNamespace(**COLUMNS))
    rows = hellaswag_rows(4, 1)
    rows[1]["endings"] = rows[1]["endings"][:3]
    with pytest.raises(AttnprobeError, match="row 2 has 3 choices where row 1 has 4"):
        read_choices(str(write_jsonl(tmp_path / "b.jsonl", rows)), SimpleNamespace(**COLUMNS))
    with pytest.raises(AttnprobeError, match="neither the HellaSwag .* nor the RACE layout"):
        read_choices(str(write_jsonl(tmp_path / "c.jsonl", [{"x": 1}])), SimpleNamespace(**COLUMNS))
    with pytest.raises(AttnprobeError, match="has no column 'opts' \\(given with --choices-column\\)"):
        read_choices(str(write_jsonl(tmp_path / "d.jsonl", hellaswag_rows(2, 0))),
                     SimpleNamespace(**{**COLUMNS, "context_column": "ctx_a", "choices_column": "opts"}))


# ---- runs ------------------------------------------------------------------------------------------

OPTIONS = ["--task", "multiple-choice", "--batch-size", "8", "--lr", "1e-2", "--warmup-ratio", "0", "--max-length",
           "24", "--device", "cpu", "--seed", "0", "--no-checkpoints"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc")
    model = make_tiny_model("bert", root / "bert")
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # two processes equal one
    (model / "config.json").write_text(json.dumps(config))
    return {"root": root, "model": model, "train": write_jsonl(root / "train.jsonl", hellaswag_rows(64, 1)),
            "dev": write_jsonl(root / "dev.jsonl", hellaswag_rows(16, 2))}


@pytest.fixture(scope="module")
def mc_run(work):
    out = work["root"] / "run"
    res = CliRunner().invoke(app, ["refine", str(work["model"]), "--train", str(work["train"]), "--eval",
                                   str(work["dev"]), "--variant", "bp-high", "--epochs", "3", *OPTIONS, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_accuracy_rises_and_equals_the_predictions(work, mc_run):
    history = pd.read_parquet(mc_run / outputs.HISTORY)
    assert list(history.columns) == ["epoch", "step", "train_loss", "eval_loss", "accuracy"]
    assert history["accuracy"].iloc[0] <= 0.25 and history["accuracy"].iloc[-1] >= 0.9, history
    assert history["eval_loss"].iloc[0] == pytest.approx(np.log(4), abs=0.05)  # chance before training
    assert history["eval_loss"].iloc[-1] < np.log(4) / 3
    preds = [json.loads(line) for line in (mc_run / "predictions.jsonl").read_text().splitlines()]
    labels = [r["label"] for r in hellaswag_rows(16, 2)]
    assert [p["id"] for p in preds] == list(range(16))
    right = np.mean([p["prediction"] == y for p, y in zip(preds, labels)])
    meta = outputs.read_run_json(mc_run)
    assert history["accuracy"].iloc[-1] == pytest.approx(right) == meta["final"]["accuracy"]
    assert meta["diagnostics_from"] == "evaluation"


@pytest.mark.slow
def test_diagnostics_cover_every_choice_sequence(work, mc_run):
    """Epoch 0's diagnostics, taken in the evaluation pass over (B, C, L) batches, equal a separate scan of the
    16 x 4 (context, ending) pairs by the untrained model with the same SAOBP settings."""
    from attnprobe.data import sources
    from attnprobe.formulas.saobp import SaobpSettings
    from attnprobe.models import loading
    from attnprobe.scanning import passes, tables

    data = read_choices(str(work["dev"]), SimpleNamespace(**COLUMNS))
    firsts = [t for x in data.firsts for t in x]
    seconds = [t for x in data.seconds for t in x]
    loaded = loading.load_model(str(work["model"]), device="cpu", saobp=SaobpSettings(gamma=0.9, variant="bp-high"))
    probe, _ = passes.run_batches(loaded, [sources.Chunk(firsts, seconds, None, list(range(len(firsts))))],
                                   batch_size=8, max_length=24, hops=2)
    expected = tables.head_frame(probe.totals(), __import__("attnprobe.config", fromlist=["Thresholds"]).Thresholds())
    diag = pd.read_parquet(mc_run / outputs.DIAGNOSTICS)
    first = diag[diag["epoch"] == 0.0].reset_index(drop=True)
    assert first["queries"].tolist() == expected["queries"].tolist()
    for col in tables.METRIC_COLUMNS:
        np.testing.assert_allclose(first[col].to_numpy(float), expected[col].to_numpy(float), atol=1e-5,
                                   equal_nan=True, err_msg=col)


@pytest.mark.slow
def test_model_reloads_with_saobp_in_plain_transformers(work, mc_run):
    code = (
        "import json, sys, torch, attnprobe\n"
        "from types import SimpleNamespace\n"
        "from transformers import AutoModelForMultipleChoice, AutoTokenizer\n"
        "from attnprobe.training.multiple_choice import ChoiceCollator, encode, read_choices\n"
        "m = AutoModelForMultipleChoice.from_pretrained(sys.argv[1]).eval()\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "cols = dict(context_column=None, question_column=None, choices_column=None, label_column=None, encoding='utf-8')\n"
        "batch = ChoiceCollator(tok)(encode(tok, read_choices(sys.argv[2], SimpleNamespace(**cols)), 24))\n"
        "with torch.no_grad():\n"
        "    logits = m(**{k: v for k, v in batch.items() if k != 'labels'}).logits\n"
        "print(json.dumps({'impl': m.config._attn_implementation, 'saobp': m.config.saobp,\n"
        "                  'preds': logits.argmax(-1).tolist()}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(mc_run / "model"), str(work["dev"])], capture_output=True,
                          text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["impl"] == "saobp" and got["saobp"]["variant"] == "bp-high"
    preds = [json.loads(line)["prediction"] for line in (mc_run / "predictions.jsonl").read_text().splitlines()]
    assert got["preds"] == preds


@pytest.mark.slow
def test_fine_tunes_a_masked_lm_run(work, tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(" ".join(random.Random(i).choices(FILLER, k=12)) for i in range(24)))
    pre = tmp_path / "pre"
    res = CliRunner().invoke(app, ["refine", str(work["model"]), "--task", "masked-lm", "--train", str(docs),
                                   "--variant", "bp-low", "--epochs", "1", "--batch-size", "8", "--max-length", "24",
                                   "--device", "cpu", "--no-checkpoints", "--out", str(pre)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "mc"
    res = CliRunner().invoke(app, ["refine", str(pre / "model"), "--train", str(work["train"]), "--max-train-samples",
                                   "16", "--epochs", "1", *OPTIONS, "--out", str(out)])
    assert res.exit_code == 0, res.output
    meta = outputs.read_run_json(out)
    assert meta["variant"] == "bp-low" and meta["variant_from"] != "--variant"  # inherited from the masked-LM run
    assert meta["parent"] is not None and meta["task"] == "multiple-choice"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(work):
    """torchrun, 2 CPU processes x batch 4 against 1 x batch 8: the same accuracy, losses and diagnostics
    (each process probes its share of the (B, C, L) eval batches; the per-question sums are gathered)."""
    runs = {}
    for name, launcher, batch in (("one", [], 8),
                                  ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                           str(_free_port())], 4)):
        out = work["root"] / f"procs-{name}"
        args = [sys.executable, *launcher, "-m", "attnprobe", "refine", str(work["model"]), "--train",
                str(work["train"]), "--eval", str(work["dev"]), "--variant", "bp-high", "--epochs", "1", *OPTIONS,
                "--batch-size", str(batch), "--patterns", "0", "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run(args, capture_output=True, text=True, check=False, env=env, timeout=400,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = out
    one, two = (outputs.read_run_json(runs[k]) for k in ("one", "two"))
    assert two["processes"] == 2 and one["processes"] == 1 and two["steps"] == one["steps"]
    for key in ("eval_loss", "accuracy"):
        assert two["final"][key] == pytest.approx(one["final"][key], abs=1e-4), key
    d1, d2 = (pd.read_parquet(runs[k] / outputs.DIAGNOSTICS) for k in ("one", "two"))
    assert d2["queries"].tolist() == d1["queries"].tolist()
    num = [c for c in d1.select_dtypes("number").columns if c not in ("epoch", "step", "layer", "head")]
    np.testing.assert_allclose(d2[num].to_numpy(float), d1[num].to_numpy(float), atol=1e-4, equal_nan=True)
    assert (runs["two"] / "predictions.jsonl").read_text() == (runs["one"] / "predictions.jsonl").read_text()


@pytest.mark.parametrize("bad, message", [
    ("label", "row 3 has the label 7, out of range for its 4 choices"),
    ("columns", "is in neither the HellaSwag"),
])
def test_bad_input_exits_1_with_one_line_and_writes_nothing(tmp_path, tiny_bert, bad, message):
    rows = hellaswag_rows(6, 3)
    if bad == "label":
        rows[2]["label"] = 7
    else:
        rows = [{"story": r["ctx_a"], "opts": r["endings"], "label": r["label"]} for r in rows]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["refine", str(tiny_bert), "--train", str(train), *OPTIONS, "--out", str(out)])
    assert res.exit_code == 1
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not (out / outputs.RUN_JSON).exists() and not (out / "model").exists()
