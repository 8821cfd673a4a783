"""refine(config) -> RefineResult: fine-tune a model with a SAOBP variant, with diagnostics per epoch.

Reads the task's data (tasks.py: classification.py, masked_lm.py, question_answering.py, multiple_choice.py),
loads the model with the variant's attention (loading.py), trains with transformers' Trainer (trainer.py
holds that glue), takes the diagnostics of the eval set before training and after every epoch from the
Trainer's own evaluation forward passes (evalprobe.py; a separate scanner.run_batches scan where the
evaluation cannot carry the probe), keeps a few eval examples' full attention before and after training
(stage_patterns.py), and writes ``model/``, ``history.parquet``, ``diagnostics.parquet``,
``patterns.parquet``, ``predictions.jsonl`` (question answering, multiple choice) and, last, ``run.json``
into the run folder. Under ``torchrun`` or ``accelerate
launch`` each process probes its share of the eval set (sums combined over processes) and only the main
process writes files. This module prints nothing; summaries.py turns a RefineResult into the
closing table.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnprobe.errors import AttnprobeError
from attnprobe.runtime import memory
from attnprobe.data import sources
from attnprobe.training import masked_lm
from attnprobe.runtime import outputs
from attnprobe.training import stage_patterns, tasks
from attnprobe.config import RefineConfig, to_dict
from attnprobe.training.run_folder import CHECKPOINTS, MODEL_DIR, check_folder, check_resume, out_dir, prepare_folder

PREDICTIONS = "predictions.jsonl"  # one {"id", "prediction"} per eval example (question answering, multiple choice)


@dataclass
class RefineResult:
    """What a refine produced.

    Attributes:
        out_dir: the run folder.
        history: one row per evaluation (epoch, step, train_loss, eval_loss and the task's scores).
        diagnostics: the scan columns per (epoch, layer, head), with ``epoch`` and ``variant``.
        meta: the content of run.json.
        eval_logits: ``(N, C)`` logits of the final model on ``eval_data``, in its order (classification;
            the task's model outputs of the last evaluation otherwise).
        eval_data: the evaluation examples used.
        predictions: the ``{"id", "prediction"}`` rows of predictions.jsonl (None for tasks without it).
        model, tokenizer: the trained model and its tokenizer.
        is_main: False on the other processes of a multi-process run, which wrote and print nothing.
    """

    out_dir: Path
    history: Any  # pandas.DataFrame
    diagnostics: Any  # pandas.DataFrame
    meta: dict[str, Any]
    eval_logits: Any  # numpy.ndarray
    eval_data: Any  # sources.LabeledData, or the task's own eval examples
    model: Any = None
    tokenizer: Any = None
    is_main: bool = True
    predictions: list[dict[str, Any]] | None = None


def prepare_data(cfg: RefineConfig):
    """Train and eval examples of ``cfg.task`` (tasks.py), e.g. LabeledData for classification."""
    return tasks.get(cfg.task).prepare_data(cfg)


# ---- model ---------------------------------------------------------------------------------------


def _saobp_settings(cfg: RefineConfig, spec: str):
    """The SaobpSettings of the variant, with ``--bp-layers`` resolved against the model's layer count."""
    from attnprobe.models import checkpoints, loading
    from attnprobe.formulas.saobp import SaobpSettings, parse_bp_layers

    path, _, _ = checkpoints.resolve_model(spec)
    config = loading.load_config(path, cfg.trust_remote_code)
    total = int(getattr(config, loading.layers_attr(config)))
    num_layers = min(cfg.num_layers or total, total)
    try:
        layers = parse_bp_layers(cfg.bp_layers, num_layers)
    except ValueError as exc:
        raise AttnprobeError(str(exc)) from None
    variant = cfg.variant if cfg.gamma is None else "custom"
    return SaobpSettings(gamma=cfg.effective_gamma, strength=cfg.strength, layers=layers, variant=variant)


def _load(cfg: RefineConfig, num_labels: int, label_names: list[str], spec: str, tokenizer: str | None):
    from attnprobe.models import loading

    settings = _saobp_settings(cfg, spec)
    try:
        return loading.load_model(
            spec, task=cfg.task, num_labels=num_labels, label_names=label_names,
            num_layers=cfg.num_layers, saobp=settings, device="cpu",  # the Trainer places it
            dtype="float64" if cfg.dtype == "float64" else "float32",  # half precision trains as mixed precision
            allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer)
    except RuntimeError as exc:  # --bp-layers on an architecture whose attention modules have no layer index
        if "layer index" not in str(exc):
            raise
        raise AttnprobeError(f"{cfg.model} cannot run --variant {cfg.variant} with --bp-layers {cfg.bp_layers}: "
                             f"{str(exc).splitlines()[0]}") from None


def _resolve_device(cfg: RefineConfig) -> bool:
    """Check --device and --dtype; return whether training runs on the CPU."""
    import torch

    from attnprobe.models import loading

    device = loading.pick_device(cfg.device)
    use_cpu = device.type == "cpu"
    if use_cpu and cfg.dtype == "float16":
        raise AttnprobeError("--dtype float16 (mixed precision) needs a CUDA device; "
                             "use bfloat16 or float32 on the CPU")
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device)
    return use_cpu


# ---- diagnostics ---------------------------------------------------------------------------------


def _diagnose(loaded, eval_data: sources.LabeledData, cfg: RefineConfig, max_length: int, variant: str,
              captured=None, scan_model=lambda model: model):
    """A function ``(model, epoch, step) -> rows``: the scan's head table of the model on the eval set.

    Called at an evaluation, it takes the sums that ``captured`` (an evalprobe.EvalProbe) gathered in the
    Trainer's own evaluation forward passes, so the eval set is read once. Elsewhere (or without
    ``captured``) it scans the eval set: under several processes every process calls it and scans its share
    of the rows; the sums are all-reduced (as in a distributed scan), so every process gets the table of
    the whole eval set. ``eval_data`` has ``texts`` and ``pairs`` (tasks.Task.scan_texts); ``scan_model``
    picks the module the scan runs (tasks.scan_model).
    """
    from attnprobe.runtime import parallel
    from attnprobe.scanning import passes, scanner, tables

    def diagnose(model, epoch: float, step: int) -> list[dict[str, Any]]:
        totals = captured.take() if captured is not None else None
        if totals is None:
            totals = scan(model)
        heads = tables.head_frame(totals, cfg.thresholds)
        heads.insert(0, "epoch", float(epoch))
        heads.insert(1, "step", int(step))
        heads["variant"] = variant
        return heads.astype(object).where(heads.notna(), None).to_dict(orient="records")

    def scan(model):
        model = model if model is not None else loaded.model
        was_training = model.training
        model.eval()
        loaded.device = next(model.parameters()).device
        rows = list(range(len(eval_data.texts)))
        size = scanner.CHUNK_ROWS
        chunks = [sources.Chunk(eval_data.texts[i:i + size],
                             None if eval_data.pairs is None else eval_data.pairs[i:i + size], None, rows[i:i + size])
                  for i in range(0, len(rows), size)]
        try:
            probe, _ = passes.run_batches(loaded, chunks, batch_size=cfg.eval_batch_size or cfg.batch_size,
                                        max_length=max_length, hops=cfg.hops, model=scan_model(model),
                                        world=parallel.current_world(cfg.device),
                                        sample_queries=cfg.sample_queries, seed=cfg.seed)
        finally:
            model.train(was_training)
        return probe.totals()

    return diagnose


def _frames(history_rows: list[dict], diag_rows: list[dict], task: str = "sequence-classification"):
    import pandas as pd

    from attnprobe.scanning import tables

    scores = tasks.get(task).scores
    history = pd.DataFrame.from_records(history_rows, columns=["epoch", "step", "train_loss", "eval_loss", *scores])
    history = history.astype({"epoch": "float64", "step": "int64", "train_loss": "float64", "eval_loss": "float64",
                              **{name: "float64" for name in scores}})
    if not diag_rows:  # processes other than the main one compute no diagnostics
        return history, pd.DataFrame(columns=["epoch", "step", "layer", "head", *tables.METRIC_COLUMNS, "variant"])
    diagnostics = pd.DataFrame.from_records(diag_rows)
    for name in tables.METRIC_COLUMNS:
        diagnostics[name] = diagnostics[name].astype("float64")
    diagnostics = diagnostics.astype({"epoch": "float64", "step": "int64", "layer": "int64", "head": "int64"})
    return history, diagnostics.sort_values(["epoch", "layer", "head"], kind="stable", ignore_index=True)


def _final(history, task: str = "sequence-classification") -> dict[str, float | None]:
    last = history.iloc[-1]
    return {k: (None if math.isnan(float(last[k])) else float(last[k])) for k in (*tasks.get(task).scores, "eval_loss")}


# ---- the command ---------------------------------------------------------------------------------


def refine(cfg: RefineConfig, show_progress: bool = False, callbacks: list | None = None) -> RefineResult:
    """Fine-tune ``cfg.model`` for ``cfg.task`` with ``cfg.variant`` and write the run folder.

    Args:
        cfg: the options (``cfg.train`` is required).
        show_progress: show the Trainer's progress bars.
        callbacks: extra ``transformers.TrainerCallback`` objects (e.g. early stopping).

    Returns:
        RefineResult with the history, the diagnostics, run.json's content and the final eval logits.
    """
    import transformers
    from accelerate import PartialState
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from attnprobe.data import batching
    from attnprobe.capture import evalprobe
    from attnprobe.training.probing_trainer import ProbingTrainer
    from attnprobe.training import lineage
    from attnprobe.scanning import scanner
    from attnprobe.training import trainer

    cfg, variant_source = lineage.resolve_variant(cfg.validate())
    task = tasks.get(cfg.task)
    started = time.time()
    use_cpu = _resolve_device(cfg)
    kept_freed_memory = use_cpu and memory.keep_freed_memory()  # fewer page faults per step (memory.py)
    out = out_dir(cfg)
    resume_from = check_folder(cfg, out)
    trainer.report_to(cfg.report_to)  # a missing tracker package fails before any slow work
    train_data, eval_data = task.prepare_data(cfg)
    names = train_data.label_names
    with tempfile.TemporaryDirectory(prefix="attnprobe-init-") as fresh:
        init = None if cfg.init is None else masked_lm.fresh_checkpoint(
            cfg.model, cfg.init, cfg.tokenizer, Path(fresh), cfg.seed, cfg.trust_remote_code,
            causal=cfg.task == "causal-lm")
        transformers.set_seed(cfg.seed)  # the new classifier head is initialised from this
        # a fresh model's folder holds its tokenizer (--tokenizer's, if given) already
        loaded = _load(cfg, len(names), names, fresh if init else cfg.model, None if init else cfg.tokenizer)
    if init:  # the temporary folder is gone; the run is named after the family it was built from
        loaded.info.update(name=cfg.model, path=None, source=f"--init {cfg.init}", weights_sha256=None)
    settings = loaded.saobp
    refined = settings is not None
    max_length = batching.effective_max_length(loaded, cfg.max_length)
    tokenizer = loaded.tokenizer
    built = task.build(tokenizer, train_data, eval_data, max_length, cfg)
    eval_set, metrics_fn = built.eval_set, built.metrics
    texts, pairs = task.scan_texts(eval_data)  # what a separate scan and --patterns read
    scanned = sources.LabeledData(texts, pairs, [0] * len(texts), [], {})

    args = trainer.training_arguments(cfg, out / CHECKPOINTS, use_cpu=use_cpu, show_progress=show_progress,
                                       eval_on_start=resume_from is None,  # epoch 0: before any training
                                       trackers=trainer.report_to(cfg.report_to))
    state = PartialState()  # set up by the TrainingArguments above
    is_main = state.is_main_process
    barrier = state.wait_for_everyone
    run_settings = {"model": cfg.model, "variant": cfg.variant, "saobp": settings.to_json() if settings else None,
                    "label_names": names, "seed": cfg.seed, "num_layers": loaded.num_layers, "task": cfg.task}
    # diagnostics from the Trainer's own evaluation pass where the task's batches allow (not masked-LM's
    # [MASK]ed text), else from a separate scan of scan_texts
    # with --sample-queries the diagnostics come from a separate (sampled) scan of the eval set
    probing = task.probe_in_eval and evalprobe.supported(loaded, args) and not cfg.sample_queries
    eval_probe = (task.eval_probe or evalprobe.EvalProbe.for_model)(loaded, cfg.hops) if probing else None
    diagnose = _diagnose(loaded, scanned, cfg, max_length, cfg.variant, eval_probe, lambda m: tasks.scan_model(task, m))
    recorder = trainer.EpochRecorder(diagnose, is_main=is_main, settings=run_settings,
                                      diagnose_every=cfg.diagnose_every, scores=task.scores)
    if resume_from is not None:
        progress = trainer.read_progress(resume_from)
        check_resume(progress, run_settings, resume_from)
        recorder.restore(progress)
    # the same few eval examples' full attention before training (saved beside the checkpoints) and after it
    staged = stage_patterns.StagePatterns(cfg.patterns, loaded, scanned, max_length, out / CHECKPOINTS) \
        if cfg.patterns and is_main else None
    if is_main:
        prepare_folder(cfg, out)
        if staged is not None:
            staged.before(tasks.scan_model(task, loaded.model), resumed=resume_from is not None)
    barrier()
    hf_trainer = ProbingTrainer(
        model=loaded.model, args=args, train_dataset=built.train_set, eval_dataset=eval_set,
        processing_class=tokenizer, data_collator=built.collator, compute_metrics=metrics_fn,
        preprocess_logits_for_metrics=built.preprocess_logits,
        callbacks=[recorder, timer := trainer.StepTimer(), *(callbacks or []),
                   *trainer.tensorboard_callbacks(cfg.report_to, out, is_main=is_main)],
        eval_probe=eval_probe)  # diagnostics from the eval pass where it can carry the probe
    hf_trainer.remove_callback(PrinterCallback)  # it prints every log dict on stdout
    if cfg.report_to != "none":  # the diagnostics' scalars go to the trackers through Trainer.log
        recorder.log = hf_trainer.log
    if show_progress:
        hf_trainer.remove_callback(ProgressCallback)
        hf_trainer.add_callback(trainer.QuietProgress)

    with trainer.progress_bars(show_progress):
        evaluations = len(recorder.history) + (resume_from is None)  # + the evaluation on start
        hf_trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        # predictions.jsonl holds the last evaluation's, as history's last row does
        predictions = metrics_fn.predictions() if task.predictions else None
        if task.name == "sequence-classification" and len(recorder.history) == evaluations:
            metrics_fn.last_logits = hf_trainer.predict(eval_set).predictions  # no evaluation kept the final logits
        model_dir = trainer.save_model(hf_trainer, tokenizer, out / MODEL_DIR, refined=refined, is_main=is_main,
                                         barrier=barrier, variant=cfg.variant)
        if staged is not None:
            staged.after(tasks.scan_model(task, hf_trainer.model))  # the model just saved to model/
    if not cfg.checkpoints and is_main:  # nothing to resume from: keep no (stale) checkpoints
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)

    history, diagnostics = _frames(recorder.history, recorder.diagnostics if is_main else [], cfg.task)
    meta = {
        "kind": "refine",
        "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": cfg.task,
        "variant": cfg.variant,
        "variant_from": variant_source,
        "init": init,
        "parameters": masked_lm.parameter_count(hf_trainer.model),
        "parent": lineage.parent_run(cfg.model),
        "saobp": settings.to_json() if settings else None,
        "model": {**loaded.info, "saved_to": str(model_dir),
                  "attn_implementation": "saobp" if refined else None},
        "data": {"train": train_data.stats, "eval": eval_data.stats, "label_names": names,
                 "max_length": max_length},
        "options": to_dict(cfg),
        "thresholds": to_dict(cfg.thresholds),
        "final": _final(history, cfg.task),
        "epochs": sorted(set(float(e) for e in history["epoch"])),
        "steps": int(hf_trainer.state.global_step),
        "step_time_s": timer.summary(),
        "resumed_from": resume_from.name if resume_from is not None else None,
        "checkpoints": str(out / CHECKPOINTS) if cfg.checkpoints else None,
        "backend": loaded.backend,
        "diagnostics_from": "evaluation" if eval_probe is not None else "scan",  # the eval pass, or a second one
        "device": str(args.device),
        "cpu_allocator": memory.label(kept_freed_memory),
        "processes": state.num_processes,
        "dtype": cfg.dtype,
        "versions": scanner.versions(),
        "seed": cfg.seed,
    }
    if staged is not None:
        meta["patterns"] = staged.entry()
    if is_main:
        outputs.atomic_write_parquet(history, out / outputs.HISTORY)
        if staged is not None:
            outputs.atomic_write_parquet(staged.frame(), out / outputs.PATTERNS)
        outputs.atomic_write_parquet(diagnostics, out / outputs.DIAGNOSTICS)
        if predictions is not None:
            outputs.atomic_write_text(out / PREDICTIONS, "".join(json.dumps(p, ensure_ascii=False) + "\n"
                                                                  for p in predictions))
        meta["wall_time_s"] = round(time.time() - started, 3)
        meta["complete"] = True
        outputs.atomic_write_json(out / outputs.RUN_JSON, meta)
    barrier()
    return RefineResult(out_dir=out, history=history, diagnostics=diagnostics, meta=meta,
                        eval_logits=metrics_fn.last_logits, eval_data=eval_data, model=hf_trainer.model,
                        tokenizer=tokenizer, is_main=is_main, predictions=predictions)
