"""A refine run's attention patterns: the same few eval examples before training and with the trained model.

refine.py makes one ``StagePatterns`` on the main process and calls it twice: ``before`` with the model as
loaded (no training step taken yet) once the run folder is prepared, and ``after`` with the final model, the
one saved to ``model/``. The examples are chosen by scan's rule (patterns.ExamplePicker) over the eval set as
the diagnostics read it: each row tokenized alone and truncated at ``--max-length``; ``example`` is its
0-based row in the eval set as used. For ``--task masked-lm`` these are the unmasked eval documents, as for
the diagnostics, not the training blocks (which span documents and carry [MASK] tokens).

The before patterns are written beside the checkpoints when training starts
(``checkpoints/patterns-before.parquet``), so a ``--resume`` keeps them; a resumed run that does not find
them there (or finds other examples) keeps only the after patterns and says so in run.json. This module
writes nothing else: patterns.parquet and run.json are refine.py's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from attnprobe.capture.patterns import RULE, ExamplePicker
from attnprobe.scanning import patterns

BEFORE_FILE = "patterns-before.parquet"


def pick(tokenizer, eval_data, max_length: int, n: int) -> ExamplePicker:
    """The ExamplePicker of the eval set: its rows tokenized in the scan's chunks, in input order."""
    from attnprobe.data.batching import encode_chunk
    from attnprobe.scanning.scanner import CHUNK_ROWS

    picker = ExamplePicker(n)
    texts, pairs = eval_data.texts, eval_data.pairs
    for start in range(0, len(texts), CHUNK_ROWS):
        rows = list(range(start, min(start + CHUNK_ROWS, len(texts))))
        picker.add(encode_chunk(tokenizer, texts[start:start + CHUNK_ROWS],
                                None if pairs is None else pairs[start:start + CHUNK_ROWS], rows, max_length))
    return picker


def kept_in_eval_mode(loaded, picker: ExamplePicker, model, stage: str) -> list:
    """``keep_patterns`` of ``model`` with dropout off (its training mode restored after), tagged ``stage``."""
    was_training = model.training
    model.eval()
    try:
        kept = patterns.keep_patterns(loaded, picker, model=model)
    finally:
        model.train(was_training)
    for pattern in kept:
        pattern.stage = stage
    return kept


class StagePatterns:
    """The before and after patterns of one refine run (main process only).

    Args:
        n: ``--patterns N``, at least 1.
        loaded: the run's models.LoadedModel (its tokenizer and attention backend).
        eval_data: the eval set as used (data.LabeledData).
        max_length: the effective ``--max-length``.
        checkpoints: the run's checkpoints folder, where the before patterns are kept for ``--resume``.
    """

    def __init__(self, n: int, loaded, eval_data, max_length: int, checkpoints: Path):
        started = time.time()
        self.loaded = loaded
        self.checkpoints = Path(checkpoints)
        self.picker = pick(loaded.tokenizer, eval_data, max_length, n)
        self.rows = [row for row, _, _ in self.picker.chosen()]
        self.kept: list = []
        self.notes: list[str] = []
        self.seconds = time.time() - started

    def before(self, model, resumed: bool) -> None:
        """Keep the examples with ``model`` as loaded and save them (a fresh run), or read them back (``resumed``)."""
        started = time.time()
        if resumed:
            self.kept = self._saved_before()
        else:
            from attnprobe.runtime import outputs

            self.kept = kept_in_eval_mode(self.loaded, self.picker, model, "before")
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            outputs.atomic_write_parquet(patterns.pattern_frame(self.kept), self.checkpoints / BEFORE_FILE)
        self.seconds += time.time() - started

    def after(self, model) -> None:
        """Keep the examples with the trained ``model``."""
        started = time.time()
        self.kept += kept_in_eval_mode(self.loaded, self.picker, model, "after")
        self.seconds += time.time() - started

    def frame(self):
        """The ``patterns.parquet`` frame: the scan's columns plus ``stage``."""
        if not self.kept:
            return patterns.empty_frame(staged=True)
        return patterns.pattern_frame(self.kept)

    def entry(self) -> dict[str, Any]:
        """run.json's ``patterns``: as a scan's, plus the stages kept and notes on any that are missing."""
        after = [p for p in self.kept if p.stage == "after"]
        return {"requested": self.picker.n, "examples": self.rows, "tokens": [len(p.tokens) for p in after],
                "rule": RULE, "stages": [s for s in patterns.STAGES
                                                     if any(p.stage == s for p in self.kept)],
                "notes": list(self.notes), "seconds": round(self.seconds, 3)}

    def _saved_before(self) -> list:
        """The before patterns written when the run started, or [] (with a note) when they are not there."""
        import pandas as pd

        path = self.checkpoints / BEFORE_FILE
        if not path.is_file():
            self.notes.append(f"the patterns before training are missing: the resumed run found no {path.name} in "
                              f"{self.checkpoints.name}/, so only the patterns after training are kept")
            return []
        try:
            kept = patterns.from_frame(pd.read_parquet(path))
        except (OSError, ValueError) as exc:
            self.notes.append(f"the patterns before training are missing: {path.name} is not readable ({exc})")
            return []
        rows = [p.row for p in kept]
        if rows != self.rows:
            self.notes.append(f"the patterns before training are left out: {path.name} holds examples {rows}, "
                              f"not the examples {self.rows} chosen now (other --patterns or eval data)")
            return []
        return [p for p in kept if p.stage == "before"]
