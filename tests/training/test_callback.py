"""The Trainer callback: a real Trainer run with report_to=["tensorboard"], read back with TensorBoard's own
event reader, and every probe's rows against a separate scan of the checkpoint saved at that step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import attnprobe
from attnprobe.errors import AttnprobeError
from attnprobe import saobp
from attnprobe.training.callback import DIAGNOSTICS_FILE, AttentionDiagnosticsCallback, scalars
from attnprobe.scanning.tables import METRIC_COLUMNS
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.slow

TEXTS = ["The cat sat on the mat.", "A good film, good acting.", "Bad weather again, bad mood.",
         "She reads a book by the window.", "Two dogs ran across the park quickly.", "Why?",
         "The committee approved the budget after a long debate.", "Rain."]
STEPS, EVERY = 4, 2


class _Examples(torch.utils.data.Dataset):
    def __init__(self, tokenizer, n: int):
        words = ["good", "bad", "film", "day", "cat", "rain", "park", "book"]
        self.items = [{**tokenizer(" ".join(words[(i + k) % 8] for k in range(3 + i % 4)), truncation=True),
                       "labels": i % 2} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def train(model, tokenizer, out: Path, callback_kwargs: dict, report_to=("tensorboard",)):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=5e-3, warmup_steps=0, save_strategy="steps", save_steps=EVERY, eval_strategy="steps",
        eval_steps=STEPS, eval_on_start=True, logging_steps=1, report_to=list(report_to), use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=_Examples(tokenizer, 16),
                      eval_dataset=_Examples(tokenizer, 8), processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer))
    callback = AttentionDiagnosticsCallback(trainer=trainer, **callback_kwargs)
    trainer.add_callback(callback)
    trainer.train()
    return trainer, callback


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("bert", tmp_path_factory.mktemp("hf") / "bert", task="sequence-classification")


def _load(folder: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return (AutoModelForSequenceClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module", params=["plain", "bp-high"])
def run(request, folder, tmp_path_factory):
    model, tokenizer = _load(folder)
    assert model.config._attn_implementation == "sdpa"  # not attnprobe's: the callback switches it in
    if request.param != "plain":
        saobp.apply(model, request.param)
    out = tmp_path_factory.mktemp(f"run-{request.param}")
    trainer, callback = train(model, tokenizer, out, dict(texts=TEXTS, every_n_steps=EVERY, max_length=32))
    return {"variant": request.param, "out": out, "model": model, "trainer": trainer, "callback": callback}


def _scan(model, **kw):
    return attnprobe.scan(model, texts=TEXTS, max_length=32, **kw).heads


def _numbers(df):
    return df[list(METRIC_COLUMNS)].to_numpy(float)


def test_parquet_has_one_block_per_probe_equal_to_a_scan_of_the_checkpoint(run, folder):
    rows = pd.read_parquet(run["out"] / DIAGNOSTICS_FILE)
    assert list(rows.columns[:2]) == ["step", "epoch"]
    heads_columns = list(_scan(folder).columns)
    assert list(rows.columns[2:]) == heads_columns
    # step 0 from the evaluation on start, 2 and 4 from every_n_steps (the evaluation at 4 is not probed twice)
    assert rows.groupby("step").size().to_dict() == {0: 8, 2: 8, 4: 8}  # 2 layers x 4 heads each
    for step in (EVERY, STEPS):
        block = rows[rows["step"] == step].reset_index(drop=True)
        ref = _scan(run["out"] / f"checkpoint-{step}")
        assert block["queries"].tolist() == ref["queries"].tolist()
        np.testing.assert_allclose(_numbers(block), _numbers(ref), rtol=1e-5, atol=1e-6, equal_nan=True)
        flags = [c for c in heads_columns if rows[c].dtype == bool]
        assert (block[flags] == ref[flags]).all().all()
    refined = rows["bp_shift"].notna()
    assert refined.all() if run["variant"] != "plain" else not refined.any()


def test_first_block_is_the_model_before_training(run, folder):
    model, _ = _load(folder)
    if run["variant"] != "plain":
        saobp.apply(model, run["variant"])
    rows = pd.read_parquet(run["out"] / DIAGNOSTICS_FILE)
    np.testing.assert_allclose(_numbers(rows[rows["step"] == 0]), _numbers(_scan(model, tokenizer=folder)),
                               rtol=1e-5, atol=1e-6, equal_nan=True)


def test_tensorboard_event_files_hold_the_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(run["out"].rglob("events.out.tfevents*"))
    assert files
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = pd.read_parquet(run["out"] / DIAGNOSTICS_FILE)
    for step in (0, EVERY, STEPS):
        expected = scalars(rows[rows["step"] == step].reset_index(drop=True))
        assert "attnprobe/collapsed_heads" in expected and "attnprobe/layer_1/gtd" in expected
        for name, value in expected.items():
            tag = "train/" + name  # the Trainer's TensorBoard callback prefixes keys that are not eval_/test_
            assert tag in tags, tag
            logged = {e.step: e.value for e in acc.Scalars(tag)}
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
    assert ("train/attnprobe/layer_0/bp_shift" in tags) == (run["variant"] != "plain")


def test_log_history_and_the_model_after_training(run):
    logged = [e for e in run["trainer"].state.log_history if "attnprobe/flagged_heads" in e]
    assert [e["step"] for e in logged] == [0, EVERY, STEPS]
    model = run["model"]
    assert model.config._attn_implementation == ("sdpa" if run["variant"] == "plain" else "saobp")
    assert len(run["callback"].frames) == 3


def test_per_layer_scalars_are_head_means(run):
    rows = pd.read_parquet(run["out"] / DIAGNOSTICS_FILE)
    block = rows[rows["step"] == STEPS]
    got = scalars(block.reset_index(drop=True))
    for layer in (0, 1):
        heads = block[block["layer"] == layer]
        assert got[f"attnprobe/layer_{layer}/direct_entropy_norm"] == pytest.approx(heads["direct_entropy_norm"].mean())
        assert got[f"attnprobe/layer_{layer}/gtd"] == pytest.approx(heads["gtd"].mean())
    assert got["attnprobe/collapsed_heads"] == int(block["collapsed"].sum())


def test_callback_without_trainer_or_texts_is_refused(folder, tmp_path):
    with pytest.raises(AttnprobeError, match="texts"):
        AttentionDiagnosticsCallback()
    with pytest.raises(AttnprobeError, match="model"):
        AttentionDiagnosticsCallback(texts=TEXTS, model="minilm-l6")
    with pytest.raises(AttnprobeError, match="never probes"):
        AttentionDiagnosticsCallback(texts=TEXTS, on_evaluate=False)
    model, tokenizer = _load(folder)
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Examples(tokenizer, 4), processing_class=tokenizer,
                      callbacks=[AttentionDiagnosticsCallback(texts=TEXTS, every_n_steps=1)])
    with pytest.raises(AttnprobeError, match="trainer=trainer"):
        trainer.train()


def test_data_file_and_rows_appended_to_an_existing_file(folder, tmp_path):
    model, tokenizer = _load(folder)
    corpus = tmp_path / "probe.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    train(model, tokenizer, out, dict(data=str(corpus), on_evaluate=False, every_n_steps=STEPS), report_to=())
    first = pd.read_parquet(out / DIAGNOSTICS_FILE)
    assert first["step"].unique().tolist() == [STEPS]
    np.testing.assert_allclose(_numbers(first), _numbers(_scan(out / f"checkpoint-{STEPS}")), rtol=1e-5,
                               atol=1e-6, equal_nan=True)
    train(model, tokenizer, out, dict(data=str(corpus), on_evaluate=False, every_n_steps=STEPS), report_to=())
    both = pd.read_parquet(out / DIAGNOSTICS_FILE)
    assert len(both) == 2 * len(first)
    pd.testing.assert_frame_equal(both.iloc[:len(first)], first)
    json.dumps(both.to_dict(orient="records"), default=str)


def test_the_documented_example_script_runs(folder, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    script = root / "examples" / "train_with_callback.py"
    assert "examples/train_with_callback.py" in (root / "docs" / "integrations.md").read_text(encoding="utf-8")
    out = tmp_path / "example"
    proc = subprocess.run([sys.executable, str(script), "--model", str(folder), "--out", str(out), "--max-steps", "8"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pd.read_parquet(out / DIAGNOSTICS_FILE)
    assert sorted(rows["step"].unique()) == [0, 4, 8]
    assert list(out.rglob("events.out.tfevents*"))


_WORKER = '''
import sys
from pathlib import Path
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments
from attnprobe.training.callback import AttentionDiagnosticsCallback
from tests.training.test_callback import TEXTS, _Examples

folder, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForSequenceClassification.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=batch, per_device_eval_batch_size=2,
                         eval_strategy="steps", eval_steps=2, eval_on_start=True, save_strategy="no", report_to=[],
                         use_cpu=True, disable_tqdm=True, seed=0, dataloader_pin_memory=False)
trainer = Trainer(model=model, args=args, train_dataset=_Examples(tokenizer, 16), eval_dataset=_Examples(tokenizer, 4),
                  processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer))
trainer.add_callback(AttentionDiagnosticsCallback(texts=TEXTS, every_n_steps=1, max_length=32, trainer=trainer))
trainer.train()
'''


def test_callback_under_two_gloo_processes_equals_one(folder, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {}
    for name, launcher, batch in [("one", [], 4), ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                           "--master_port", str(port)], 2)]:
        out = tmp_path / name
        proc = subprocess.run([sys.executable, *launcher, str(worker), str(folder), str(out), str(batch)],
                              capture_output=True, text=True, timeout=400, env=env, cwd=root, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = pd.read_parquet(out / DIAGNOSTICS_FILE)
    one, two = runs["one"], runs["two"]
    assert one["step"].tolist() == two["step"].tolist()  # written once, by the main process
    assert sorted(one["step"].unique()) == [0, 1, 2]
    # each process probes half of the texts; the all-reduced sums cover all of them
    assert two["queries"].tolist() == one["queries"].tolist()
    before = one["step"] == 0  # the untrained model: equal up to float summation order
    np.testing.assert_allclose(_numbers(two[before]), _numbers(one[before]), rtol=1e-6, atol=1e-7, equal_nan=True)
