"""Trainer glue for refine: tokenized examples, training arguments, the epoch recorder, checkpoints, trackers.

Training itself is transformers' ``Trainer`` (so ``torchrun`` and ``accelerate launch`` work unchanged);
this module only adapts attnprobe's data and bookkeeping to it. The classification scores are scores.py's.
Besides checkpoints (the Trainer's) it writes only the saved model folder (``save_model``); reading data,
loading models and writing the run's tables and run.json are refine.py's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from attnprobe.errors import AttnprobeError
from attnprobe.runtime import outputs

PROGRESS_JSON = "attnprobe-progress.json"  # epoch-level rows so far, stored inside each checkpoint folder
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ---- data ----------------------------------------------------------------------------------------


class EncodedExamples(torch.utils.data.Dataset):
    """Tokenized examples (lists of ids, unpadded) with their label; DataCollatorWithPadding pads them."""

    def __init__(self, features: list[dict[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


def encode_examples(tokenizer, texts: list[str], pairs: list[str] | None, label_ids: list[int],
                    max_length: int) -> EncodedExamples:
    """Tokenize texts (and pairs) with truncation at ``max_length``; no padding (done per batch)."""
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    features = [{**{k: enc[k][i] for k in keys}, "labels": int(label_ids[i])} for i in range(len(texts))]
    return EncodedExamples(features)


# ---- arguments -----------------------------------------------------------------------------------


def training_arguments(cfg, checkpoints: Path, *, use_cpu: bool, show_progress: bool, eval_on_start: bool = True,
                       trackers: list[str] | None = None):
    """TrainingArguments for a RefineConfig: evaluate, log and save (unless ``--no-checkpoints``) once per
    epoch, nothing reported.

    ``eval_on_start`` evaluates once inside ``train()`` before the first step (the epoch-0 row). It must not be
    a ``trainer.evaluate()`` before ``train()``: under several processes that marks the model as prepared for
    evaluation, and ``train()`` then never wraps it in DistributedDataParallel, so gradients are not averaged.
    """
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints),
        eval_on_start=eval_on_start,
        seed=cfg.seed,
        data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        warmup_steps=float(cfg.warmup_ratio),  # a float in [0, 1) is a share of all steps
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,  # --max-steps overrides --epochs
        # every --eval-every steps instead of every epoch (evaluation, diagnostics, checkpoint, logged loss)
        eval_strategy="steps" if cfg.eval_every else "epoch",
        eval_steps=cfg.eval_every,
        save_strategy=("steps" if cfg.eval_every else "epoch") if cfg.checkpoints else "no",
        save_steps=cfg.eval_every or 500,
        logging_steps=cfg.eval_every or 500,
        # batches of similar lengths pad less; the order stays seeded
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_strategy="steps" if cfg.eval_every else "epoch",  # the mean loss since the last evaluation
        save_total_limit=2,  # the newest may be half-written when a run dies while saving
        save_only_model=False,  # optimizer, scheduler and RNG states too, so --resume continues exactly
        # the classification loss is a per-process mean; token averaging would scale it (and the eval loss)
        # by the number of processes
        average_tokens_across_devices=False,
        report_to=list(trackers or []),  # --report-to (report_to below; TensorBoard is added as a callback)
        disable_tqdm=not show_progress,
        use_cpu=use_cpu,
        bf16=cfg.dtype == "bfloat16",
        fp16=cfg.dtype == "float16",
        dataloader_pin_memory=not use_cpu,
        log_level="passive",  # leave transformers' verbosity as the caller set it
        log_level_replica="error",
    )


@contextlib.contextmanager
def progress_bars(show: bool):
    """Hide transformers' own bars (e.g. "Writing model shards" at every checkpoint) unless ``show``."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class QuietProgress(ProgressCallback):
    """The Trainer's progress bars without the log dictionaries it writes between them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


# ---- saving --------------------------------------------------------------------------------------


def save_model(trainer, tokenizer, target: Path, *, refined: bool, is_main: bool, barrier: Callable[[], None],
               variant: str | None = None) -> Path:
    """trainer.save_model into a temporary folder (on every process, as sharded setups need), then on the
    main process: the tokenizer, ``attn_implementation`` and ``attnprobe_variant`` in config.json (a later
    refine inherits the variant, lineage.py), and a rename to ``target``."""
    partial = target.with_name(f".{target.name}.partial")
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
    barrier()
    trainer.save_model(str(partial))
    if is_main:
        tokenizer.save_pretrained(str(partial))
        (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody needs to reload the model
        config_path = partial / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if refined:
            config["attn_implementation"] = "saobp"  # transformers does not write _attn_implementation
        if variant is not None:
            config["attnprobe_variant"] = variant
        outputs.atomic_write_json(config_path, config)
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
    barrier()
    return target


# ---- per-epoch bookkeeping -----------------------------------------------------------------------


def _json_ready(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    clean = []
    for row in rows:
        out = {}
        for k, v in row.items():
            if isinstance(v, (np.generic,)):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            out[k] = v
        clean.append(out)
    return clean


class EpochRecorder(TrainerCallback):
    """Records one history row per evaluation and, through ``diagnose``, the diagnostics rows of the
    model at that point; writes both into every checkpoint it sees saved, so --resume has them.

    Args:
        diagnose: ``(model, epoch, step) -> list of row dicts``, run on every process (each scans its
            share of the eval set and the sums are all-reduced).
        is_main: whether this process keeps the rows and writes files.
        settings: what the run was started with, stored with the rows to check a resume against.
        diagnose_every: also diagnose after every this many steps that no evaluation follows (--diagnose-every).
        scores: the task's score columns; each row takes ``eval_<score>`` from the Trainer's metrics (NaN where
            missing).

    ``log``, where set (refine ``--report-to``: the Trainer's ``log``), receives the scalars of each block of
    diagnostics (``callback.scalars``: per-layer means and flagged-head counts), so the trackers get them too.
    """

    def __init__(self, diagnose: Callable[[Any, float, int], list[dict]], *, is_main: bool,
                 settings: dict[str, Any], diagnose_every: int | None = None,
                 scores: tuple[str, ...] = ("accuracy", "f1", "mcc")):
        self.diagnose = diagnose
        self.scores = tuple(scores)
        self.diagnose_every = diagnose_every
        self._stepped: tuple[int, int] | None = None  # (step, rows before) of the latest --diagnose-every rows
        self.is_main = is_main
        self.settings = settings
        self.history: list[dict[str, Any]] = []
        self.diagnostics: list[dict[str, Any]] = []
        self._pending_loss = float("nan")
        self.log: Callable[[dict[str, float]], Any] | None = None

    def _send(self, rows: list[dict]) -> None:
        if self.log is not None and rows and self.is_main:
            import pandas as pd

            from attnprobe.training import callback

            self.log(callback.scalars(pd.DataFrame.from_records(rows)))

    def restore(self, progress: dict[str, Any]) -> None:
        self.history = list(progress.get("history", []))
        self.diagnostics = list(progress.get("diagnostics", []))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._pending_loss = float(logs["loss"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # DefaultFlowCallback ran first: at a step it evaluates, the evaluation takes the diagnostics
        if self.diagnose_every and state.global_step % self.diagnose_every == 0 and not control.should_evaluate:
            rows = self.diagnose(model, round(float(state.epoch or 0.0), 4), int(state.global_step))  # collective
            self._stepped = (int(state.global_step), len(self.diagnostics))
            if self.is_main:
                self.diagnostics.extend(rows)
            self._send(rows)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        metrics = metrics or {}
        epoch = round(float(state.epoch or 0.0), 4)
        step = int(state.global_step)
        self.history.append({
            "epoch": epoch, "step": step, "train_loss": self._pending_loss,
            # a masked LM's token-weighted loss (mlm.py) replaces the Trainer's mean of batch means
            "eval_loss": float(metrics.get("eval_mlm_loss", metrics.get("eval_loss", float("nan")))),
            **{name: float(metrics.get(f"eval_{name}", float("nan"))) for name in self.scores},
        })
        self._pending_loss = float("nan")
        rows = self.diagnose(model, epoch, step)  # a collective (all-reduce): every process takes part
        if self._stepped is not None and self._stepped[0] == step:  # an epoch's last step: keep the evaluation's
            del self.diagnostics[self._stepped[1]:]
        if self.is_main:
            self.diagnostics.extend(rows)
        if self._stepped is None or self._stepped[0] != step:  # a step already sent at on_step_end is not resent
            self._send(rows)

    def on_save(self, args, state, control, **kwargs):
        if self.is_main:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_progress(folder, self.progress())

    def progress(self) -> dict[str, Any]:
        return {"settings": self.settings, "history": _json_ready(self.history),
                "diagnostics": _json_ready(self.diagnostics)}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (step begin to step end: forward, backward and update; evaluation,
    checkpoints and most data loading fall outside), for run.json's ``step_time_s``."""

    def __init__(self):
        self.times: list[float] = []
        self._began: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._began is not None:
            self.times.append(time.perf_counter() - self._began)
            self._began = None

    def summary(self) -> dict[str, float | int] | None:
        if not self.times:
            return None
        return {"mean": float(np.mean(self.times)), "median": float(np.median(self.times)), "steps": len(self.times)}


def write_progress(folder: Path, progress: dict[str, Any]) -> None:
    outputs.atomic_write_json(folder / PROGRESS_JSON, progress)


def read_progress(folder: Path) -> dict[str, Any]:
    return json.loads((folder / PROGRESS_JSON).read_text(encoding="utf-8"))


def newest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint with the most steps that finished saving (it holds the progress file), or None."""
    if not checkpoints.is_dir():
        return None
    found = []
    for child in checkpoints.iterdir():
        m = _CHECKPOINT.match(child.name)
        if m and child.is_dir() and (child / PROGRESS_JSON).is_file():
            found.append((int(m.group(1)), child))
    return max(found)[1] if found else None


# ---- experiment trackers (--report-to) ---------------------------------------------------------------

TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                    "trackio": ("trackio",)}
TENSORBOARD_DIR = "tensorboard"


def report_to(name: str) -> list[str]:
    """The Trainer's ``report_to`` for ``--report-to NAME``, after checking that the tracker's package is there.

    TensorBoard is not in it: ``tensorboard_callbacks`` adds transformers' TensorBoardCallback with a writer
    for ``RUN_DIR/tensorboard`` (not under checkpoints/, which ``--no-checkpoints`` removes). The other
    trackers log where they are configured to (wandb/, mlruns/, ...).
    """
    import importlib.util

    if name == "none":
        return []
    if not any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[name]):
        raise AttnprobeError(f"--report-to {name} needs the {TRACKER_PACKAGES[name][0]} package; install it with "
                             f"`pip install 'attnprobe[{name}]'`")
    return [] if name == "tensorboard" else [name]


def tensorboard_callbacks(name: str, out: Path, *, is_main: bool) -> list[TrainerCallback]:
    """TensorBoardCallback writing into ``out/tensorboard`` on the main process, for ``--report-to tensorboard``."""
    if name != "tensorboard" or not is_main:
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / TENSORBOARD_DIR)))]
