"""Attention diagnostics in your own Hugging Face training: ``from attnprobe.hf import AttentionDiagnosticsCallback``.

The public face of the training wing's ``transformers.TrainerCallback`` (training/callback.py, where it is
documented): add it to a ``Trainer`` to log attnprobe's per-layer scalars through the Trainer's logging and to
write ``attnprobe-diagnostics.parquet`` in its ``output_dir``. Importing this module imports transformers.
"""

from __future__ import annotations

from attnprobe.training.callback import DIAGNOSTICS_FILE, AttentionDiagnosticsCallback, scalars

__all__ = ["DIAGNOSTICS_FILE", "AttentionDiagnosticsCallback", "scalars"]
