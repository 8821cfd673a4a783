"""scan(config) -> ScanResult: read a corpus, stream it through the model, reduce attention per head.

The work is split so refine can reuse it: batching.py tokenizes, sorts by length and pads,
``run_batches`` feeds batches through the model under a probe, ``head_frame``/``layer_frame`` turn
the probe's sums into the Parquet tables. Writing files is ``write_scan`` (through outputs.py); this
module prints nothing (cli.py does).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import attnprobe
from attnprobe import AttnprobeError, cpumem, encoders, fused, outputs
from attnprobe.batching import Encoded, effective_max_length, encode_chunk, make_batches
from attnprobe.config import ScanConfig, to_dict
from attnprobe.probe import AttentionComplete, Probe, capturing
from attnprobe.tables import (  # noqa: F401  (re-exported: refine and benchmarks use them from here)
    FLAG_COLUMNS, METRIC_COLUMNS, example_frame, head_frame, layer_frame)

CHUNK_ROWS = 2048


class Interrupted(AttnprobeError):
    """The run was stopped by a signal between two batches; nothing was written as complete."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}; no complete output was written")
        self.signum = signum


@dataclass
class ScanResult:
    """What a scan produced: per-head and per-layer tables, optional per-example table, run metadata."""

    heads: Any  # pandas.DataFrame
    layers: Any  # pandas.DataFrame
    meta: dict[str, Any]
    examples: Any = None  # pandas.DataFrame when kept in memory
    patterns: Any = None  # pandas.DataFrame (patterns.parquet) with --patterns N > 0
    out_dir: Path | None = None


def forward_batch(loaded, probe: Probe, batch: dict[str, torch.Tensor], special: torch.Tensor,
                  model=None, stop_early: bool = False) -> dict[str, torch.Tensor] | None:
    """One forward pass under the probe; returns per-example sums ``(B, L, H)`` if the probe keeps them.

    ``stop_early`` ends the pass once the last layer's attention is reduced (``probe.AttentionComplete``):
    nothing the probe reports depends on the rest (the last layer's output projection and feed-forward
    block, a pooler or task head). It applies to the attention-function backend, whose probabilities
    arrive during the pass; ``forward_resilient`` asks for it once the probe has accepted a pass, so
    ``Probe.end`` checks the number of attention calls of a complete pass before any pass is cut short.
    """
    model = model if model is not None else loaded.model
    keep = batch["attention_mask"].bool()
    probe.begin(keep, special)
    with torch.no_grad(), capturing(probe):
        if loaded.backend == "eager-outputs":
            out = model(**batch, output_attentions=True)
            # Every tensor is validated (shape, heads, probability rows) before the probe reads it.
            attentions = encoders.checked_probs(getattr(out, "attentions", None), keep, encoders.arch_name(model),
                                                loaded.num_layers, loaded.num_heads,
                                                getattr(loaded, "recover", None))
            del out
            for layer_probs in attentions:  # (B, H, Q, K) each, reduced one by one
                probe.observe(None, layer_probs)
            del attentions
        else:
            probe.stop_after_last = stop_early
            try:
                model(**batch)
            except AttentionComplete:
                probe.passes_cut += 1
            finally:
                probe.stop_after_last = False
    return probe.end()


def _split(batch: dict[str, torch.Tensor], special: torch.Tensor, rows: list[int]):
    half = len(rows) // 2
    for sl in (slice(0, half), slice(half, None)):
        part = {k: v[sl] for k, v in batch.items()}
        n = int(part["attention_mask"].sum(-1).max())  # trim padding the half no longer needs
        yield {k: v[:, :n] for k, v in part.items()}, special[sl, :n], rows[sl]


def forward_resilient(loaded, probe: Probe, batch, special, rows, model=None,
                      on_notice: Callable[[str], None] | None = None, state: dict | None = None):
    """``forward_batch``, halving the batch (recursively) when it runs out of memory.

    Yields ``(batch, rows, per_example_sums)`` for each piece that ran. Says so once via ``on_notice``.
    Every pass after the probe's first accepted one ends at the last attention (``forward_batch``).
    """
    try:
        per = forward_batch(loaded, probe, batch, special, model=model, stop_early=probe.passes > 0)
    except torch.OutOfMemoryError:
        probe.abort()
        if len(rows) == 1:
            raise AttnprobeError(
                f"one sequence of {batch['input_ids'].shape[1]} tokens does not fit in device memory; "
                "lower --max-length or use --dtype bfloat16"
            ) from None
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()
        if state is not None and not state.get("oom_noted"):
            state["oom_noted"] = True
            if on_notice is not None:
                on_notice(f"a batch of {len(rows)} ran out of memory; splitting batches in half where needed")
        if state is not None:
            state["oom_splits"] = state.get("oom_splits", 0) + 1
        for piece in _split(batch, special, rows):
            yield from forward_resilient(loaded, probe, *piece, model=model, on_notice=on_notice, state=state)
        return
    yield batch, rows, per


def unpadded_notice(loaded) -> str:
    return (f"{encoders.arch_name(loaded.model)}'s attention changes when a sentence is padded, so it is scanned "
            "without padding (batches of sequences of one length), which is slower")


def metric_dtype_of(loaded) -> torch.dtype:
    """float64 metrics for a float64 model, else float32 (lower-precision attention is upcast)."""
    return torch.float64 if next(loaded.model.parameters()).dtype == torch.float64 else torch.float32


def run_batches(loaded, chunks: Iterable, *, batch_size: int, max_length: int, hops: int,
                per_example: bool = False, on_examples: Callable | None = None,
                on_progress: Callable[[int], None] | None = None,
                should_stop: Callable[[], int | None] | None = None,
                on_notice: Callable[[str], None] | None = None,
                model=None, metric_dtype: torch.dtype | None = None,
                world=None, on_encoded: Callable[[Encoded], None] | None = None,
                block_fn: Callable | None = None) -> tuple[Probe, dict[str, int]]:
    """Stream chunks (objects with texts/pairs/rows) through the model; return the probe and counters.

    With a distributed ``world`` (parallel.World) each process takes every ``world.size``-th row of
    each chunk, and the sums and counters are all-reduced at the end, so every process returns the totals.
    ``on_encoded`` sees each tokenized chunk (``scan --patterns`` picks its rows from them).
    ``block_fn`` replaces the probe's per-block metrics (``fused.prepare``'s compiled path).
    """
    from attnprobe import parallel

    world = world or parallel.World()
    tokenizer = loaded.tokenizer
    if metric_dtype is None:
        metric_dtype = metric_dtype_of(loaded)
    probe = Probe(loaded.num_layers, hops=hops, per_example=per_example, metric_dtype=metric_dtype,
                  num_heads=loaded.num_heads or None)
    if block_fn is not None:
        probe.block_fn = block_fn
    probe.reuse_buffers = True  # nothing here keeps a layer's probabilities past its layer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special_ids = sorted(set(getattr(tokenizer, "all_special_ids", []) or []))
    counts = {"sequences": 0, "tokens": 0, "truncated": 0, "too_short": 0, "oom_splits": 0}
    state: dict = {}
    for chunk in chunks:
        texts, pairs, rows = chunk.texts, chunk.pairs, chunk.rows
        if world.distributed:
            sl = slice(world.rank, None, world.size)
            texts, rows = texts[sl], rows[sl]
            pairs = pairs[sl] if pairs is not None else None
        enc = encode_chunk(tokenizer, texts, pairs, rows, max_length)
        counts["truncated"] += enc.truncated
        counts["too_short"] += enc.short
        if on_encoded is not None:
            on_encoded(enc)
        for batch, special, batch_rows in make_batches(enc, batch_size, pad_id, special_ids, loaded.device,
                                                       equal_length=getattr(loaded, "padding", "right") == "none"):
            if should_stop is not None and (signum := should_stop()):
                raise Interrupted(signum)
            for piece, piece_rows, per in forward_resilient(loaded, probe, batch, special, batch_rows, model=model,
                                                            on_notice=on_notice, state=state):
                counts["sequences"] += len(piece_rows)
                counts["tokens"] += int(piece["attention_mask"].sum())
                if per is not None and on_examples is not None:
                    on_examples(piece_rows, piece["attention_mask"].sum(-1).tolist(), per)
            if on_progress is not None:
                on_progress(len(batch_rows) * world.size)
        if on_progress is not None and enc.short:
            on_progress(enc.short)
    counts["oom_splits"] = state.get("oom_splits", 0)
    counts["passes"], counts["passes_cut"] = probe.passes, probe.passes_cut
    if world.distributed:
        probe.load_totals(parallel.all_reduce_sums(probe.totals(), world))
        counts = parallel.all_reduce_counts(counts, world)
    if counts["sequences"] == 0:
        raise AttnprobeError("no sequence with at least 2 tokens to scan; check the input texts")
    return probe, counts


def versions() -> dict[str, str]:
    import transformers

    return {"attnprobe": attnprobe.__version__, "torch": torch.__version__,
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

        from attnprobe import parallel

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
        loaded: an already loaded model (``models.load_model``), else ``config.model`` is loaded.
        out_dir: folder to write heads/layers/examples Parquet and run.json into (prepared by the caller
            with outputs.prepare_out_dir); None keeps everything in memory.
        on_progress: called with the number of rows done after each batch.
        should_stop: returns a signal number to stop at the next batch, or None.
        source: a data.TextSource, else one is opened from ``config``.
        on_notice: called with one-line notices (e.g. batches split after running out of memory).
        world: the process group (parallel.current_world()); None for a single process.
        keep_freed_memory: on the CPU, apply ``cpumem.keep_freed_memory()`` for the rest of the process
            (the ``attnprobe scan`` command does; a library call leaves the caller's allocator alone).
    """
    from attnprobe import data, models, parallel

    world = world or parallel.World()
    config = (config or ScanConfig()).validate()
    torch.manual_seed(config.seed)
    started = time.time()
    if source is None:
        source = data.open_source(config.data, config.text, text_column=config.text_column,
                                  text_pair_column=config.text_pair_column, encoding=config.encoding)
    if loaded is None:
        loaded = models.load_model(config.model, num_layers=config.num_layers,
                                   device=parallel.device_for(world, config.device),
                                   dtype=config.dtype, allow_pickle=config.allow_pickle,
                                   trust_remote_code=config.trust_remote_code, tokenizer=config.tokenizer)
    # The forward's (B, H, L, L) buffers are reused instead of taken again as fresh pages (cpumem.py).
    kept_freed_memory = keep_freed_memory and loaded.device.type == "cpu" and cpumem.keep_freed_memory()
    max_length = effective_max_length(loaded, config.max_length)
    if getattr(loaded, "padding", "right") == "none" and on_notice is not None and world.is_main:
        on_notice(unpadded_notice(loaded))
    writer = None
    if not world.is_main:
        out_dir = None
    if config.per_example and out_dir is not None:
        writer = outputs.ParquetRowWriter(Path(out_dir) / outputs.EXAMPLES)
    sink = _ExampleSink(writer, world=world) if config.per_example else None
    from attnprobe import patterns as patterns_mod

    picker = patterns_mod.ExamplePicker(config.patterns) if config.patterns else None
    if config.compile == "on" and on_notice is not None and world.is_main:
        on_notice("compiling the metrics (--compile on); the first compile on a machine takes a minute or so")
    path = fused.prepare(config.compile, loaded.device, metric_dtype_of(loaded), loaded.num_heads or 1, max_length)
    if config.compile == "on" and path.name != "compiled" and on_notice is not None and world.is_main:
        on_notice(f"--compile on: running the plain metrics, because {path.info['reason']}")
    try:
        probe, counts = run_batches(
            loaded, _Chunks(source, config.limit, sink), batch_size=config.batch_size,
            max_length=max_length, hops=config.hops, per_example=config.per_example,
            on_examples=sink.add if sink else None, on_progress=on_progress, should_stop=should_stop,
            on_notice=on_notice, world=world, on_encoded=picker.add if picker else None, block_fn=path.block_fn)
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
                  "max_length": max_length})
    notices = []
    if getattr(loaded, "padding", "right") == "none":
        notices.append(unpadded_notice(loaded))
    if counts["oom_splits"]:
        notices.append(f"{counts['oom_splits']} batches were split in half after running out of memory")
    bad = heads[heads["nonfinite"] > 0]
    meta = {
        "kind": "scan",
        "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "attnprobe_version": attnprobe.__version__,
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
        "cpu_allocator": cpumem.label(kept_freed_memory),
        "forward_passes": {"total": counts["passes"], "ended_at_last_attention": counts["passes_cut"]},
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
    from attnprobe import parallel
    from attnprobe import patterns as patterns_mod

    if world.distributed:
        pickers = parallel.gather_objects(picker, world)
        if not world.is_main:
            return None
        for other in pickers[1:]:
            pickers[0].merge(other)
        picker = pickers[0]
    started = time.time()
    kept = patterns_mod.keep_patterns(loaded, picker)
    frame = patterns_mod.pattern_frame(kept)
    return frame, {"requested": picker.n, "examples": [p.row for p in kept],
                   "tokens": [len(p.tokens) for p in kept], "rule": patterns_mod.RULE,
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
