"""The notebook-facing entry points: ``attnprobe.scan(model, texts=...)`` over the config-based library.

This module only turns keyword arguments into a ScanConfig (or an already loaded model) and calls
``attnprobe.scanner.scan``; it computes nothing itself.
"""

from __future__ import annotations

from typing import Any

from attnprobe.config import ScanConfig


def scan(model: Any = None, texts: Any = None, data: str | None = None, tokenizer: Any = None,
         **options: Any):
    """Scan ``texts`` (or the file ``data``, or the sample corpus) with ``model``; return a ScanResult.

    Args:
        model: a ScanConfig (then nothing else may be given), a folder saved with ``save_pretrained``, a
            model alias (``"minilm-l6"``), a cached hub id, or None for the bundled default.
        texts: a string or a list of strings to scan instead of a file.
        data: a data file (.txt, .csv, .tsv, .jsonl, .parquet), read like ``attnprobe scan --data``.
        tokenizer: a tokenizer path or alias to use instead of the model's own.
        **options: any ScanConfig field (``batch_size``, ``max_length``, ``hops``, ``thresholds``, ...).

    >>> import attnprobe
    >>> callable(attnprobe.scan)
    True
    """
    from attnprobe import scanner

    if isinstance(model, ScanConfig):
        if texts is not None or data is not None or tokenizer is not None or options:
            raise TypeError("pass either a ScanConfig or keyword options, not both")
        return scanner.scan(model)
    if isinstance(texts, str):
        texts = [texts]
    fields: dict[str, Any] = dict(options)
    if model is not None:
        fields["model"] = str(model)
    if texts is not None:
        fields["text"] = tuple(texts)
    if data is not None:
        fields["data"] = str(data)
    if tokenizer is not None:
        fields["tokenizer"] = str(tokenizer)
    return scanner.scan(ScanConfig(**fields))
