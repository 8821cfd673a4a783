"""Turning texts into model batches: tokenize with truncation, sort by length, pad each batch to its longest.

It also decides the longest sequence a model takes (its position table, counting the slots RoBERTa-style
embeddings reserve) and, for models whose attention changes with padding, batches of one length only.
It runs no model and computes no metric (scanner.py does).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    """One tokenized chunk, sorted by length: ids per row, original positions, special-token masks."""

    ids: list[list[int]]
    token_types: list[list[int]] | None
    rows: list[int]  # source row index of each sequence
    truncated: int = 0
    short: int = 0


def _hard_limit(loaded) -> tuple[int | None, str]:
    """The longest sequence the model itself takes, and why: its position embeddings (less the slots a
    RoBERTa-style model reserves) or the local window of a decoder read through output_attentions."""
    pos = getattr(loaded.model.config, "max_position_embeddings", None)
    limit, why = None, ""
    if pos:
        limit = pos - position_offset(loaded.model)
        why = f"the model has {limit} positions"
    window = getattr(loaded, "window", None)
    if window and (limit is None or window < limit):
        limit, why = window, f"its local attention spans {window} tokens"
    return limit, why


def effective_max_length(loaded, requested: int | None) -> int:
    """The length sequences are truncated to. Default: the tokenizer's ``model_max_length`` within the model's
    own limit (512 where neither says). An explicit ``--max-length`` is honoured up to the model's own limit
    (``max_length_notice`` says when it is lowered), whatever the tokenizer's ``model_max_length``."""
    hard, _ = _hard_limit(loaded)
    if requested is not None:
        return requested if hard is None else min(requested, hard)
    tok_max = getattr(loaded.tokenizer, "model_max_length", None) or 10**9
    limit = min(tok_max, hard or 10**9, 10**6)
    return 512 if limit >= 10**6 else limit


def max_length_notice(loaded, requested: int | None) -> str | None:
    """One line when an explicit ``--max-length`` must be lowered to the model's own limit, else None."""
    hard, why = _hard_limit(loaded)
    if requested is not None and hard is not None and requested > hard:
        return f"--max-length {requested} lowered to {hard}: {why}"
    return None


def position_offset(model) -> int:
    """Position slots a model reserves before the first token: RoBERTa-style embeddings (RoBERTa, XLM-R,
    MPNet, X-MOD, I-BERT, LiLT, MarkupLM, Longformer, ...) number positions from ``padding_idx + 1``, which
    shows as a ``padding_idx`` on their position embedding; BERT-style ones start at 0."""
    for name, module in model.named_modules():
        padding_idx = getattr(module, "padding_idx", None)  # nn.Embedding, and I-BERT's QuantEmbedding
        if name.endswith("position_embeddings") and isinstance(padding_idx, int):
            return padding_idx + 1
    return 0


def encode_chunk(tokenizer, texts: list[str], pairs: list[str | None] | None, rows: list[int],
                 max_length: int) -> Encoded:
    """Tokenize one chunk with truncation, count truncated and too-short rows, sort by length."""
    ids: list[list[int] | None] = [None] * len(texts)
    types: list[list[int] | None] = [None] * len(texts)
    has_pair = [i for i, p in enumerate(pairs or []) if p]
    single = [i for i in range(len(texts)) if not (pairs and pairs[i])]
    truncated = 0
    for group, with_pair in ((single, False), (has_pair, True)):
        if not group:
            continue
        a = [texts[i] for i in group]
        b = [pairs[i] for i in group] if with_pair else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        full = None
        long_rows = [k for k, x in enumerate(enc["input_ids"]) if len(x) >= max_length]
        if long_rows:
            full = tokenizer([a[k] for k in long_rows], [b[k] for k in long_rows] if b else None,
                             truncation=False, verbose=False)
            truncated += sum(len(x) > max_length for x in full["input_ids"])
        for k, i in enumerate(group):
            ids[i] = enc["input_ids"][k]
            if "token_type_ids" in enc:
                types[i] = enc["token_type_ids"][k]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    kept = [i for i in order if len(ids[i]) >= 2]
    return Encoded(
        ids=[ids[i] for i in kept],
        token_types=[types[i] for i in kept] if types and types[0] is not None else None,
        rows=[rows[i] for i in kept],
        truncated=truncated,
        short=len(order) - len(kept),
    )


def batch_spans(lengths: list[int], batch_size: int, equal_length: bool = False) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each batch over length-sorted sequences; ``equal_length``: one length per batch.

    >>> list(batch_spans([2, 2, 3, 3, 3], 2, equal_length=True))
    [(0, 2), (2, 4), (4, 5)]
    """
    start = 0
    while start < len(lengths):
        stop = min(start + batch_size, len(lengths))
        if equal_length:
            stop = next((i for i in range(start + 1, stop) if lengths[i] != lengths[start]), stop)
        yield start, stop
        start = stop


def make_batches(enc: Encoded, batch_size: int, pad_id: int, special_ids: list[int],
                 device: torch.device, equal_length: bool = False,
                 ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, list[int]]]:
    """Dynamic padding: yield ``(model inputs, special (B, Q) bool, source rows)`` per batch.

    ``equal_length`` (models whose attention changes with padding) puts only sequences of one length
    in a batch, so nothing is padded.
    """
    special = torch.tensor(special_ids, dtype=torch.long)
    for start, stop in batch_spans([len(x) for x in enc.ids], batch_size, equal_length):
        chunk = enc.ids[start:stop]
        n = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
        keep = torch.zeros((len(chunk), n), dtype=torch.long)
        for b, x in enumerate(chunk):
            input_ids[b, : len(x)] = torch.tensor(x)
            keep[b, : len(x)] = 1
        batch = {"input_ids": input_ids, "attention_mask": keep}
        if enc.token_types is not None:
            tt = torch.zeros((len(chunk), n), dtype=torch.long)
            for b, x in enumerate(enc.token_types[start:stop]):
                tt[b, : len(x)] = torch.tensor(x)
            batch["token_type_ids"] = tt
        is_special = torch.isin(input_ids, special) & keep.bool()
        yield ({k: v.to(device) for k, v in batch.items()}, is_special, enc.rows[start:stop])
