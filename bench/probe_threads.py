"""One layer's probe with one and with two threads, by block size, next to its ``A @ A`` alone.

Captures the attention probabilities and logits of one layer (``--layer``) of the bundled MiniLM-L6 for one
batch of ``--batch-size`` sequences of exactly ``--length`` tokens (bench_scan.py's inputs), then times
``Probe.observe`` on them (everything the probe does with a layer) for each thread count and block size
(``probe.CHUNK_ELEMENTS``), and ``torch.matmul(A, A)`` for each thread count, all interleaved, median of
``--repeats``. With ``--profile``, a torch.profiler table of three ``observe`` calls per thread count (the
operators' own time, which leaves out the gaps between operators). This script measures; it changes nothing
in the package.

    python bench/probe_threads.py --length 128 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import fixed_batches, package_state, special_of  # noqa: E402

from attnprobe.models import loading  # noqa: E402
from attnprobe.capture import probe as probe_mod  # noqa: E402
from attnprobe.formulas import blocks  # noqa: E402
from attnprobe.scanning.passes import forward_batch  # noqa: E402
from attnprobe.scanning.scanner import versions  # noqa: E402

LIMITS = (1 << 18, 1 << 20, 1 << 22, 1 << 24)


class Keeper(probe_mod.Probe):
    """A Probe that also keeps a copy of one layer's probabilities and logits."""

    def __init__(self, layer: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer, self.kept = layer, None

    def observe(self, module, probs, plain=None, *, scores=None):
        if self.calls == self.layer:
            self.kept = (probs.clone(), None if scores is None else scores.clone())
        super().observe(module, probs, plain, scores=scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    loaded = loading.load_model("minilm-l6")
    batch = fixed_batches(loaded.tokenizer, args.length, args.batch_size, 1)[0]
    special = special_of(batch, loaded.tokenizer)
    keeper = Keeper(args.layer, loaded.num_layers, num_heads=loaded.num_heads)
    forward_batch(loaded, keeper, batch, special)
    probs, scores = keeper.kept
    keep = batch["attention_mask"].bool()
    header = {"length": args.length, "batch_size": args.batch_size, "layer": args.layer, "repeats": args.repeats,
              "shape": list(probs.shape), "versions": versions(), "package": package_state(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps(header), flush=True)
    default = blocks.CHUNK_ELEMENTS

    def observe_s(limit: int) -> float:
        blocks.CHUNK_ELEMENTS = limit
        probe = probe_mod.Probe(loaded.num_layers, num_heads=loaded.num_heads)
        probe.begin(keep, special)
        t0 = time.perf_counter()
        probe.observe(None, probs, None, scores=scores)
        return time.perf_counter() - t0

    def matmul_s() -> float:
        t0 = time.perf_counter()
        torch.matmul(probs, probs)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for limit in LIMITS:
                times.setdefault(f"probe threads={threads} block={limit * 4 >> 20} MiB", []).append(observe_s(limit))
            times.setdefault(f"A @ A threads={threads}", []).append(matmul_s())
    blocks.CHUNK_ELEMENTS = default
    summary = {k: {"median_ms": 1000 * statistics.median(v), "min_ms": 1000 * min(v)} for k, v in times.items()}
    for k, v in summary.items():
        print(f"  {k:34s} median {v['median_ms']:6.1f} ms, fastest {v['min_ms']:6.1f} ms")
    tables = {}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for threads in (1, 2):
            torch.set_num_threads(threads)
            observe_s(default)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    observe_s(default)
            events = prof.key_averages()
            tables[threads] = {"self_cpu_ms_per_layer": sum(e.self_cpu_time_total for e in events) / 3000,
                               "calls_per_layer": sum(e.count for e in events) / 3}
            print(f"\nthreads={threads}: operators' own time {tables[threads]['self_cpu_ms_per_layer']:.1f} ms per "
                  f"layer, {tables[threads]['calls_per_layer']:.0f} operator calls per layer")
            print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**header, "times": times, "summary": summary,
                                                   "profile": tables}, indent=2))


if __name__ == "__main__":
    main()
