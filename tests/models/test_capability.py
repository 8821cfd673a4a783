"""Any encoder: tiny random models of many architectures against a one-at-a-time float64 reference.

Each model (tests/tiny_encoders.py: 2 layers, hidden 32, every 2-D weight from N(0, 0.2)) is built
once per session, scanned by attnprobe at batch size 4, and compared with eager ``output_attentions``
of one sentence at a time, reduced by the numpy loops of tests/reference.py. Architectures attnprobe
cannot read must be refused with one clear line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import attnprobe
from attnprobe.errors import AttnprobeError
from attnprobe.models import loading
from attnprobe.runtime import outputs
from tests.tiny_encoders import SENTENCES, largest_difference, make_encoder, reference_heads

SCANNED = (
    "bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "deberta", "deberta-v2", "mpnet",
    "ernie", "roformer", "megatron-bert", "rembert", "squeezebert", "mobilebert", "convbert",
    "convbert-ratio1", "ibert", "xmod", "layoutlm", "lilt", "markuplm", "splinter", "data2vec-text",
    "roc_bert", "modernbert", "big_bird", "nystromformer", "esm", "flaubert",
)
UNPADDED = {"mobilebert", "convbert", "convbert-ratio1", "nystromformer"}  # attention changes with padding
REFUSED = {
    "longformer": "Longformer's attention is banded, not n x n",
    "funnel": "Funnel's attention is pooled",
    "canine": "Canine's attention is pooled",
    "yoso": "Yoso's attention of layer 0 is 3-D",
    "fnet": "FNet returns no attention weights",
    "mra": "Mra returns no attention weights",
    "bros": "Bros fails on a plain-text check sentence (You have to specify bbox)",
    "big_bird-sparse": "BigBird's block-sparse attention is not n x n",
}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """``{kind: folder}`` for every architecture above, built once."""
    root = tmp_path_factory.mktemp("zoo")
    return {kind: make_encoder(kind, root / kind) for kind in (*SCANNED, *REFUSED)}


def _scan(folder, **options):
    options = {"batch_size": 4, "dtype": "float64", "device": "cpu", **options}
    return attnprobe.scan(str(folder), texts=SENTENCES, **options)


@pytest.mark.parametrize("kind", SCANNED)
def test_batched_scan_agrees_with_one_sentence_at_a_time(zoo, kind):
    result = _scan(zoo[kind])
    assert largest_difference(result.heads, reference_heads(zoo[kind], SENTENCES)) < 1e-7
    assert result.meta["padding"] == ("none" if kind in UNPADDED else "right")
    assert result.meta["model"]["padding"] == result.meta["padding"]


def test_heads_come_from_the_attention_itself(zoo):
    """ConvBERT's head_ratio 2 leaves 2 attention heads of num_attention_heads 4."""
    loaded = loading.load_model(str(zoo["convbert"]), device="cpu")
    assert loaded.num_heads == 2 and loaded.info["heads"] == 2 and loaded.info["heads_in_config"] == 4
    assert loaded.backend == "eager-outputs"


def test_padding_check_is_what_makes_unpadded_models_right(zoo, monkeypatch):
    """With the check switched off, a padding-dependent model disagrees with the reference: the test can fail."""
    from attnprobe.models import capability

    real = capability.inspect

    def padded_anyway(*args, **kwargs):
        cap = real(*args, **kwargs)
        cap.padding = "right"
        return cap

    monkeypatch.setattr(capability, "inspect", padded_anyway)
    result = _scan(zoo["mobilebert"])
    assert largest_difference(result.heads, reference_heads(zoo["mobilebert"], SENTENCES)) > 1e-4


def test_scores_are_never_read_as_probabilities(zoo, monkeypatch):
    """SqueezeBERT returns scores; without proof that their softmax is what it uses, it is refused."""
    from attnprobe.models import capability

    monkeypatch.setattr(capability, "_softmax_is_what_it_uses", lambda *a: False)
    with pytest.raises(AttnprobeError, match="SqueezeBert's output_attentions are not probabilities"):
        loading.load_model(str(zoo["squeezebert"]), device="cpu")


def test_unpadded_scan_says_so(zoo, in_tmp):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    res = CliRunner().invoke(app, ["scan", str(zoo["mobilebert"]), "--text", "one two three", "--text", "four",
                                   "--out", "run", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "scanned without padding" in res.output
    meta = json.loads((in_tmp / "run" / "run.json").read_text())
    assert meta["padding"] == "none" and any("without padding" in n for n in meta["notices"])


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refusal_is_one_clear_line(zoo, kind, in_tmp):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    res = CliRunner().invoke(app, ["scan", str(zoo[kind]), "--text", "a sentence to scan", "--out", "run",
                                   "--device", "cpu"])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert REFUSED[kind] in lines[0]
    assert "Traceback" not in res.output and not (in_tmp / "run").exists()


# ---- validation of the output_attentions fallback ---------------------------------------------------


def test_checked_probs_refuses_bad_tensors():
    import torch

    from attnprobe.models.capability import checked_probs

    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    good = torch.softmax(torch.randn(2, 3, 4, 4, dtype=torch.float64).masked_fill(~keep[:, None, None, :], -1e9), -1)
    assert len(checked_probs((good, good), keep, "X", 2, 3, None)) == 2
    with pytest.raises(AttnprobeError, match="not probabilities.*sum to"):
        checked_probs((good * 0.5, good), keep, "X", 2, 3, None)
    with pytest.raises(AttnprobeError, match="negative weights"):
        checked_probs((good - 0.1, good), keep, "X", 2, 3, None)
    leaky = good.clone()
    leaky[0, :, :, 3] = 0.5
    with pytest.raises(AttnprobeError, match="weight on padding"):
        checked_probs((leaky, good), keep, "X", 2, 3, None)
    with pytest.raises(AttnprobeError, match="banded"):
        checked_probs((good[..., :3], good), keep, "X", 2, 3, None)
    with pytest.raises(AttnprobeError, match="3 heads, not 2"):
        checked_probs((good, good), keep, "X", 2, 2, None)
    with pytest.raises(AttnprobeError, match="3 attention layers"):
        checked_probs((good, good, good), keep, "X", 2, 3, None)
    with pytest.raises(AttnprobeError, match="no attention weights"):
        checked_probs(None, keep, "X", 2, 3, None)
    scores = torch.log(good)
    assert torch.allclose(checked_probs((scores, scores), keep, "X", 2, 3, "softmax")[0][keep[:, None, :, None]
                                                                                        .expand_as(good)],
                          good[keep[:, None, :, None].expand_as(good)])


def test_padded_query_rows_and_nonfinite_rows_are_not_checked():
    import torch

    from attnprobe.models.capability import probability_problem

    keep = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    probs = torch.tensor([[[[0.5, 0.5, 0.0], [float("nan")] * 3, [9.0, 9.0, 9.0]]]])
    assert probability_problem(probs, keep) is None


# ---- tokenizers ----------------------------------------------------------------------------------


@pytest.fixture()
def no_tokenizer(zoo, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(zoo["bert"] / name, folder / name)
    return folder


def test_folder_without_tokenizer_is_an_error(no_tokenizer, in_tmp):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    with pytest.raises(AttnprobeError, match="has no tokenizer files.*--tokenizer PATH_OR_ALIAS"):
        loading.load_model(str(no_tokenizer), device="cpu")
    res = CliRunner().invoke(app, ["scan", str(no_tokenizer), "--text", "hello there", "--out", "run"])
    assert res.exit_code == 1 and "has no tokenizer files" in res.output
    assert not (in_tmp / "run").exists()


def test_tokenizer_option_takes_it_from_elsewhere(no_tokenizer, zoo, in_tmp):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    res = CliRunner().invoke(app, ["scan", str(no_tokenizer), "--tokenizer", "minilm-l6", "--text", "hello there",
                                   "--out", "run", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    meta = json.loads((in_tmp / "run" / "run.json").read_text())
    assert meta["options"]["tokenizer"] == "minilm-l6" and meta["model"]["tokenizer"].endswith("model")
    loaded = loading.load_model(str(no_tokenizer), tokenizer=str(zoo["bert"]), device="cpu")
    assert len(loaded.tokenizer) == 30522


def test_tokenizer_option_errors(no_tokenizer, tmp_path):
    with pytest.raises(AttnprobeError, match="--tokenizer .* is neither a folder"):
        loading.load_model(str(no_tokenizer), tokenizer=str(tmp_path / "missing"), device="cpu")
    with pytest.raises(AttnprobeError, match="--tokenizer .* has no tokenizer files"):
        loading.load_model(str(no_tokenizer), tokenizer=str(no_tokenizer), device="cpu")


def test_refine_takes_the_tokenizer_option(no_tokenizer, in_tmp):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    train = in_tmp / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"text number {i}\t{i % 2}\n" for i in range(8)))
    res = CliRunner().invoke(app, ["refine", str(no_tokenizer), "--train", str(train), "--out", "r", "--epochs", "1",
                                   "--batch-size", "4", "--device", "cpu", "--variant", "baseline", "--no-checkpoints"])
    assert res.exit_code == 1 and "has no tokenizer files" in res.output
    res = CliRunner().invoke(app, ["refine", str(no_tokenizer), "--tokenizer", "minilm-l6", "--train", str(train),
                                   "--out", "r", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                                   "--variant", "baseline", "--no-checkpoints"])
    assert res.exit_code == 0, res.output
    assert (in_tmp / "r" / "model" / "tokenizer.json").is_file() and not (in_tmp / "r" / outputs.LOCK).exists()


# ---- one writer per folder -----------------------------------------------------------------------

_LOCKER = """
import sys, time
from attnprobe.runtime import outputs
from attnprobe.errors import AttnprobeError
while time.time() < float(sys.argv[2]):
    time.sleep(0.005)
try:
    outputs.prepare_out_dir(sys.argv[1], "scan")
    print("got it", flush=True)
    time.sleep(float(sys.argv[3]))
except AttnprobeError as exc:
    print("refused:", exc, flush=True)
"""


def _lockers(folder, count, hold):
    start = time.time() + 2.0
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return [subprocess.Popen([sys.executable, "-c", _LOCKER, str(folder), str(start), str(hold)],
                             stdout=subprocess.PIPE, text=True, env=env) for _ in range(count)]


def test_exactly_one_of_several_processes_gets_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    procs = _lockers(tmp_path / "out", 4, 1.0)
    answers = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sum(a == "got it" for a in answers) == 1, answers
    refused = [a for a in answers if a != "got it"]
    assert all(f"output folder {tmp_path / 'out'} is being written by another attnprobe run" in a for a in refused)
    assert not (tmp_path / "out" / outputs.LOCK).exists()  # freed when the winner ended


def test_scan_into_a_folder_another_run_writes_exits_1(zoo, in_tmp, monkeypatch):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    (holder,) = _lockers(in_tmp / "run", 1, 30.0)
    try:
        deadline = time.time() + 30
        while not (in_tmp / "run" / outputs.LOCK).exists() and time.time() < deadline:
            time.sleep(0.05)
        res = CliRunner().invoke(app, ["scan", str(zoo["bert"]), "--text", "hello there", "--out",
                                       str(in_tmp / "run"), "--device", "cpu"])
        assert res.exit_code == 1
        assert f"output folder {in_tmp / 'run'} is being written by another attnprobe run" in res.output
        assert not (in_tmp / "run" / outputs.RUN_JSON).exists()
    finally:
        holder.kill()
        holder.communicate()


def test_stale_lock_is_replaced(zoo, in_tmp):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (in_tmp / "run").mkdir()
    (in_tmp / "run" / outputs.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    res = CliRunner().invoke(app, ["scan", str(zoo["bert"]), "--text", "hello there", "--out", "run",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (in_tmp / "run" / outputs.RUN_JSON).is_file() and not (in_tmp / "run" / outputs.LOCK).exists()


def test_failed_report_leaves_no_folder(zoo, in_tmp, monkeypatch):
    from attnprobe.report import writer

    result = _scan(zoo["bert"], out=None)
    from attnprobe.scanning.scanner import write_scan

    (in_tmp / "run").mkdir()
    write_scan(result, in_tmp / "run")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "atomic_write_bytes", broken)
    monkeypatch.setattr(outputs, "atomic_write_text", broken)
    with pytest.raises(OSError):
        writer.write_report([str(in_tmp / "run")], in_tmp / "rep", "both")
    assert not (in_tmp / "rep").exists()


def test_show_takes_the_tokenizer_option(no_tokenizer, in_tmp):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    res = CliRunner().invoke(app, ["show", str(no_tokenizer), "--text", "hello there", "--out", "s",
                                   "--format", "html", "--device", "cpu"])
    assert res.exit_code == 1 and "has no tokenizer files" in res.output
    res = CliRunner().invoke(app, ["show", str(no_tokenizer), "--tokenizer", "minilm-l6", "--text", "hello there",
                                   "--out", "s", "--format", "html", "--device", "cpu"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("kind", ["bert", "roberta", "mpnet", "ibert", "xmod", "markuplm"])
def test_longest_sequence_fits_the_position_table(zoo, kind):
    """Without --max-length a long text is cut to what the position embeddings hold, counting the slots
    RoBERTa-style models reserve before the first position; one token more would not fit."""
    import torch
    from transformers import AutoModel

    result = attnprobe.scan(str(zoo[kind]), texts=[" ".join(["word"] * 400), "a short one"], device="cpu")
    used = result.meta["data"]["max_length"]
    assert result.meta["data"]["truncated"] == 1
    model = AutoModel.from_pretrained(zoo[kind]).eval()
    with torch.no_grad():
        model(input_ids=torch.full((1, used), 2000))  # the longest sequence scanned runs
        if kind != "bert":  # ...and uses the whole position table
            with pytest.raises((IndexError, RuntimeError)):  # out of the position (or token-type) table
                model(input_ids=torch.full((1, used + 1), 2000))
