"""What refine does per ``--task``: one ``Task`` per task module, looked up by name here.

refine.py runs the same loop for every task (variants, Trainer, diagnostics, resume, run folder); a Task
supplies what differs: reading the train and eval data, the datasets, collator and ``compute_metrics``, the
score columns of history.parquet, the texts a separate diagnostics scan reads, and what goes to
``predictions.jsonl``. Adding a task is one module that defines ``TASK = Task(...)`` plus one entry in
``MODULES`` (and its name in ``config.TASKS``; ``models.loading.load_model`` picks the Auto class by name).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnprobe.errors import AttnprobeError

# task name -> the module that defines its TASK
MODULES = {
    "sequence-classification": "attnprobe.training.classification",
    "masked-lm": "attnprobe.training.masked_lm",
    "question-answering": "attnprobe.training.question_answering",
    "multiple-choice": "attnprobe.training.multiple_choice",
    "causal-lm": "attnprobe.training.causal_lm",
}


@dataclass
class Built:
    """A task's Trainer inputs for one run.

    Attributes:
        train_set, eval_set: ``torch.utils.data.Dataset`` of feature dicts (model inputs and labels only).
        collator: the Trainer's ``data_collator``.
        metrics: the Trainer's ``compute_metrics``; it keeps ``last_logits`` (the latest evaluation's model
            outputs, or None) and, for tasks with ``predictions.jsonl``, ``predictions()`` (a list of
            ``{"id", "prediction"}`` of the latest evaluation).
        preprocess_logits: the Trainer's ``preprocess_logits_for_metrics``, or None.
    """

    train_set: Any
    eval_set: Any
    collator: Any
    metrics: Any
    preprocess_logits: Callable | None = None


@dataclass(frozen=True)
class Task:
    """One refine task.

    Attributes:
        name: the ``--task`` value.
        scores: history.parquet's score columns (after epoch, step, train_loss, eval_loss); the Trainer's
            metrics ``eval_<score>``.
        prepare_data: ``cfg -> (train_data, eval_data)``; each has ``stats`` (dict) and ``label_names``.
        build: ``(tokenizer, train_data, eval_data, max_length, cfg) -> Built``.
        scan_texts: ``eval_data -> (texts, pairs or None)``: the sequences a separate diagnostics scan
            (and ``--patterns``) reads.
        probe_in_eval: whether the Trainer's evaluation batches can carry the diagnostics probe (else a
            separate scan of ``scan_texts``).
        eval_probe: ``(loaded, hops) -> EvalProbe`` for tasks whose batches need their own masks (None: the
            plain ``capture.evalprobe.EvalProbe``).
        encoder_only_forward: a forward pass of the model on plain ``(B, L)`` token ids fails (multiple
            choice wants ``(B, C, L)``): scans and ``--patterns`` run its ``base_model``.
        predictions: whether refine writes ``predictions.jsonl``.
    """

    name: str
    scores: tuple[str, ...]
    prepare_data: Callable[[Any], tuple[Any, Any]]
    build: Callable[..., Built]
    scan_texts: Callable[[Any], tuple[list[str], list[str] | None]]
    probe_in_eval: bool = True
    eval_probe: Callable[[Any, int], Any] | None = None
    encoder_only_forward: bool = False
    predictions: bool = False


def get(name: str) -> Task:
    """The Task named ``name`` (its module is imported on first use)."""
    if name not in MODULES:
        raise AttnprobeError(f"unknown --task {name!r}; choose one of {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name]).TASK


def scan_model(task: Task, model):
    """The module a separate scan or ``--patterns`` runs: the model, or its encoder for multiple choice."""
    return getattr(model, "base_model", model) if task.encoder_only_forward else model
