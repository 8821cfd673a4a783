"""refine's diagnostics from the Trainer's own evaluation pass: one forward pass per eval batch, and the same
numbers as a separate scan of the eval set (passes.run_batches) at that point, with shuffled and padded
eval batches, text pairs and sequences too short to count."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from attnprobe.data import sources
from attnprobe.scanning import passes, tables
from attnprobe.config import RefineConfig, Thresholds
from attnprobe.capture.evalprobe import EvalProbe
from attnprobe.capture.probe import Probe, capturing
from tests.conftest import make_tiny_model
from tests.training.test_refine import FILLER, TRAIN_OPTIONS, write_rows

pytestmark = pytest.mark.slow

EVAL_ROWS, EVAL_BATCH = 14, 4  # a short last batch
NUMERIC = ["queries", *tables.METRIC_COLUMNS, "nonfinite"]


def _varied(path, n: int, seed: int):
    """Sentences of 1 to 20 words, so eval batches pad a lot and length grouping reorders them."""
    rng = random.Random(seed)
    rows = [f"{' '.join(rng.choice(FILLER) for _ in range(rng.randint(1, 20)))} {'good' if i % 2 else 'bad'}\t{i % 2}"
            for i in range(n)]
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalprobe")
    return {"root": root, "bert": make_tiny_model("bert", root / "bert", task="sequence-classification"),
            "train": write_rows(root / "train.tsv", 24, seed=1), "dev": _varied(root / "dev.tsv", EVAL_ROWS, 2),
            "pairs-train": write_rows(root / "pairs-train.tsv", 24, seed=3, pairs=True),
            "pairs-dev": write_rows(root / "pairs-dev.tsv", EVAL_ROWS, seed=4, pairs=True)}


class _CountEvalForwards(TrainerCallback):
    """Counts the model's forward calls in eval mode (the eval set's passes) between two evaluations."""

    def __init__(self):
        self.calls = 0
        self.per_evaluation: list[int] = []
        self._seen = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs):
            if not module.training:
                self.calls += 1
        model.register_forward_pre_hook(hook)

    def on_evaluate(self, args, state, control, **kwargs):  # runs after the diagnostics (recorder first)
        self.per_evaluation.append(self.calls - self._seen)
        self._seen = self.calls


class _KeepModelStates(TrainerCallback):
    """Copies of the encoder's weights at every evaluation, to scan the model as it was then."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def _refine(work, name: str, *, pairs: bool = False, **extra):
    from attnprobe.training.refine import refine

    counter, states = _CountEvalForwards(), _KeepModelStates()
    cfg = RefineConfig(model=str(work["bert"]), train=str(work["pairs-train" if pairs else "train"]),
                       eval=str(work["pairs-dev" if pairs else "dev"]), out=str(work["root"] / name),
                       variant="bp-high", eval_batch_size=EVAL_BATCH, **{**TRAIN_OPTIONS, **extra})
    return refine(cfg, callbacks=[counter, states]), counter, states.states


@pytest.fixture(scope="module")
def grouped_run(work):
    # group_by_length also makes the Trainer's eval sampler reorder the eval set by length
    return _refine(work, "grouped", group_by_length=True)


def _separate_scan(result, state: dict[str, torch.Tensor]) -> pd.DataFrame:
    """The head table of a separate scan (passes.run_batches) of the eval set with the model at ``state``."""
    from attnprobe.models import loading

    loaded = loading.load_model(str(result.out_dir / "model"), device="cpu")  # the run's architecture and SAOBP
    net = loaded.model
    missing, _ = net.load_state_dict({k.removeprefix("bert."): v for k, v in state.items()
                                      if k.startswith("bert.")}, strict=False)
    assert not [k for k in missing if "pooler" not in k], missing
    net.eval()
    ev = result.eval_data
    chunk = sources.Chunk(ev.texts, ev.pairs, None, list(range(len(ev.texts))))
    probe, counts = passes.run_batches(loaded, [chunk], batch_size=EVAL_BATCH, max_length=32, hops=2)
    assert counts["sequences"] == len(ev.texts)
    return tables.head_frame(probe.totals(), Thresholds())


def _assert_same_diagnostics(result, states):
    epochs = sorted(result.diagnostics["epoch"].unique())
    assert len(epochs) == len(states)
    for epoch, state in zip(epochs, states):
        got = result.diagnostics[result.diagnostics["epoch"] == epoch].reset_index(drop=True)
        expected = _separate_scan(result, state)
        assert got["queries"].tolist() == expected["queries"].tolist()
        assert got["queries"].sum() > 0
        np.testing.assert_allclose(got[NUMERIC].to_numpy(float), expected[NUMERIC].to_numpy(float),
                                   rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=f"epoch {epoch}")
        assert got["bp_shift"].notna().all() and (got["bp_shift"] > 0).all()  # bp-high: SAOBP was probed
        for flag in tables.FLAG_COLUMNS:
            assert got[flag].tolist() == expected[flag].tolist(), flag


def test_one_forward_pass_per_eval_batch(grouped_run):
    result, counter, _ = grouped_run
    batches = math.ceil(EVAL_ROWS / EVAL_BATCH)
    assert len(counter.per_evaluation) == len(result.history) == 3  # epochs 0, 1, 2
    assert counter.per_evaluation == [batches] * 3  # a separate diagnostics scan would double these
    assert len(result.diagnostics) == 3 * 2 * 4  # every evaluation has its diagnostics


def test_diagnostics_equal_a_separate_scan_at_every_evaluation(grouped_run):
    result, _, states = grouped_run
    _assert_same_diagnostics(result, states)


def test_diagnostics_equal_a_separate_scan_with_text_pairs(work):
    result, counter, states = _refine(work, "pairs", pairs=True, epochs=1.0)
    assert counter.per_evaluation == [math.ceil(EVAL_ROWS / EVAL_BATCH)] * 2
    _assert_same_diagnostics(result, states)


def test_scores_equal_the_plain_trainer(work, grouped_run, monkeypatch):
    """Probing the evaluation pass changes nothing the Trainer computes: the same losses and scores as a run
    whose diagnostics come from a separate scan."""
    from attnprobe.capture import evalprobe

    result, _, _ = grouped_run
    monkeypatch.setattr(evalprobe, "supported", lambda loaded, args: False)  # the separate-scan path
    plain, counter, _ = _refine(work, "grouped-plain", group_by_length=True)
    assert counter.per_evaluation == [2 * math.ceil(EVAL_ROWS / EVAL_BATCH)] * 3  # what this change removes
    pd.testing.assert_frame_equal(result.history, plain.history)
    num = ["queries", *tables.METRIC_COLUMNS]
    np.testing.assert_allclose(result.diagnostics[num].to_numpy(float), plain.diagnostics[num].to_numpy(float),
                               rtol=1e-5, atol=1e-6, equal_nan=True)


def test_eval_probe_skips_sequences_shorter_than_two_tokens(tiny_bert):
    from attnprobe.models import loading

    loaded = loading.load_model(str(tiny_bert), device="cpu")
    tok = loaded.tokenizer
    enc = tok(["the film was good", "bad", "a really quite long plot was thin"], padding=True, return_tensors="pt")
    enc["attention_mask"][1, 1:] = 0  # a one-token sequence: scan would skip it
    enc["input_ids"][1, 1:] = tok.pad_token_id
    probe = EvalProbe.for_model(loaded, hops=2)
    probe.start()
    with torch.no_grad():
        probe.run(dict(enc), lambda: loaded.model(**enc))
    got = probe.take()
    assert probe.take() is None  # taken once
    assert probe.sequences == 2

    reference = Probe(loaded.num_layers, hops=2)  # the two long rows alone
    rows = [0, 2]
    batch = {k: v[rows] for k, v in enc.items()}
    keep = batch["attention_mask"].bool()
    special = torch.isin(batch["input_ids"], torch.tensor(tok.all_special_ids)) & keep
    reference.begin(keep, special)
    with torch.no_grad(), capturing(reference):
        loaded.model(**batch)
    reference.end()
    for name, value in reference.totals().items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-9, equal_nan=True, msg=name)
