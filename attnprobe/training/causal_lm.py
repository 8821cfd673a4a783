"""Next-token training for ``refine --task causal-lm``: plain text in ``--max-length`` blocks, loss and perplexity.

refine.py runs the training (variants, Trainer, diagnostics, resume, run folder) as for every task; this module
supplies the data (the documents of ``--train`` / ``--eval``, read as for masked LM, concatenated and cut into
blocks with the tokenizer's own special tokens around each), the collator (labels are the inputs: the model
shifts them; padding of the last, shorter block is left out of the loss), and the token-weighted eval loss and
perplexity over every predicted next token. Diagnostics come from a scan of the eval documents, as for masked
LM. ``--init`` builds a fresh decoder of MODEL's family (masked_lm.fresh_checkpoint with a causal-LM head).
"""

from __future__ import annotations

from typing import Any

import torch

from attnprobe.data import sources
from attnprobe.errors import AttnprobeError
from attnprobe.training import masked_lm


class BlockCollator:
    """Pads blocks to the longest in the batch; ``labels`` are the input ids, -100 on padding."""

    def __init__(self, tokenizer):
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)

        def padded(key: str, fill: int) -> torch.Tensor:
            return torch.tensor([list(f[key]) + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)

        # labels are the inputs (the model shifts them); padding (-100) is left out of the loss
        input_ids, attention_mask = padded("input_ids", self.pad), padded("attention_mask", 0)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": torch.where(attention_mask > 0, input_ids, -100)}


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row ``[sum of -log p(next token), number of predicted tokens]``: position t predicts label t + 1.

    The Trainer's ``preprocess_logits_for_metrics``; ``(B, T, V), (B, T) -> (B, 2)`` float64.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return masked_lm.token_nll(logits[:, :-1], labels[:, 1:])


class PerplexityFn:
    """``compute_metrics`` for causal-LM evaluation: ``lm_loss`` (mean next-token loss) and its exp."""

    last_logits = None

    def __call__(self, prediction) -> dict[str, float]:
        preds = prediction.predictions
        if isinstance(preds, (tuple, list)):
            preds = preds[0]
        return masked_lm.perplexity_scores(preds, "lm_loss")


def block_sets(tokenizer, train_data: sources.LabeledData, eval_data: sources.LabeledData, max_length: int):
    """The train and eval blocks as Datasets (no labels stored: the collator copies the inputs)."""
    from attnprobe.training.trainer import EncodedExamples

    blocks = {}
    for name, data in (("train", train_data), ("eval", eval_data)):
        blocks[name] = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
                        for b in masked_lm.group_blocks(tokenizer, data.texts, max_length)]
        data.stats["blocks"] = len(blocks[name])
        data.stats["tokens"] = sum(len(b["input_ids"]) for b in blocks[name])
    eval_data.stats["predicted_tokens"] = sum(len(b["input_ids"]) - 1 for b in blocks["eval"])
    if eval_data.stats["predicted_tokens"] == 0:
        raise AttnprobeError("the eval documents hold fewer than 2 tokens, so no next token can be predicted; "
                             "pass more --eval text")
    return EncodedExamples(blocks["train"]), EncodedExamples(blocks["eval"])


def _build(tokenizer, train_data, eval_data, max_length: int, cfg):
    from attnprobe.training.tasks import Built

    train_set, eval_set = block_sets(tokenizer, train_data, eval_data, max_length)
    return Built(train_set, eval_set, BlockCollator(tokenizer), PerplexityFn(), next_token_nll)


def _task():
    from attnprobe.training.tasks import Task

    # the diagnostics come from a scan of the eval documents (as for masked LM), not of the blocks
    return Task(name="causal-lm", scores=("perplexity",), prepare_data=masked_lm.prepare_documents, build=_build,
                scan_texts=lambda d: (d.texts, None), probe_in_eval=False)


TASK = _task()
