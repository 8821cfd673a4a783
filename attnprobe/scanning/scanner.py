"""scan(config) -> ScanResult: read a corpus, stream it through the model, reduce attention per head.

The work is split so refine can reuse it: batching.py tokenizes, sorts by length and pads, passes.py's
``run_batches`` feeds batches through the model under a probe, tables.py's ``head_frame``/``layer_frame`` turn
the probe's sums into the Parquet tables. Writing files is ``write_scan`` (through runtime/outputs.py); this
module prints nothing (cli.py does).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnprobe.capture.patterns import RULE, ExamplePicker
from attnprobe.config import ScanConfig, to_dict
from attnprobe.data import sources
from attnprobe.data.batching import effective_max_length, max_length_notice
from attnprobe.formulas import compiled
from attnprobe.models import loading
from attnprobe.runtime import memory, outputs, parallel
from attnprobe.scanning import patterns
from attnprobe.scanning.passes import metric_dtype_of, run_batches, unpadded_notice
from attnprobe.scanning.tables import example_frame, head_frame, layer_frame
from attnprobe.version import __version__

# Rows read from a source at a time (per-example rows are flushed, in input order, after each chunk).
CHUNK_ROWS = 2048


@dataclass
class ScanResult:
    """What a scan produced: per-head and per-layer tables, optional per-example table, run metadata."""

    heads: Any  # pandas.DataFrame
    layers: Any  # pandas.DataFrame
    meta: dict[str, Any]
    examples: Any = None  # pandas.DataFrame when kept in memory
    patterns: Any = None  # pandas.DataFrame (patterns.parquet) with --patterns N > 0
    out_dir: Path | None = None


def versions() -> dict[str, str]:
    import transformers

    return {"attnprobe": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


@dataclass
class _ExampleSink:
    """Collects per-example rows of a chunk, restores input order, writes them as row groups."""

    writer: Any = None  # outputs.ParquetRowWriter, or None to keep in memory
    frames: list = field(default_factory=list)
    pending: list = field(default_factory=list)
    world: Any = None  # parallel.World: rows of every process are gathered on the main one

    def add(self, rows, tokens, per):
        self.pending.append(example_frame(rows, tokens, per))

    def flush(self):
        import pandas as pd

        pending, self.pending = self.pending, []
        if self.world is not None and self.world.distributed:
            gathered = parallel.gather_objects(pending, self.world)
            if not self.world.is_main:
                return
            pending = [df for part in gathered for df in part]
        if not pending:
            return
        df = pd.concat(pending).sort_values(["example", "layer", "head"], kind="stable")
        if self.writer is not None:
            self.writer.write(df)
        else:
            self.frames.append(df)


class _Chunks:
    """Iterate a source's chunks, flushing per-example rows after each (input order per chunk)."""

    def __init__(self, source, limit, sink):
        self.source, self.limit, self.sink = source, limit, sink

    def __iter__(self):
        for chunk in self.source.chunks(CHUNK_ROWS, limit=self.limit):
            yield chunk
            if self.sink is not None:
                self.sink.flush()


def scan(config: ScanConfig | None = None, *, loaded=None, out_dir: str | Path | None = None,
         on_progress: Callable[[int], None] | None = None,
         should_stop: Callable[[], int | None] | None = None, source=None,
         on_notice: Callable[[str], None] | None = None, world=None,
         keep_freed_memory: bool = False) -> ScanResult:
    """Scan a corpus and return per-head and per-layer diagnostics (and write them if ``out_dir``).

    Under torchrun / accelerate (``world``: parallel.World with several processes) every process scans
    its share of the rows, the sums are combined exactly, and only the main process writes files.

    Args:
        config: options (``ScanConfig()`` scans the bundled model on the sample corpus).
        loaded: an already loaded model (``loading.load_model``), else ``config.model`` is loaded.
        out_dir: folder to write heads/layers/examples Parquet and run.json into (prepared by the caller
            with outputs.prepare_out_dir); None keeps everything in memory.
        on_progress: called with the number of rows done after each batch.
        should_stop: returns a signal number to stop at the next batch, or None.
        source: a sources.TextSource, else one is opened from ``config``.
        on_notice: called with one-line notices (e.g. batches split after running out of memory).
        world: the process group (parallel.current_world()); None for a single process.
        keep_freed_memory: on the CPU, apply ``memory.keep_freed_memory()`` for the rest of the process
            (the ``attnprobe scan`` command does; a library call leaves the caller's allocator alone).
    """
    world = world or parallel.World()
    config = (config or ScanConfig()).validate()
    torch.manual_seed(config.seed)
    started = time.time()
    if source is None:
        source = sources.open_source(config.data, config.text, text_column=config.text_column,
                                  text_pair_column=config.text_pair_column, encoding=config.encoding)
    if loaded is None:
        loaded = loading.load_model(config.model, num_layers=config.num_layers,
                                   device=parallel.device_for(world, config.device),
                                   dtype=config.dtype, allow_pickle=config.allow_pickle,
                                   trust_remote_code=config.trust_remote_code, tokenizer=config.tokenizer)
    # The forward's (B, H, L, L) buffers are reused instead of taken again as fresh pages (memory.py).
    kept_freed_memory = keep_freed_memory and loaded.device.type == "cpu" and memory.keep_freed_memory()
    max_length = effective_max_length(loaded, config.max_length)
    lowered = max_length_notice(loaded, config.max_length)
    if lowered and on_notice is not None and world.is_main:
        on_notice(lowered)
    if getattr(loaded, "padding", "right") == "none" and on_notice is not None and world.is_main:
        on_notice(unpadded_notice(loaded))
    writer = None
    if not world.is_main:
        out_dir = None
    if config.per_example and out_dir is not None:
        writer = outputs.ParquetRowWriter(Path(out_dir) / outputs.EXAMPLES)
    sink = _ExampleSink(writer, world=world) if config.per_example else None
    picker = ExamplePicker(config.patterns) if config.patterns else None
    if config.compile == "on" and on_notice is not None and world.is_main:
        on_notice("compiling the metrics (--compile on); the first compile on a machine takes a minute or so")
    path = compiled.prepare(config.compile, loaded.device, metric_dtype_of(loaded), loaded.num_heads or 1, max_length)
    if config.compile == "on" and path.name != "compiled" and on_notice is not None and world.is_main:
        on_notice(f"--compile on: running the plain metrics, because {path.info['reason']}")
    try:
        probe, counts = run_batches(
            loaded, _Chunks(source, config.limit, sink), batch_size=config.batch_size,
            max_length=max_length, hops=config.hops, per_example=config.per_example,
            on_examples=sink.add if sink else None, on_progress=on_progress, should_stop=should_stop,
            on_notice=on_notice, world=world, on_encoded=picker.add if picker else None, block_fn=path.block_fn,
            sample_queries=config.sample_queries, seed=config.seed)
        if sink is not None:
            sink.flush()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    heads = head_frame(probe.totals(), config.thresholds)
    layers = layer_frame(heads)
    kept = _keep_patterns(loaded, picker, world) if picker is not None else None
    examples = None
    if sink is not None and writer is None:
        import pandas as pd

        examples = pd.concat(sink.frames, ignore_index=True) if sink.frames else None
    stats = source.stats()
    stats.update({"sequences_scanned": counts["sequences"], "tokens": counts["tokens"],
                  "truncated": counts["truncated"], "skipped_too_short": counts["too_short"],
                  "max_length": max_length,
                  # a decoder's rows that see fewer than 2 keys (its first token), per head
                  "rows_not_scored": int(probe.totals()["unscored"].max())})
    notices = [lowered] if lowered else []
    if getattr(loaded, "padding", "right") == "none":
        notices.append(unpadded_notice(loaded))
    if counts["oom_splits"]:
        notices.append(f"{counts['oom_splits']} batches were split in half after running out of memory")
    bad = heads[heads["nonfinite"] > 0]
    meta = {
        "kind": "scan",
        "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "attnprobe_version": __version__,
        "model": loaded.info,
        "data": stats,
        "options": to_dict(config),
        "thresholds": to_dict(config.thresholds),
        "backend": loaded.backend,
        "padding": getattr(loaded, "padding", "right"),
        "device": str(loaded.device),
        "dtype": config.dtype,
        "metric_dtype": str(probe.metric_dtype).replace("torch.", ""),
        "metrics_path": path.name,
        "compile": path.info,
        "cpu_allocator": memory.label(kept_freed_memory),
        "forward_passes": {"total": counts["passes"], "ended_at_last_attention": counts["passes_cut"]},
        "multi_hop": {"sample_queries": config.sample_queries,
                      "estimated": "gtd, indirect_entropy and indirect_entropy_norm from sampled query rows, "
                                   "with standard errors (*_se)" if config.sample_queries else None},
        "versions": versions(),
        "seed": config.seed,
        "nonfinite": {"rows": int(heads["nonfinite"].sum()),
                      "heads": [[int(r.layer), int(r.head)] for r in bad.itertuples()]},
        "refined_layers": sorted(probe.refined_layers),
        "processes": world.size,
        "notices": notices,
    }
    if kept is not None:
        meta["patterns"] = kept[1]
    result = ScanResult(heads=heads, layers=layers, meta=meta, examples=examples,
                        patterns=kept[0] if kept is not None else None)
    if out_dir is not None:
        if writer is not None:
            writer.close()
        meta["wall_time_s"] = round(time.time() - started, 3)
        write_scan(result, out_dir)
    else:
        meta["wall_time_s"] = round(time.time() - started, 3)
        meta["complete"] = True
    return result


def _keep_patterns(loaded, picker, world):
    """``(patterns.parquet frame, run.json entry)`` of the picked rows, on the main process (else None)."""
    if world.distributed:
        pickers = parallel.gather_objects(picker, world)
        if not world.is_main:
            return None
        for other in pickers[1:]:
            pickers[0].merge(other)
        picker = pickers[0]
    started = time.time()
    kept = patterns.keep_patterns(loaded, picker)
    frame = patterns.pattern_frame(kept)
    return frame, {"requested": picker.n, "examples": [p.row for p in kept],
                   "tokens": [len(p.tokens) for p in kept], "rule": RULE,
                   "seconds": round(time.time() - started, 3)}


def write_scan(result: ScanResult, out_dir: str | Path) -> Path:
    """Write heads/layers Parquet, then run.json (complete) last."""
    out_dir = Path(out_dir)
    outputs.atomic_write_parquet(result.heads, out_dir / outputs.HEADS)
    outputs.atomic_write_parquet(result.layers, out_dir / outputs.LAYERS)
    if result.examples is not None:
        outputs.atomic_write_parquet(result.examples, out_dir / outputs.EXAMPLES)
    if result.patterns is not None:
        outputs.atomic_write_parquet(result.patterns, out_dir / outputs.PATTERNS)
    result.meta["complete"] = True
    outputs.atomic_write_json(out_dir / outputs.RUN_JSON, result.meta)
    result.out_dir = out_dir
    return out_dir
