"""refine --patterns: patterns.parquet before and after training against transformers' eager
output_attentions of the starting checkpoint and of the saved model/, the plain attention of an SAOBP run
against the plain softmax (and its refined weights against the slow SAOBP reference), --patterns 0, the
report's thumbnails of a real run, --resume keeping (or reporting missing) the before patterns, masked-LM."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from attnprobe.runtime import outputs
from attnprobe.cli import app
from attnprobe.config import RefineConfig, ScanConfig
from attnprobe.scanning.patterns import COLUMNS
from tests import reference
from tests.conftest import make_tiny_model
from tests.training.test_refine import TRAIN_OPTIONS, _Crash, _CrashAfterFirstEpoch, write_rows

pytestmark = pytest.mark.slow

N = 3  # examples kept


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine-patterns")
    return {"root": root, "bert": make_tiny_model("bert", root / "bert", task="sequence-classification"),
            "train": write_rows(root / "train.tsv", 40, seed=1), "dev": write_rows(root / "dev.tsv", 12, seed=2)}


def _cfg(work, out: Path, variant: str, **extra) -> RefineConfig:
    return RefineConfig(model=str(work["bert"]), train=str(work["train"]), eval=str(work["dev"]), out=str(out),
                        variant=variant, patterns=N, **{**TRAIN_OPTIONS, **extra})


@pytest.fixture(scope="module")
def runs(work):
    from attnprobe.training.refine import refine

    return {"baseline": refine(_cfg(work, work["root"] / "baseline", "baseline")),
            "bp-high": refine(_cfg(work, work["root"] / "bp-high", "bp-high", bp_layers="upper", epochs=1.0))}


def dev_texts(work) -> list[str]:
    return pd.read_csv(work["dev"], sep="\t")["sentence"].tolist()


def eager_attentions(folder: Path, text: str) -> np.ndarray:
    """``(L, H, n, n)`` of transformers' own eager attention of one text, for the checkpoint in ``folder``."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**tok(text, return_tensors="pt"), output_attentions=True)
    return np.stack([a[0].double().numpy() for a in out.attentions])


def stage_grids(df: pd.DataFrame, stage: str, example: int, column: str = "weight") -> np.ndarray:
    rows = df[(df.stage == stage) & (df.example == example)].sort_values(["layer", "head", "query", "key"])
    L, H, n = rows.layer.max() + 1, rows["head"].max() + 1, rows["query"].max() + 1
    assert len(rows) == L * H * n * n and (rows.tokens == n).all()
    return rows[column].to_numpy(np.float64).reshape(L, H, n, n)


def test_baseline_patterns_equal_eager_attention_before_and_after_training(work, runs):
    out = runs["baseline"].out_dir
    df = pd.read_parquet(out / outputs.PATTERNS)
    assert list(df.columns) == [*COLUMNS, "stage"]
    meta = json.loads((out / outputs.RUN_JSON).read_text())
    entry = meta["patterns"]
    assert entry["stages"] == ["before", "after"] and entry["notes"] == [] and entry["requested"] == N
    examples = entry["examples"]
    assert len(examples) == N and sorted(df.example.unique()) == examples
    assert df.stage.tolist() == ["before"] * (len(df) // 2) + ["after"] * (len(df) // 2)
    sums = df.groupby(["stage", "example", "layer", "head", "query"]).weight.sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-5)
    assert df.plain_weight.isna().all()
    texts = dev_texts(work)
    moved = 0.0
    for example in examples:
        before = stage_grids(df, "before", example)
        after = stage_grids(df, "after", example)
        np.testing.assert_allclose(before, eager_attentions(work["bert"], texts[example]), atol=2e-6)
        np.testing.assert_allclose(after, eager_attentions(out / "model", texts[example]), atol=2e-6)
        moved = max(moved, float(np.abs(after - before).max()))
        assert entry["tokens"][examples.index(example)] == before.shape[-1]
    assert moved > 1e-3  # training changed the attention, so the two stages are told apart
    # the same examples a scan of the eval texts keeps (the same rule)
    from attnprobe.scanning.scanner import scan

    scanned = scan(ScanConfig(model=str(work["bert"]), text=tuple(texts), patterns=N, device="cpu", max_length=32))
    assert scanned.meta["patterns"]["examples"] == examples
    tokens = df[(df.stage == "after") & (df.layer == 0) & (df["head"] == 0) & (df["query"] == 0)]
    scan_tokens = scanned.patterns[(scanned.patterns.layer == 0) & (scanned.patterns["head"] == 0)
                                   & (scanned.patterns["query"] == 0)]
    assert tokens.key_token.tolist() == scan_tokens.key_token.tolist()


def test_saobp_patterns_keep_the_plain_softmax_attention(work, runs):
    out = runs["bp-high"].out_dir
    df = pd.read_parquet(out / outputs.PATTERNS)
    texts = dev_texts(work)
    for example in sorted(df.example.unique()):
        for stage, folder in (("before", work["bert"]), ("after", out / "model")):
            plain = eager_attentions(folder, texts[example])  # the eager (plain) attention of those weights
            weight = stage_grids(df, stage, example)
            kept_plain = stage_grids(df, stage, example, "plain_weight")
            assert np.isnan(kept_plain[0]).all()  # layer 0 is not refined (--bp-layers upper)
            np.testing.assert_allclose(weight[0], plain[0], atol=2e-6)
            np.testing.assert_allclose(kept_plain[1], plain[1], atol=2e-6)
            refined = np.stack([reference.saobp(np.log(a), gamma=0.9) for a in plain[1]])
            np.testing.assert_allclose(weight[1], refined, atol=2e-5)
            assert np.abs(weight[1] - kept_plain[1]).max() > 1e-4


def test_patterns_zero_writes_none(work, tmp_path):
    out = tmp_path / "off"
    res = CliRunner().invoke(app, ["refine", str(work["bert"]), "--train", str(work["train"]), "--eval",
                                   str(work["dev"]), "--variant", "baseline", "--out", str(out), "--epochs", "1",
                                   "--max-steps", "2", "--batch-size", "4", "--device", "cpu", "--patterns", "0",
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert not (out / outputs.PATTERNS).exists() and not list(out.rglob("patterns-before.parquet"))
    meta = json.loads((out / outputs.RUN_JSON).read_text())
    assert "patterns" not in meta and meta["options"]["patterns"] == 0
    bad = CliRunner().invoke(app, ["refine", str(work["bert"]), "--train", str(work["train"]), "--patterns", "65"])
    assert bad.exit_code == 1 and "--patterns must be 0" in bad.stderr


def test_report_of_a_refine_run_shows_its_patterns(runs):
    from tests.report.test_writer import check_hovers, html_table, thumbnails_of

    from attnprobe.scanning.patterns import from_frame
    from attnprobe.report.writer import write_report

    out = runs["bp-high"].out_dir
    page = write_report([out], out=out / "rep", fmt="html").html.read_text(encoding="utf-8")
    wanted = {(int(r[0]), int(r[1])) for r in html_table(page, "flagged")}
    wanted |= {(int(r[1]), int(r[2])) for r in html_table(page, "extremes")}
    thumbs = thumbnails_of(page)
    assert thumbs and set(thumbs) == wanted
    check_hovers(thumbs, from_frame(pd.read_parquet(out / outputs.PATTERNS)))


def test_resume_keeps_the_before_patterns_or_says_they_are_missing(work, runs):
    from attnprobe.training.refine import refine
    from attnprobe.report.writer import write_report

    out = work["root"] / "resumed"
    with pytest.raises(_Crash):
        refine(_cfg(work, out, "baseline"), callbacks=[_CrashAfterFirstEpoch()])
    assert (out / "checkpoints" / "patterns-before.parquet").is_file() and not (out / outputs.PATTERNS).exists()
    bare = work["root"] / "resumed-bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns(".attnprobe.lock"))
    (bare / "checkpoints" / "patterns-before.parquet").unlink()

    refine(_cfg(work, out, "baseline", resume=True))
    full = pd.read_parquet(runs["baseline"].out_dir / outputs.PATTERNS)
    got = pd.read_parquet(out / outputs.PATTERNS)
    assert json.loads((out / outputs.RUN_JSON).read_text())["patterns"]["stages"] == ["before", "after"]
    pd.testing.assert_frame_equal(got.drop(columns="weight"), full.drop(columns="weight"))
    np.testing.assert_allclose(got.weight, full.weight, atol=1e-6)

    refine(_cfg(work, bare, "baseline", resume=True))
    meta = json.loads((bare / outputs.RUN_JSON).read_text())
    assert meta["patterns"]["stages"] == ["after"]
    assert "patterns before training are missing" in meta["patterns"]["notes"][0]
    after = pd.read_parquet(bare / outputs.PATTERNS)
    assert set(after.stage) == {"after"}
    np.testing.assert_allclose(after.weight, full[full.stage == "after"].weight, atol=1e-6)
    notes = write_report([bare], out=bare / "rep", fmt="html").notes
    assert any("patterns before training are missing" in n for n in notes)


def test_masked_lm_keeps_patterns_of_the_unmasked_eval_documents(tmp_path):
    from transformers import AutoTokenizer

    from attnprobe.training.refine import refine

    model = make_tiny_model("bert", tmp_path / "mlm-bert", task="base")
    rng = random.Random(0)
    words = "the cat dog sat on a mat and ran to big small red blue house tree".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) for _ in range(30)]
    (tmp_path / "train.txt").write_text("\n".join(docs[:24]) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(docs[24:]) + "\n")
    result = refine(RefineConfig(model=str(model), train=str(tmp_path / "train.txt"), eval=str(tmp_path / "eval.txt"),
                                 out=str(tmp_path / "mlm"), task="masked-lm", variant="baseline", max_steps=2,
                                 batch_size=4, max_length=32, device="cpu", patterns=2, checkpoints=False))
    df = pd.read_parquet(result.out_dir / outputs.PATTERNS)
    tok = AutoTokenizer.from_pretrained(model)
    for example in sorted(df.example.unique()):
        ids = tok(docs[24 + example])["input_ids"]  # the document alone, [CLS] ... [SEP], nothing masked
        first = df[(df.stage == "after") & (df.example == example) & (df.layer == 0) & (df["head"] == 0)
                   & (df["query"] == 0)]
        assert first.key_token.tolist() == tok.convert_ids_to_tokens(ids)
        np.testing.assert_allclose(stage_grids(df, "before", example), eager_attentions(model, docs[24 + example]),
                                   atol=2e-6)
    assert "[MASK]" not in set(df.key_token)
    assert not (result.out_dir / "checkpoints").exists()  # --no-checkpoints: the before file went with them
