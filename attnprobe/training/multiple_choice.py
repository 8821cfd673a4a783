"""``refine --task multiple-choice``: pick the right one of several endings or answers.

Data: JSON lines, Parquet or a ``save_to_disk`` folder with a context, an optional question, a list of
choices and the index of the right one. Two layouts are recognized by their columns: HellaSwag (``ctx_a``,
``ctx_b``, ``endings``, ``label``: the pair ``(ctx_a, ctx_b + " " + ending)`` per ending) and RACE
(``article``, ``question``, ``options``, ``answer`` as a letter: the pair ``(article, question + " " +
option)``, or the question with its ``_`` blank filled by the option). Others are named with
``--context-column``, ``--question-column`` (optional), ``--choices-column`` and ``--label-column``; a label
is a 0-based index or a letter A, B, ...

Each example becomes ``C`` sequences (one per choice, truncated to ``--max-length`` longest-first) scored by
``AutoModelForMultipleChoice``; batches are ``(B, C, L)``. The diagnostics ride the Trainer's evaluation pass
over every choice's sequence: ChoiceEvalProbe hands the probe the ``(B * C, L)`` masks of the sequences the
encoder sees, and sums each question's choices before the processes' sums are gathered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.capture.evalprobe import EvalProbe
from attnprobe.data import sources
from attnprobe.training import classification
from attnprobe.training.tasks import Built, Task

# layout name -> (context, question or None, choices, label, how the label is written)
LAYOUTS = {"hellaswag": ("ctx_a", "ctx_b", "endings", "label"), "race": ("article", "question", "options", "answer")}
ID_COLUMNS = ("id", "example_id", "ind")


@dataclass
class ChoiceData:
    """Examples with ``C`` choices each; ``firsts[i][c]`` / ``seconds[i][c]`` are choice c's two texts."""

    ids: list[Any]
    firsts: list[list[str]]
    seconds: list[list[str]]
    labels: list[int]
    stats: dict
    label_names: list[str] = field(default_factory=list)

    def subset(self, index: list[int], stats: dict) -> ChoiceData:
        index = sorted(index)
        return ChoiceData(*([getattr(self, k)[i] for i in index] for k in ("ids", "firsts", "seconds", "labels")),
                          {**stats, "examples_used": len(index)})


def _columns(name: str, columns: list[str], cfg) -> tuple[str, str | None, str, str, str]:
    """``(layout, context, question, choices, label)`` columns: the named ones, or a recognized layout's."""
    given = (cfg.context_column, cfg.question_column, cfg.choices_column, cfg.label_column)
    if any(g is not None for g in given):
        if cfg.context_column is None or cfg.choices_column is None:
            raise AttnprobeError("multiple choice with named columns needs --context-column and --choices-column "
                                 "(--question-column and --label-column as needed)")
        context, question, choices, label = given
        label = label or "label"
        for flag, col in (("--context-column", context), ("--question-column", question),
                          ("--choices-column", choices), ("--label-column", label)):
            if col is not None and col not in columns:
                raise AttnprobeError(f"{name} has no column {col!r} (given with {flag}); columns found: "
                                     f"{', '.join(columns)}")
        return "columns", context, question, choices, label
    for layout, cols in LAYOUTS.items():
        if all(c in columns for c in cols if c is not None):
            return (layout, *cols)
    raise AttnprobeError(f"{name} is in neither the HellaSwag (ctx_a, ctx_b, endings, label) nor the RACE layout "
                         f"(article, question, options, answer) (columns found: {', '.join(columns)}); pass "
                         "--context-column, --choices-column and --label-column")


def _label(name: str, where: str, value: Any, choices: int) -> int:
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        index = ord(value.strip().upper()) - ord("A")
    else:
        try:
            index = int(str(value).strip()) if not isinstance(value, (int, np.integer)) else int(value)
        except ValueError:
            raise AttnprobeError(f"{name} {where} has a label {value!r} that is neither a choice index nor a "
                                 "letter") from None
    if not 0 <= index < choices:
        raise AttnprobeError(f"{name} {where} has the label {value!r}, out of range for its {choices} choices")
    return index


def read_choices(path: str, cfg) -> ChoiceData:
    """Read multiple-choice examples; every example must have the same number of choices (2 or more)."""
    name = str(path)
    columns, rows, stats = sources.read_rows(path, encoding=cfg.encoding)
    layout, context_col, question_col, choices_col, label_col = _columns(name, columns, cfg)
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    data = ChoiceData([], [], [], [], {**stats, "layout": layout})
    for n, row in enumerate(rows):
        where = f"row {n + 1}"
        choices = row.get(choices_col)
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise AttnprobeError(f"{name} {where}: {choices_col!r} must be a list of 2 or more choices")
        if data.firsts and len(choices) != len(data.firsts[0]):
            raise AttnprobeError(f"{name} {where} has {len(choices)} choices where row 1 has {len(data.firsts[0])}; "
                                 "every example needs the same number")
        context = str(row.get(context_col) or "").strip()
        question = str(row.get(question_col) or "").strip() if question_col else ""
        if not context:
            raise AttnprobeError(f"{name} {where} has an empty {context_col!r}")
        if row.get(label_col) is None:
            raise AttnprobeError(f"{name} {where} has no label in {label_col!r}")
        seconds = [question.replace("_", str(c).strip()) if "_" in question and layout == "race"
                   else f"{question} {str(c).strip()}".strip() for c in choices]
        data.ids.append(row.get(id_col) if id_col else n)
        data.firsts.append([context] * len(choices))
        data.seconds.append(seconds)
        data.labels.append(_label(name, where, row.get(label_col), len(choices)))
    if not data.ids:
        raise AttnprobeError(f"{name} holds no examples")
    data.stats.update(examples=len(data.ids), choices=len(data.firsts[0]))
    return data


def prepare_data(cfg) -> tuple[ChoiceData, ChoiceData]:
    """Train and eval examples: the files, or a seeded ``--eval-split`` hold-out; seeded samples."""
    train = read_choices(cfg.train, cfg)
    evaluation = None
    if cfg.eval is not None:
        evaluation = read_choices(cfg.eval, cfg)
        if len(evaluation.firsts[0]) != len(train.firsts[0]):
            raise AttnprobeError(f"{cfg.eval} has {len(evaluation.firsts[0])} choices per example where {cfg.train} "
                                 f"has {len(train.firsts[0])}")
    train_index, eval_all, eval_index, eval_stats = classification.choose_rows(
        cfg, random.Random(cfg.seed), train, len(train.ids), evaluation,
        0 if evaluation is None else len(evaluation.ids), "examples")
    return train.subset(train_index, {**train.stats, "source": "file"}), eval_all.subset(eval_index, eval_stats)


# ---- features, batches, scores ---------------------------------------------------------------------


def encode(tokenizer, data: ChoiceData, max_length: int) -> list[dict[str, Any]]:
    """One feature per example: every input a list of ``C`` token lists, and ``labels``."""
    flat_first = [t for texts in data.firsts for t in texts]
    flat_second = [t for texts in data.seconds for t in texts]
    enc = tokenizer(flat_first, flat_second, truncation="longest_first", max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    c = len(data.firsts[0]) if data.firsts else 0
    return [{**{k: enc[k][i * c:(i + 1) * c] for k in keys}, "labels": int(data.labels[i])}
            for i in range(len(data.ids))]


class ChoiceCollator:
    """Pads the ``B * C`` sequences of a batch together: inputs ``(B, C, L)``, ``labels`` ``(B,)``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        keys = [k for k in features[0] if k != "labels"]
        c = len(features[0]["input_ids"])
        flat = [{k: f[k][j] for k in keys} for f in features for j in range(c)]
        batch = self.tokenizer.pad(flat, padding=True, return_tensors="pt")
        out = {k: v.view(len(features), c, -1) for k, v in batch.items()}
        out["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return out


class ChoiceMetrics:
    """``compute_metrics``: accuracy of the argmax over the ``(N, C)`` choice logits."""

    def __init__(self, data: ChoiceData):
        self.data = data
        self.last_logits: np.ndarray | None = None

    def __call__(self, prediction) -> dict[str, float]:
        logits = prediction.predictions
        logits = np.asarray(logits[0] if isinstance(logits, (tuple, list)) else logits)
        self.last_logits = logits
        return {"accuracy": float((logits.argmax(-1) == np.asarray(self.data.labels)).mean())}

    def predictions(self) -> list[dict[str, Any]] | None:
        if self.last_logits is None:
            return None
        return [{"id": i, "prediction": int(p)} for i, p in zip(self.data.ids, self.last_logits.argmax(-1))]


class ChoiceEvalProbe(EvalProbe):
    """An EvalProbe for ``(B, C, L)`` batches: the masks of the ``B * C`` sequences the encoder runs (row-major,
    as the model flattens them), and each process's per-sequence sums regrouped ``(B, C, ...)`` for the
    gather, which drops repeated examples by the first dimension."""

    def masks(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        flat = {k: inputs[k].flatten(0, 1) for k in ("input_ids", "attention_mask") if k in inputs}
        return super().masks(flat)

    def run(self, inputs: dict, forward, gather=None):
        c = inputs["input_ids"].shape[1]
        regrouped = None if gather is None else (
            lambda per: {k: v.flatten(0, 1) for k, v in gather({k: v.unflatten(0, (-1, c)) for k, v in per.items()}).items()})
        return super().run(inputs, forward, gather=regrouped)


def build(tokenizer, train_data: ChoiceData, eval_data: ChoiceData, max_length: int, cfg) -> Built:
    from attnprobe.training.trainer import EncodedExamples

    return Built(EncodedExamples(encode(tokenizer, train_data, max_length)),
                 EncodedExamples(encode(tokenizer, eval_data, max_length)), ChoiceCollator(tokenizer),
                 ChoiceMetrics(eval_data))


TASK = Task(name="multiple-choice", scores=("accuracy",), prepare_data=prepare_data, build=build,
            scan_texts=lambda d: ([t for x in d.firsts for t in x], [t for x in d.seconds for t in x]),
            eval_probe=ChoiceEvalProbe.for_model, encoder_only_forward=True, predictions=True)
