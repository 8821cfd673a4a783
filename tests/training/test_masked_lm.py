"""refine --task masked-lm: blocks, masking statistics, the loss and perplexity against a float64 reference,
--init shapes and parameter counts, a toy pretraining through the CLI (loss falls, history with perplexity,
the checkpoint round-trips with its SAOBP settings), and pretrain-then-fine-tune with the inherited variant."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from attnprobe.errors import AttnprobeError
from attnprobe.training import masked_lm
from attnprobe.cli import app
from tests.conftest import bundled_path
from tests.training.test_refine import write_rows

WORDS = "the cat dog sat on a mat and ran to big small red blue house tree under over".split()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_path(), local_files_only=True)


def _corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n)]


# ---- blocks and masking --------------------------------------------------------------------------


def test_group_blocks_keep_every_token_in_order(tokenizer):
    texts = _corpus(50, 0)
    blocks = masked_lm.group_blocks(tokenizer, texts, max_length=24)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert all(b["input_ids"][0] == cls and b["input_ids"][-1] == sep for b in blocks)
    assert all(len(b["input_ids"]) <= 24 for b in blocks) and all(len(b["input_ids"]) == 24 for b in blocks[:-1])
    inner = [t for b in blocks for t in b["input_ids"][1:-1]]
    expected = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert inner == expected
    assert all(b["special_tokens_mask"] == [1] + [0] * (len(b["input_ids"]) - 2) + [1] for b in blocks)


def test_masking_statistics(tokenizer):
    blocks = masked_lm.group_blocks(tokenizer, _corpus(400, 1), max_length=32)
    collator = masked_lm.MaskedLMCollator(tokenizer, seed=0)
    original, inputs, labels = [], [], []
    for _ in range(30):  # dynamic masking: a fresh draw every time
        batch = collator([dict(b) for b in blocks])
        ids = collator.tokenizer.pad({"input_ids": [b["input_ids"] for b in blocks]}, return_tensors="pt")["input_ids"]
        original.append(ids)
        inputs.append(batch["input_ids"])
        labels.append(batch["labels"])
    original, inputs, labels = torch.cat(original), torch.cat(inputs), torch.cat(labels)
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    chosen = labels != -100
    assert not (chosen & special).any() and torch.equal(inputs[special], original[special])
    assert torch.equal(labels[chosen], original[chosen])
    share = chosen.sum().item() / (~special).sum().item()
    n = chosen.sum().item()
    assert n > 10000
    assert share == pytest.approx(0.15, abs=0.005)
    to_mask = (inputs[chosen] == tokenizer.mask_token_id).float().mean().item()
    kept = (inputs[chosen] == original[chosen]).float().mean().item()
    assert to_mask == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / len(tokenizer), abs=0.01)  # a random token may be the same one
    assert 1 - to_mask - kept == pytest.approx(0.1, abs=0.01)
    assert torch.equal(inputs[~chosen & ~special], original[~chosen & ~special])


def test_collator_seed_gives_the_same_masks(tokenizer):
    blocks = masked_lm.group_blocks(tokenizer, _corpus(30, 2), max_length=32)
    a = masked_lm.MaskedLMCollator(tokenizer, seed=3)([dict(b) for b in blocks])
    b = masked_lm.MaskedLMCollator(tokenizer, seed=3)([dict(b) for b in blocks])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_premasked_eval_blocks_are_only_padded(tokenizer):
    blocks = masked_lm.premask(tokenizer, masked_lm.group_blocks(tokenizer, _corpus(30, 3), max_length=32), seed=0)
    batch = masked_lm.MaskedLMCollator(tokenizer, seed=99)(blocks)
    assert batch["labels"][0].tolist() == blocks[0]["labels"]
    assert batch["labels"][-1, len(blocks[-1]["labels"]):].eq(-100).all()


# ---- loss and perplexity against a float64 reference ---------------------------------------------


def test_token_nll_matches_numpy_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (3, 5), generator=gen)
    labels[0, :2] = -100
    labels[2] = -100  # a row with nothing to predict
    rows = masked_lm.token_nll(logits, labels).numpy()
    lg = logits.double().numpy()
    for b in range(3):
        total, count = 0.0, 0
        for t in range(5):
            y = int(labels[b, t])
            if y == -100:
                continue
            z = lg[b, t]
            total += -(z[y] - (np.log(np.sum(np.exp(z - z.max()))) + z.max()))
            count += 1
        assert rows[b, 0] == pytest.approx(total, rel=1e-5) and rows[b, 1] == count
    scores = masked_lm.perplexity_scores(rows)
    assert scores["mlm_loss"] == pytest.approx(rows[:, 0].sum() / rows[:, 1].sum())  # token-weighted
    assert scores["perplexity"] == pytest.approx(math.exp(scores["mlm_loss"]))
    assert math.isnan(masked_lm.perplexity_scores(np.zeros((2, 2)))["perplexity"])


# ---- --init --------------------------------------------------------------------------------------


def _bert_mlm_parameters(layers: int, hidden: int, vocab: int, positions: int, types: int) -> int:
    """BertForMaskedLM's parameter count by hand (decoder weight tied to the word embeddings, no pooler)."""
    embeddings = (vocab + positions + types) * hidden + 2 * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden + (hidden * 4 * hidden + 4 * hidden) \
        + (4 * hidden * hidden + hidden) + 2 * hidden
    head = hidden * hidden + hidden + 2 * hidden + vocab
    return embeddings + layers * layer + head


@pytest.mark.parametrize("size, layers, hidden", [("tiny", 2, 128), ("mini", 4, 256), ("L1-H64", 1, 64)])
def test_init_shapes_and_parameter_count(tmp_path, tiny_bert, size, layers, hidden):
    from transformers import AutoConfig

    info = masked_lm.fresh_checkpoint(str(tiny_bert), size, None, tmp_path, seed=0)
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.num_hidden_layers, config.hidden_size) == (layers, hidden)
    assert config.num_attention_heads == hidden // 64 and config.intermediate_size == 4 * hidden
    assert info["vocab_size"] == config.vocab_size
    expected = _bert_mlm_parameters(layers, hidden, config.vocab_size, config.max_position_embeddings,
                                    config.type_vocab_size)
    assert info["parameters"] == expected
    assert (info["layers"], info["hidden"], info["heads"], info["intermediate"]) == (layers, hidden, hidden // 64,
                                                                                    4 * hidden)


def test_init_bad_sizes():
    assert masked_lm.parse_size("Small") == (4, 512) and masked_lm.parse_size("L3-H192") == (3, 192)
    for bad in ("huge", "L4-H100", "L0-H128", "4x256"):
        with pytest.raises(AttnprobeError, match="--init"):
            masked_lm.parse_size(bad)


# ---- through the CLI -----------------------------------------------------------------------------

PRETRAIN = ["--task", "masked-lm", "--init", "L2-H64", "--max-length", "32", "--batch-size", "16",
            "--lr", "2e-3", "--warmup-ratio", "0", "--max-steps", "60", "--eval-every", "30", "--device", "cpu",
            "--seed", "0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("mlm")
    rng = random.Random(5)
    # a learnable corpus: fixed phrases, so masked words are predictable from their neighbours
    phrases = ["the big red house", "a small blue tree", "the cat sat on the mat", "a dog ran under the tree"]
    lines = [" and ".join(rng.choice(phrases) for _ in range(3)) for _ in range(300)]
    (root / "train.txt").write_text("\n".join(lines[:260]) + "\n", encoding="utf-8")
    (root / "valid.txt").write_text("\n".join(lines[260:]) + "\n", encoding="utf-8")
    out = root / "pre"
    result = CliRunner().invoke(app, ["refine", str(tiny_bert), "--train", str(root / "train.txt"),
                                      "--eval", str(root / "valid.txt"), "--out", str(out), "--variant", "bp-high",
                                      *PRETRAIN, "--json"])
    assert result.exit_code == 0, result.output
    return {"root": root, "out": out, "summary": json.loads(result.stdout)}


def test_cli_masked_lm_writes_history_with_perplexity(pretrained):
    out = pretrained["out"]
    history = pd.read_parquet(out / "history.parquet")
    assert list(history.columns) == ["epoch", "step", "train_loss", "eval_loss", "perplexity"]
    assert history["step"].tolist() == [0, 30, 60]
    assert np.allclose(history["perplexity"], np.exp(history["eval_loss"]))
    assert history["eval_loss"].iloc[-1] < history["eval_loss"].iloc[0] - 1.0  # the loss falls
    meta = json.loads((out / "run.json").read_text())
    assert meta["task"] == "masked-lm" and meta["steps"] == 60
    assert meta["final"]["perplexity"] == pytest.approx(history["perplexity"].iloc[-1])
    assert meta["init"]["size"] == "L2-H64" and meta["init"]["parameters"] == meta["parameters"]
    assert meta["data"]["eval"]["predicted_tokens"] > 0
    diagnostics = pd.read_parquet(out / "diagnostics.parquet")
    assert sorted(diagnostics["step"].unique()) == [0, 30, 60] and diagnostics["bp_shift"].notna().all()
    assert pretrained["summary"]["perplexity"]["after"] == pytest.approx(meta["final"]["perplexity"])


def test_masked_lm_checkpoint_round_trips(pretrained):
    import attnprobe  # noqa: F401  (registers the SAOBP attention)
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model_dir = pretrained["out"] / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["saobp"]["gamma"] == 0.9 and config["attnprobe_variant"] == "bp-high"
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    assert model.config._attn_implementation == "saobp"
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(["the big red [MASK]", "a small blue tree and the cat"], padding=True, return_tensors="pt")
    eager = AutoModelForMaskedLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        refined, plain = model(**enc).logits, eager(**enc).logits
    from attnprobe.models.loading import load_model

    loaded = load_model(str(model_dir), task="masked-lm", device="cpu")
    with torch.no_grad():
        again = loaded.model(**enc).logits
    assert torch.allclose(refined, again, atol=1e-5)
    assert not torch.allclose(refined, plain, atol=1e-4)  # the saved settings, not plain attention, are in use


def test_pretrain_then_finetune_inherits_the_variant(pretrained):
    root = pretrained["root"]
    train, dev = write_rows(root / "ft-train.tsv", 40, seed=1), write_rows(root / "ft-dev.tsv", 12, seed=2)
    runs = {}
    for name, extra in (("inherit", []), ("override", ["--variant", "baseline"])):
        out = root / f"ft-{name}"
        result = CliRunner().invoke(app, ["refine", str(pretrained["out"] / "model"), "--train", str(train),
                                          "--eval", str(dev), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                                          "--max-length", "32", "--device", "cpu", *extra, "--json"])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads((out / "run.json").read_text())
    inherit, override = runs["inherit"], runs["override"]
    assert inherit["task"] == "sequence-classification" and inherit["variant"] == "bp-high"
    assert inherit["variant_from"] == "checkpoint" and inherit["saobp"]["gamma"] == 0.9
    assert inherit["parent"]["run"] == str(pretrained["out"].resolve()) and inherit["parent"]["task"] == "masked-lm"
    assert override["variant"] == "baseline" and override["saobp"] is None and override["variant_from"] == "option"
    # the fine-tuned model's encoder starts from the pretrained weights
    from safetensors.torch import load_file

    pre = load_file(pretrained["out"] / "model" / "model.safetensors")
    assert inherit["model"]["architecture"] == "BertForSequenceClassification"
    assert any(k.startswith("bert.encoder") for k in pre)
    # the report of the fine-tuned run shows its pretraining beside it
    from attnprobe.report.writer import write_report

    report = write_report([root / "ft-inherit"], fmt="html")
    page = report.html.read_text(encoding="utf-8")
    assert report.out_dir == root / "ft-inherit" / "report"
    assert "pre" in page and "ft-inherit" in page and "perplexity" in page
    assert any("fine-tuned from the model of pre" in note for note in report.notes)


def test_baseline_checkpoint_fine_tunes_as_baseline(pretrained, tmp_path):
    import shutil

    from attnprobe.training import lineage
    from attnprobe.config import RefineConfig

    folder = tmp_path / "model"
    shutil.copytree(pretrained["out"] / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("saobp"), config.pop("attn_implementation", None)
    (folder / "config.json").write_text(json.dumps({**config, "attnprobe_variant": "baseline"}))
    cfg, source = lineage.resolve_variant(RefineConfig(model=str(folder), train="x.tsv"))
    assert (cfg.variant, source) == ("baseline", "checkpoint")
    config.pop("attnprobe_variant")
    (folder / "config.json").write_text(json.dumps(config))
    cfg, source = lineage.resolve_variant(RefineConfig(model=str(folder), train="x.tsv"))
    assert (cfg.variant, source) == ("bp-high", "default")


def test_cli_masked_lm_errors(pretrained, tiny_bert, tmp_path):
    train = str(pretrained["root"] / "train.txt")
    r = CliRunner().invoke(app, ["refine", str(tiny_bert), "--train", train, "--init", "mini", "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and "--task masked-lm" in r.output
    r = CliRunner().invoke(app, ["refine", str(tiny_bert), "--train", train, "--task", "masked-lm", "--init", "L2-H100",
                                 "--out", str(tmp_path / "b")])
    assert r.exit_code == 1 and "multiple of 64" in r.output
    r = CliRunner().invoke(app, ["refine", str(tiny_bert), "--train", train, "--task", "fill-mask",
                                 "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "unknown --task" in r.output
    assert not (tmp_path / "b").exists()
