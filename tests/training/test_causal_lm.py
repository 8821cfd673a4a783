"""refine --task causal-lm: next-token loss and perplexity against a float64 reference, a toy corpus whose eval
loss falls, the saved model reloading with SAOBP in plain transformers, and --init for a fresh decoder."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from attnprobe.config import RefineConfig
from tests.tiny_decoders import make_decoder

CORPUS = ["the cat sat on the mat and the dog sat on the log"] * 40 + ["a bird sang in the tree by the river"] * 40


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_decoder("llama", tmp_path_factory.mktemp("llama") / "llama", scale=0.05)


def _corpus(tmp_path):
    train, evaluation = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text("\n".join(CORPUS) + "\n")
    evaluation.write_text("\n".join(CORPUS[::10]) + "\n")
    return train, evaluation


def test_next_token_nll_equals_a_float64_reference():
    from attnprobe.training.causal_lm import PerplexityFn, next_token_nll

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[1, 3:] = -100  # padding
    rows = next_token_nll(logits, labels).numpy()
    want, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] != -100:
                p = torch.softmax(logits[b, t], -1)[labels[b, t + 1]].item()
                want, count = want - math.log(p), count + 1
    assert rows[:, 1].sum() == count == 4 + 2  # row 1 predicts positions 1 and 2 only
    assert abs(rows[:, 0].sum() - want) < 1e-5  # log_softmax in float32
    scores = PerplexityFn()(type("P", (), {"predictions": rows})())
    assert scores["perplexity"] == pytest.approx(math.exp(want / count))


def test_refine_causal_lm_lowers_the_loss_and_reloads_with_saobp(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    import attnprobe  # noqa: F401  (registers the saobp attention for plain transformers)
    from attnprobe.training.refine import refine

    train, evaluation = _corpus(tmp_path)
    cfg = RefineConfig(model=str(tiny_llama), train=str(train), eval=str(evaluation), task="causal-lm",
                       variant="bp-high", max_length=16, epochs=3, batch_size=8, lr=3e-3,
                       out=str(tmp_path / "run"), seed=0, device="cpu")
    result = refine(cfg)
    history = pd.read_parquet(tmp_path / "run" / "history.parquet")
    assert "perplexity" in history.columns
    assert history["eval_loss"].iloc[-1] < history["eval_loss"].iloc[0] - 0.5
    assert history["perplexity"].iloc[-1] == pytest.approx(math.exp(history["eval_loss"].iloc[-1]), rel=1e-4)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["task"] == "causal-lm" and meta["saobp"]["variant"] == "bp-high"
    diagnostics = pd.read_parquet(tmp_path / "run" / "diagnostics.parquet")
    assert sorted(set(diagnostics["epoch"]))[0] == 0 and diagnostics["first_mass"].notna().all()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config._attn_implementation == "saobp" and model.config.saobp["gamma"] == 0.9
    ids = result.tokenizer(CORPUS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


def test_init_builds_a_fresh_decoder_of_the_family(tiny_llama, tmp_path):
    from attnprobe.training.masked_lm import fresh_checkpoint

    info = fresh_checkpoint(str(tiny_llama), "L1-H64", None, tmp_path / "fresh", seed=0, causal=True)
    config = json.loads((tmp_path / "fresh" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (1, 64, 1)
    assert info["layers"] == 1 and info["parameters"] > 0
