"""``refine --task sequence-classification``: labelled texts (and pairs), a classification head, accuracy/F1/MCC.

Reads the labelled files (``data.sources.read_labeled``), holds out a seeded eval split without ``--eval``,
samples ``--max-train-samples`` / ``--max-eval-samples``, tokenizes with truncation at ``--max-length`` and
scores with scores.py. The diagnostics ride the Trainer's evaluation pass.
"""

from __future__ import annotations

import random

from attnprobe.errors import AttnprobeError
from attnprobe.data import sources
from attnprobe.training.tasks import Built, Task


def subset(d: sources.LabeledData, index: list[int], stats: dict) -> sources.LabeledData:
    index = sorted(index)
    ids = [d.label_ids[i] for i in index]
    stats = {**stats, "rows_used": len(index),
             "label_counts_used": {n: ids.count(k) for k, n in enumerate(d.label_names)}}
    return sources.LabeledData([d.texts[i] for i in index], None if d.pairs is None else [d.pairs[i] for i in index],
                               ids, list(d.label_names), stats)


def sample(n: int, most: int | None, rng: random.Random) -> list[int]:
    """``most`` of the indices ``0..n-1`` drawn with ``rng`` (all of them when ``most`` is None or >= n)."""
    if most is None or most >= n:
        return list(range(n))
    if most < 1:
        raise AttnprobeError(f"--max-train-samples/--max-eval-samples must be 1 or more (got {most})")
    return rng.sample(range(n), most)


def split_indices(n: int, cfg, rng: random.Random, path) -> tuple[list[int], list[int]]:
    """``(train, eval)`` indices of a seeded ``--eval-split`` hold-out of ``n`` training rows."""
    n_eval = max(1, round(cfg.eval_split * n))
    if n - n_eval < 1:
        raise AttnprobeError(f"{path} has {n} labelled rows, too few to hold out an eval split; "
                             "pass more rows or a separate --eval FILE")
    order = list(range(n))
    rng.shuffle(order)
    return order[n_eval:], order[:n_eval]


def choose_rows(cfg, rng: random.Random, train, n_train: int, evaluation, n_eval: int, count_key: str):
    """The rows a run trains and evaluates on: all of ``--eval`` (``evaluation``, or a seeded ``--eval-split``
    hold-out of the ``n_train`` training rows when it is None), then seeded ``--max-train-samples`` /
    ``--max-eval-samples`` samples. Returns ``(train_index, eval_source, eval_index, eval_stats)``, the eval
    indices into ``eval_source``; ``count_key`` names the hold-out's size in its stats."""
    if evaluation is not None:
        train_index, eval_index, eval_source = list(range(n_train)), list(range(n_eval)), evaluation
        eval_stats = {**evaluation.stats, "source": "file"}
    else:
        train_index, eval_index = split_indices(n_train, cfg, rng, cfg.train)
        eval_source = train
        eval_stats = {"source": f"seeded {cfg.eval_split:g} split of the training file",
                      "path": train.stats.get("path"), count_key: len(eval_index)}
    train_index = [train_index[i] for i in sample(len(train_index), cfg.max_train_samples, rng)]
    eval_index = [eval_index[i] for i in sample(len(eval_index), cfg.max_eval_samples, rng)]
    return train_index, eval_source, eval_index, eval_stats


def prepare_data(cfg) -> tuple[sources.LabeledData, sources.LabeledData]:
    """Train and eval examples: the files as read, a seeded eval split without ``--eval``, seeded samples."""
    columns = dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                   label_column=cfg.label_column, encoding=cfg.encoding)
    train = sources.read_labeled(cfg.train, **columns)
    evaluation = None
    if cfg.eval is not None:
        evaluation = sources.read_labeled(cfg.eval, label_names=train.label_names, min_classes=1, **columns)
    train_index, eval_all, eval_index, eval_stats = choose_rows(
        cfg, random.Random(cfg.seed), train, len(train.texts), evaluation,
        0 if evaluation is None else len(evaluation.texts), "rows_read")
    train_stats = {**train.stats, "source": "file"}
    return subset(train, train_index, train_stats), subset(eval_all, eval_index, eval_stats)


def build(tokenizer, train_data: sources.LabeledData, eval_data: sources.LabeledData, max_length: int,
          cfg) -> Built:
    """Tokenized examples (padded per batch by DataCollatorWithPadding) and scores.MetricsFn."""
    from transformers import DataCollatorWithPadding

    from attnprobe.training import scores, trainer

    train_set, eval_set = (trainer.encode_examples(tokenizer, d.texts, d.pairs, d.label_ids, max_length)
                           for d in (train_data, eval_data))
    return Built(train_set, eval_set, DataCollatorWithPadding(tokenizer), scores.MetricsFn(len(train_data.label_names)))


TASK = Task(name="sequence-classification", scores=("accuracy", "f1", "mcc"), prepare_data=prepare_data,
            build=build, scan_texts=lambda d: (d.texts, d.pairs))
