"""Attention diagnostics inside a user's own Hugging Face training: a ``transformers.TrainerCallback``.

``AttentionDiagnosticsCallback`` scans a fixed set of texts with the model being trained, every N steps
and/or at every evaluation, with the same streaming probe as ``attnprobe scan`` (scanner.run_batches) on
the model as it is at that moment (eval mode, no gradients, attention implementation and training mode
restored after; inmemory.probing). It logs per-layer scalars through ``Trainer.log``, so every tracker
chosen with ``report_to`` receives them, and appends the per-head rows (heads.parquet's columns plus
``step`` and ``epoch``) to ``attnprobe-diagnostics.parquet`` in the Trainer's ``output_dir``. Under
torchrun / Accelerate every process probes its share of the texts, the sums are all-reduced, and only the
main process writes the file. It does not train, evaluate or save checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from attnprobe.errors import AttnprobeError
from attnprobe.runtime import outputs

DIAGNOSTICS_FILE = "attnprobe-diagnostics.parquet"
PREFIX = "attnprobe"
LAYER_SCALARS = ("direct_entropy", "direct_entropy_norm", "indirect_entropy", "indirect_entropy_norm", "gtd",
                 "sink_mass", "bp_shift")
# ScanConfig fields that mean something for a callback; the others (model, out, device, ...) are the Trainer's
SCAN_OPTIONS = ("batch_size", "max_length", "hops", "thresholds", "limit", "text_column", "text_pair_column",
                "encoding", "sample_queries", "seed")


class AttentionDiagnosticsCallback(TrainerCallback):
    """Scan ``texts`` (or the file ``data``) with the model in training and log the attention diagnostics.

    Add it to a Trainer in one line (it logs through that Trainer, so it needs it)::

        trainer.add_callback(AttentionDiagnosticsCallback(texts=probe_texts, every_n_steps=50, trainer=trainer))

    Args:
        texts: the texts to probe (a string or a list of strings).
        data: a data file read like ``attnprobe scan --data`` (.txt, .csv, .tsv, .jsonl, .parquet).
        every_n_steps: probe after every N optimizer steps (None: only at evaluations).
        on_evaluate: probe at every evaluation (default True).
        trainer: the ``transformers.Trainer`` whose logging (``Trainer.log``) carries the scalars.
        **scan_options: ``batch_size``, ``max_length``, ``hops``, ``thresholds`` (a Thresholds or a dict),
            ``limit``, ``text_column``, ``text_pair_column``, ``encoding``, as in ``attnprobe.scan``.

    Logged, per probe: ``attnprobe/layer_{L}/{metric}`` for the metrics of ``LAYER_SCALARS`` (means over the
    layer's heads; ``bp_shift`` only for SAOBP layers) and ``attnprobe/layer_{L}/flagged_heads``, and
    ``attnprobe/collapsed_heads`` and ``attnprobe/flagged_heads`` over all layers. Trackers add their own
    prefix (TensorBoard and W&B show ``train/attnprobe/...``, the Trainer's rewrite of non-eval keys).

    Attributes:
        frames: the per-head table of every probe so far (on the main process), oldest first.
    """

    def __init__(self, texts=None, data: str | None = None, every_n_steps: int | None = None,
                 on_evaluate: bool = True, *, trainer=None, **scan_options: Any):
        from attnprobe.config import ScanConfig, Thresholds
        from attnprobe.data import sources
        from attnprobe.scanning import scanner

        unknown = sorted(set(scan_options) - set(SCAN_OPTIONS))
        if unknown:
            raise AttnprobeError(f"AttentionDiagnosticsCallback does not take {', '.join(unknown)}; its scan "
                                 f"options are {', '.join(SCAN_OPTIONS)} (the model is the Trainer's)")
        if isinstance(scan_options.get("thresholds"), dict):
            scan_options["thresholds"] = Thresholds(**scan_options["thresholds"])
        if isinstance(texts, str):
            texts = [texts]
        if texts is None and data is None:
            raise AttnprobeError("AttentionDiagnosticsCallback needs texts=[...] or data=FILE to probe")
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or int(every_n_steps) < 1):
            raise AttnprobeError(f"every_n_steps must be 1 or more (got {every_n_steps})")
        if every_n_steps is None and not on_evaluate:
            raise AttnprobeError("AttentionDiagnosticsCallback with every_n_steps=None and on_evaluate=False "
                                 "never probes; set one of them")
        self.config = ScanConfig(data=None if data is None else str(data), text=tuple(texts or ()),
                                 **scan_options).validate()
        source = sources.open_source(self.config.data, self.config.text, text_column=self.config.text_column,
                                      text_pair_column=self.config.text_pair_column, encoding=self.config.encoding)
        self.chunks = list(source.chunks(scanner.CHUNK_ROWS, limit=self.config.limit))
        if not self.chunks:
            raise AttnprobeError("AttentionDiagnosticsCallback: the texts to probe are empty")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.on_evaluate_probe = bool(on_evaluate)
        self.trainer = trainer
        self.frames: list = []
        self._last_step: int | None = None
        self._appended = False

    # ---- the Trainer's events ---------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise AttnprobeError(
                "AttentionDiagnosticsCallback logs through its Trainer: add it with "
                "trainer.add_callback(AttentionDiagnosticsCallback(..., trainer=trainer))")

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self.probe(args, state, kwargs.get("model"), kwargs.get("processing_class"))

    def on_evaluate(self, args, state, control, **kwargs):
        if self.on_evaluate_probe:
            self.probe(args, state, kwargs.get("model"), kwargs.get("processing_class"))

    # ---- one probe ---------------------------------------------------------------------------------

    def probe(self, args, state, model, processing_class):
        """Scan the texts with ``model`` now; log the scalars, append the rows. Every process calls it."""
        import torch

        from attnprobe.data import batching
        from attnprobe.models import inmemory
        from attnprobe.runtime import parallel
        from attnprobe.scanning import passes, tables

        step = int(state.global_step)
        if step == self._last_step:  # a step probe and an evaluation at the same step: one probe
            return None
        if self.trainer is None:
            self.on_train_begin(args, state, None)
        if model is None:
            raise AttnprobeError("AttentionDiagnosticsCallback got no model from the Trainer")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is None:
            raise AttnprobeError("AttentionDiagnosticsCallback takes the tokenizer from the Trainer: pass "
                                 "processing_class=tokenizer to the Trainer")
        self._last_step = step
        world = parallel.current_world("cuda" if next(model.parameters()).is_cuda else "cpu")
        with torch.no_grad(), inmemory.probing(model, tokenizer) as loaded:
            probe, _ = passes.run_batches(loaded, self.chunks, batch_size=self.config.batch_size,
                                           max_length=batching.effective_max_length(loaded, self.config.max_length),
                                           hops=self.config.hops, model=model, world=world,
                                           sample_queries=self.config.sample_queries, seed=self.config.seed)
        heads = tables.head_frame(probe.totals(), self.config.thresholds)
        heads.insert(0, "step", step)
        heads.insert(1, "epoch", float(state.epoch or 0.0))
        self.trainer.log(scalars(heads))
        if state.is_world_process_zero:
            self.frames.append(heads)
            self._write(Path(args.output_dir))
        return heads

    def _write(self, out: Path) -> None:
        import pandas as pd

        path = out / DIAGNOSTICS_FILE
        if not self._appended:  # rows of an earlier run in this folder stay, the new ones follow
            self._appended = True
            if path.is_file():
                self.frames.insert(0, pd.read_parquet(path))
        out.mkdir(parents=True, exist_ok=True)
        outputs.atomic_write_parquet(pd.concat(self.frames, ignore_index=True), path)


def scalars(heads) -> dict[str, float]:
    """The logged scalars of one probe's per-head table (names ``attnprobe/layer_{L}/{metric}``, ...)."""
    out: dict[str, float] = {}
    flagged = heads["collapsed"] | heads["high_gtd"] | heads["sink"] | heads["diffuse"] | heads["nonfinite_flag"]
    for layer, group in heads.groupby("layer", sort=True):
        for name in LAYER_SCALARS:
            value = float(group[name].mean())
            if not math.isnan(value):
                out[f"{PREFIX}/layer_{int(layer)}/{name}"] = value
        out[f"{PREFIX}/layer_{int(layer)}/flagged_heads"] = int(flagged[group.index].sum())
    out[f"{PREFIX}/collapsed_heads"] = int(heads["collapsed"].sum())
    out[f"{PREFIX}/flagged_heads"] = int(flagged.sum())
    return out
