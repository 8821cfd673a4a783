"""Masked-LM pretraining for ``refine --task masked-lm``: documents, blocks, masking, perplexity, fresh models.

refine.py runs the training (the same Trainer, variants, diagnostics, resume and run folder as for
classification); this module supplies what differs: reading plain documents, grouping their tokens into
``--max-length`` blocks, dynamic masking (transformers' DataCollatorForLanguageModeling: 15 % of the
non-special tokens, of which 80 % become the mask token, 10 % a random token, 10 % stay), a fixed,
seeded masking of the eval blocks, the token-weighted masked-LM loss and perplexity, and ``--init``:
a freshly initialised model of MODEL's family in the BERT miniature shapes of Turc et al. (2019).
It does not write files other than the fresh checkpoint it is asked to build.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.data import sources

MLM_PROBABILITY = 0.15
# Turc et al. 2019, "Well-Read Students Learn Better": (layers, hidden size); heads = H / 64, FFN = 4 H.
SIZES = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512), "base": (12, 768)}
_SHAPE = re.compile(r"^L(\d+)-H(\d+)$", re.IGNORECASE)


# ---- documents and blocks ------------------------------------------------------------------------


def _documents(path: str, cfg) -> tuple[list[str], dict[str, Any]]:
    source = sources.open_source(path, text_column=cfg.text_column, encoding=cfg.encoding)
    texts: list[str] = []
    for chunk in source.chunks():
        texts.extend(chunk.texts)
    if not texts:
        raise AttnprobeError(f"{path} holds no non-empty text; pass a .txt file with one document a line")
    return texts, {**source.stats(), "source": "file", "documents": len(texts)}


def _unlabeled(texts: list[str], stats: dict[str, Any]) -> sources.LabeledData:
    return sources.LabeledData(texts, None, [0] * len(texts), [], stats)


def prepare_documents(cfg) -> tuple[sources.LabeledData, sources.LabeledData]:
    """Train and eval documents (as unlabeled LabeledData): the files, or a seeded eval split; seeded samples."""
    train, train_stats = _documents(cfg.train, cfg)
    rng = random.Random(cfg.seed)
    if cfg.eval is not None:
        evaluation, eval_stats = _documents(cfg.eval, cfg)
    else:
        if len(train) < 2:
            raise AttnprobeError(f"{cfg.train} has {len(train)} document, too few to hold out an eval split; "
                                 "pass more lines or a separate --eval FILE")
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = max(1, round(cfg.eval_split * len(train)))
        evaluation = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
        eval_stats = {"source": f"seeded {cfg.eval_split:g} split of the training file",
                      "path": train_stats.get("path"), "documents": len(evaluation)}
    for name, most in (("train", cfg.max_train_samples), ("eval", cfg.max_eval_samples)):
        docs = train if name == "train" else evaluation
        if most is not None and most < len(docs):
            if most < 1:
                raise AttnprobeError(f"--max-{name}-samples must be 1 or more (got {most})")
            docs = [docs[i] for i in sorted(rng.sample(range(len(docs)), most))]
            train, evaluation = (docs, evaluation) if name == "train" else (train, docs)
    train_stats = {**train_stats, "documents_used": len(train)}
    eval_stats = {**eval_stats, "documents_used": len(evaluation)}
    return _unlabeled(train, train_stats), _unlabeled(evaluation, eval_stats)


def group_blocks(tokenizer, texts: list[str], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate the documents' tokens and cut them into blocks of ``max_length`` tokens with the
    tokenizer's special tokens around each (as transformers' run_mlm example does; a block may span
    documents). The last, shorter block is kept if it holds a token. No ``labels``: masking is per batch.
    """
    prefix, suffix = _special_frame(tokenizer)
    size = max_length - len(prefix) - len(suffix)
    if size < 1:
        raise AttnprobeError(f"--max-length {max_length} leaves no room for text between the special tokens")
    special_ids = set(tokenizer.all_special_ids)
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
    blocks = []
    for start in range(0, len(stream), size):
        ids = prefix + stream[start:start + size] + suffix
        special = [int(t in special_ids) for t in ids]
        blocks.append({"input_ids": ids, "attention_mask": [1] * len(ids), "special_tokens_mask": special})
    if not blocks:
        raise AttnprobeError("the documents hold no tokens after tokenization; pass real text")
    return blocks


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text (``[CLS]`` / ``[SEP]``, ``<s>`` / ``</s>``)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise AttnprobeError("cannot tell which special tokens the tokenizer adds around a text")


# ---- masking --------------------------------------------------------------------------------------


def check_mask_token(tokenizer, name: str) -> None:
    if tokenizer.mask_token is None:
        raise AttnprobeError(f"the tokenizer of {name} has no mask token, so it cannot train a masked LM; "
                             "pass a model (or --tokenizer) whose tokenizer defines one")


class MaskedLMCollator:
    """Pads blocks and masks them dynamically (a seeded generator of its own, so every variant sees the
    same masks); blocks that already carry ``labels`` (the fixed eval masking) are only padded."""

    def __init__(self, tokenizer, seed: int):
        from transformers import DataCollatorForLanguageModeling

        self.tokenizer = tokenizer
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=MLM_PROBABILITY, seed=seed)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "labels" not in features[0]:
            return self.masker(features)
        width = max(len(f["input_ids"]) for f in features)
        pad = self.tokenizer.pad_token_id or 0

        def padded(key: str, fill: int) -> torch.Tensor:
            return torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)

        return {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0),
                "labels": padded("labels", -100)}


def premask(tokenizer, blocks: list[dict[str, list[int]]], seed: int) -> list[dict[str, list[int]]]:
    """The eval blocks masked once with a fixed seed, so every evaluation (and every variant) scores the
    same positions."""
    collator = MaskedLMCollator(tokenizer, seed)
    out = []
    for block in blocks:
        batch = collator.masker([dict(block)])
        out.append({"input_ids": batch["input_ids"][0].tolist(), "attention_mask": block["attention_mask"],
                    "labels": batch["labels"][0].tolist()})
    return out


def block_sets(tokenizer, train_data: sources.LabeledData, eval_data: sources.LabeledData, max_length: int, seed: int):
    """The train blocks (masked per batch) and the eval blocks (masked once, seeded) as Datasets."""
    from attnprobe.training.trainer import EncodedExamples

    train_blocks = group_blocks(tokenizer, train_data.texts, max_length)
    eval_blocks = premask(tokenizer, group_blocks(tokenizer, eval_data.texts, max_length), seed)
    train_data.stats["blocks"], eval_data.stats["blocks"] = len(train_blocks), len(eval_blocks)
    train_data.stats["tokens"] = sum(len(b["input_ids"]) for b in train_blocks)
    eval_data.stats["tokens"] = sum(len(b["input_ids"]) for b in eval_blocks)
    eval_data.stats["predicted_tokens"] = sum(sum(t != -100 for t in b["labels"]) for b in eval_blocks)
    if eval_data.stats["predicted_tokens"] == 0:
        raise AttnprobeError("no eval token was chosen for prediction (too few non-special tokens); pass more "
                             "--eval text, or check that the tokenizer knows the words (not all [UNK])")
    return EncodedExamples(train_blocks), EncodedExamples(eval_blocks)


# ---- loss and perplexity ------------------------------------------------------------------------


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row ``[sum of -log p(label), number of predicted positions]`` over positions with label != -100.

    Used as the Trainer's ``preprocess_logits_for_metrics`` so that the (B, T, V) logits never pile up.
    ``(B, T, V), (B, T) -> (B, 2)`` in float64.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    keep = labels != -100  # (B, T)
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    nll = -(picked * keep).sum(-1).double()
    return torch.stack([nll, keep.sum(-1).double()], dim=-1)


def perplexity_scores(sums: np.ndarray, loss_name: str = "mlm_loss") -> dict[str, float]:
    """``{loss_name, "perplexity"}`` from ``(N, 2)`` rows of token_nll: the token-weighted mean and its exp."""
    sums = np.asarray(sums, dtype=np.float64).reshape(-1, 2)
    count = sums[:, 1].sum()
    if count == 0:
        return {loss_name: float("nan"), "perplexity": float("nan")}
    loss = float(sums[:, 0].sum() / count)
    return {loss_name: loss, "perplexity": math.exp(min(loss, 700.0))}


class PerplexityFn:
    """``compute_metrics`` for masked-LM evaluation (its predictions are token_nll rows)."""

    last_logits = None  # refine keeps the final logits of classification runs; a masked LM keeps none

    def __call__(self, prediction) -> dict[str, float]:
        preds = prediction.predictions
        if isinstance(preds, (tuple, list)):
            preds = preds[0]
        return perplexity_scores(preds)


# ---- fresh models (--init) ----------------------------------------------------------------------


def parse_size(spec: str) -> tuple[int, int]:
    """``mini`` -> (4, 256); ``L6-H384`` -> (6, 384). H must be a multiple of 64 (heads = H / 64).

    >>> parse_size("mini"), parse_size("L2-H128")
    ((4, 256), (2, 128))
    """
    key = spec.strip().lower()
    if key in SIZES:
        return SIZES[key]
    m = _SHAPE.match(spec.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 64 or int(m.group(2)) % 64:
        raise AttnprobeError(f"--init {spec!r}: expected one of {', '.join(SIZES)} or L{{layers}}-H{{hidden}} "
                             "with hidden a multiple of 64, e.g. L4-H256")
    return int(m.group(1)), int(m.group(2))


# config attribute names per family: (layers, hidden, heads, intermediate)
_SHAPE_KEYS = (("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"),
               ("n_layers", "dim", "n_heads", "hidden_dim"), ("n_layer", "n_embd", "n_head", "n_inner"))


def parameter_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def fresh_checkpoint(spec: str, size: str, tokenizer_spec: str | None, folder: Path, seed: int,
                     trust_remote_code: bool = False, causal: bool = False) -> dict[str, Any]:
    """Save a randomly initialised masked-LM model (``causal``: causal-LM model) of ``spec``'s family in shape
    ``size`` into ``folder``, with the tokenizer of ``tokenizer_spec`` (default: ``spec``'s); its vocabulary
    sets the model's.

    Returns the shape record for run.json (layers, hidden, heads, intermediate, vocab, parameters).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from attnprobe.models import checkpoints, loading

    layers, hidden = parse_size(size)
    path, _, _ = checkpoints.resolve_model(spec)
    config = loading.load_config(path, trust_remote_code)
    tok_path = path if tokenizer_spec is None else checkpoints.resolve_tokenizer(tokenizer_spec)
    tokenizer = checkpoints.load_tokenizer(tok_path, trust_remote_code, given=tokenizer_spec)
    if not causal:
        check_mask_token(tokenizer, tokenizer_spec or spec)
    keys = next((k for k in _SHAPE_KEYS if all(hasattr(config, name) for name in k)), None)
    if keys is None:
        raise AttnprobeError(f"--init cannot resize a {config.model_type} model (no BERT-style shape fields in its "
                             "config); use a BERT, RoBERTa, ELECTRA or DistilBERT checkpoint as MODEL")
    for name, value in zip(keys, (layers, hidden, hidden // 64, 4 * hidden)):
        setattr(config, name, value)
    if hasattr(config, "embedding_size"):  # ELECTRA / ALBERT factorised embeddings follow the width
        config.embedding_size = hidden
    if getattr(config, "num_key_value_heads", None):  # decoders: one key/value head per query head
        config.num_key_value_heads = hidden // 64
    if getattr(config, "head_dim", None):
        config.head_dim = 64
    config.vocab_size = len(tokenizer)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if hasattr(config, name) or value is not None:
            setattr(config, name, value)
    config.saobp = None
    config.architectures = None
    transformers.set_seed(seed)
    with checkpoints.quiet_loading():
        auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    return {"size": size, "layers": layers, "hidden": hidden, "heads": hidden // 64, "intermediate": 4 * hidden,
            "vocab_size": len(tokenizer), "parameters": parameter_count(model), "family": spec,
            "model_type": config.model_type, "tokenizer": tokenizer_spec or spec}


# ---- the task --------------------------------------------------------------------------------------


def _build(tokenizer, train_data: sources.LabeledData, eval_data: sources.LabeledData, max_length: int, cfg):
    from attnprobe.training.tasks import Built

    check_mask_token(tokenizer, cfg.model)
    train_set, eval_set = block_sets(tokenizer, train_data, eval_data, max_length, cfg.seed)
    return Built(train_set, eval_set, MaskedLMCollator(tokenizer, cfg.seed), PerplexityFn(), token_nll)


def _task():
    from attnprobe.training.tasks import Task

    # evaluation batches carry [MASK]ed text: the diagnostics come from a scan of the unmasked documents
    return Task(name="masked-lm", scores=("perplexity",), prepare_data=prepare_documents, build=_build,
                scan_texts=lambda d: (d.texts, None), probe_in_eval=False)


TASK = _task()
