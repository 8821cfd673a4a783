"""The notebook-facing entry points: ``attnprobe.scan(model, texts=...)`` over the config-based library.

This module only turns keyword arguments into a ScanConfig (or an already loaded model) and calls
``attnprobe.scanning.scanner.scan``; it computes nothing itself.
"""

from __future__ import annotations

from typing import Any

from attnprobe.config import ScanConfig


def scan(model: Any = None, texts: Any = None, data: str | None = None, tokenizer: Any = None,
         **options: Any):
    """Scan ``texts`` (or the file ``data``, or the sample corpus) with ``model``; return a ScanResult.

    Args:
        model: a ScanConfig (then nothing else may be given), a folder saved with ``save_pretrained``, a
            model alias (``"minilm-l6"``), a cached hub id, None for the bundled default, or a transformers
            model already in memory (then ``tokenizer`` is required; it is scanned as it is, with
            attnprobe's attention function switched in for the scan and the previous one restored after).
        texts: a string or a list of strings to scan instead of a file.
        data: a data file (.txt, .csv, .tsv, .jsonl, .parquet), read like ``attnprobe scan --data``.
        tokenizer: a tokenizer path or alias to use instead of the model's own; for an in-memory model a
            tokenizer object, folder or alias.
        **options: any ScanConfig field (``batch_size``, ``max_length``, ``hops``, ``thresholds``, ...);
            ``out`` writes the tables and run.json into that folder as ``attnprobe scan --out`` does
            (``overwrite=True`` to replace an earlier run there); without it nothing is written.

    >>> import attnprobe
    >>> callable(attnprobe.scan)
    True
    """
    from attnprobe.scanning import scanner

    if isinstance(model, ScanConfig):
        if texts is not None or data is not None or tokenizer is not None or options:
            raise TypeError("pass either a ScanConfig or keyword options, not both")
        return _written(model, lambda out_dir: scanner.scan(model, out_dir=out_dir))
    if isinstance(texts, str):
        texts = [texts]
    fields: dict[str, Any] = dict(options)
    if texts is not None:
        fields["text"] = tuple(texts)
    if data is not None:
        fields["data"] = str(data)
    if _in_memory(model):
        return _scan_module(model, tokenizer, fields)
    if model is not None:
        fields["model"] = str(model)
    if tokenizer is not None:
        fields["tokenizer"] = str(tokenizer)
    config = ScanConfig(**fields)
    return _written(config, lambda out_dir: scanner.scan(config, out_dir=out_dir))


def _written(config: ScanConfig, run):
    """``run(out_dir)``: into ``config.out`` (prepared and locked as ``attnprobe scan --out`` does, removed
    again if the scan fails) where one is given, else in memory (``out_dir`` None)."""
    if not config.out:
        return run(None)
    from attnprobe.runtime import outputs

    with outputs.output_folder(config.out, "scan", config.overwrite) as out_dir:
        return run(out_dir)


# ScanConfig fields about loading a model from disk: they have no meaning for a model already in memory
_LOADING = ("num_layers", "device", "dtype", "allow_pickle", "trust_remote_code", "tokenizer")


def _in_memory(model: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")  # an nn.Module exists only once torch is imported
    return torch is not None and isinstance(model, torch.nn.Module)


def _scan_module(model: Any, tokenizer: Any, fields: dict[str, Any]):
    from attnprobe.errors import AttnprobeError
    from attnprobe.models import inmemory
    from attnprobe.scanning import scanner

    given = sorted(k for k in _LOADING if k in fields)
    if given:
        raise AttnprobeError(f"{', '.join(given)}: options for loading a model from disk; an in-memory model "
                             "is scanned as it is (move or cast it first)")
    name = f"in-memory {type(model).__name__}"
    config = ScanConfig(model=name, **fields)
    with inmemory.probing(model, tokenizer, name=name) as loaded:
        return _written(config, lambda out_dir: scanner.scan(config, loaded=loaded, out_dir=out_dir))
