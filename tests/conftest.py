"""Shared fixtures: tiny random encoders saved with save_pretrained, and an isolated working folder.

The tiny models reuse the bundled MiniLM WordPiece tokenizer (so texts tokenize for real) with small
random weights, and are loaded by the tests through the same code path as a user's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_KINDS = ("bert", "roberta", "distilbert", "albert")


def bundled_path() -> Path:
    from attnprobe.models.checkpoints import ALIASES, alias_path

    return alias_path(ALIASES["minilm-l6"])


def make_tiny_model(kind: str, folder: Path, num_layers: int = 2, heads: int = 4, hidden: int = 32,
                    seed: int = 0, task: str = "base", num_labels: int = 2) -> Path:
    """Build a tiny random ``kind`` encoder and save it (weights as safetensors) with a tokenizer."""
    import torch
    from transformers import (AlbertConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer,
                              BertConfig, DistilBertConfig, RobertaConfig)

    tokenizer = AutoTokenizer.from_pretrained(bundled_path(), local_files_only=True)
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    if kind == "bert":
        config = BertConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                            intermediate_size=2 * hidden, **common)
    elif kind == "roberta":
        config = RobertaConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                               intermediate_size=2 * hidden, type_vocab_size=1,
                               **{**common, "max_position_embeddings": 130})
    elif kind == "distilbert":
        config = DistilBertConfig(dim=hidden, n_layers=num_layers, n_heads=heads, hidden_dim=2 * hidden, **common)
    elif kind == "albert":
        config = AlbertConfig(hidden_size=hidden, embedding_size=16, num_hidden_layers=num_layers,
                              num_attention_heads=heads, intermediate_size=2 * hidden, **common)
    else:
        raise ValueError(kind)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModel
    model = auto.from_config(config, attn_implementation="eager")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """``{kind: folder}`` for each tiny architecture (2 layers, 4 heads)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: make_tiny_model(kind, root / kind) for kind in TINY_KINDS}


@pytest.fixture(scope="session")
def tiny_bert(tiny_models) -> Path:
    return tiny_models["bert"]


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run inside an empty folder with its own HOME, so default output paths land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path
