"""Where a bp-high training step's extra time goes, operator by operator, against a baseline step.

The same set-up as ``bench_refine.py`` (the bundled model for sequence classification, train mode, AdamW,
fixed-length batches of sample-corpus text, freed memory kept as refine does), one step of each variant per
round, alternated, every step under ``torch.profiler``. For every operator the script keeps its smallest
self time per step over the rounds (the least disturbed by other jobs on the machine), then prints the
difference bp-high - baseline grouped as

    products        aten::bmm and aten::baddbmm (the three extra (L x L) @ (L x L) products per layer)
    softmax         the second softmax, forward and backward
    logarithm       log1p (the messages' logarithm)
    elementwise     every other operator that only bp-high runs more of (copies, products and sums
                    of (B, H, L, L) tensors, the renormalisation, the division)
    shared          operators both variants run the same number of times (linear layers, dropout, AdamW,
                    ...): their difference is measurement noise and cache effects

each as milliseconds per step and as a share of the baseline step. Profiler overhead is in both variants.
This script measures; it changes nothing in the package.

    OMP_NUM_THREADS=1 python bench/refine_profile.py --length 128 --batch-size 16 --rounds 6

Fewer than 6 rounds rarely find an undisturbed step of every operator on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from attnprobe.runtime import memory
from bench_refine import fixed_batches, load_variant, train_step
from bench_scan import package_state

GROUPS = {
    "products": ("aten::bmm", "aten::baddbmm"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
    "logarithm": ("aten::log1p_", "aten::log1p"),
}


def profiled_step(net, optimizer, batch) -> tuple[dict[str, float], dict[str, int]]:
    """One training step under the profiler: self milliseconds and call counts by operator."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(net, optimizer, batch)
    averages = prof.key_averages()
    return ({e.key: e.self_cpu_time_total / 1000 for e in averages}, {e.key: e.count for e in averages})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6, help="profiled steps of each variant, alternated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    kept = memory.keep_freed_memory()

    nets, tokenizer = {}, None
    for v in ("baseline", "bp-high"):
        loaded, net, optimizer = load_variant(args.model, v, None, args.seed)
        nets[v], tokenizer = (net, optimizer), loaded.tokenizer
    batches = fixed_batches(tokenizer, args.length, args.batch_size, 2, args.seed)
    for net, optimizer in nets.values():  # warm-up
        for batch in batches:
            train_step(net, optimizer, batch)

    best = {v: {} for v in nets}
    counts = {v: {} for v in nets}
    load_start = os.getloadavg()
    for r in range(args.rounds):
        order = list(nets) if r % 2 == 0 else list(nets)[::-1]
        for v in order:
            times, calls = profiled_step(*nets[v], batches[r % len(batches)])
            for op, ms in times.items():
                best[v][op] = min(best[v].get(op, float("inf")), ms)
            counts[v] = calls

    base_total = sum(best["baseline"].values())
    ops = sorted(set(best["baseline"]) | set(best["bp-high"]))
    diff = {op: best["bp-high"].get(op, 0.0) - best["baseline"].get(op, 0.0) for op in ops}
    grouped = {g: 0.0 for g in (*GROUPS, "elementwise", "shared")}
    for op in ops:
        group = next((g for g, names in GROUPS.items() if op in names), None)
        if group is None:
            more = counts["bp-high"].get(op, 0) > counts["baseline"].get(op, 0)
            group = "elementwise" if more else "shared"
        grouped[group] += diff[op]
    extra = sum(grouped.values())

    print(f"model {args.model}, L={args.length}, batch {args.batch_size}, {threads} threads, "
          f"freed memory {'kept' if kept else 'returned'}; smallest self time per operator over {args.rounds} "
          f"profiled steps of each variant, alternated; package at {package_state()['commit']}")
    print(f"baseline step {base_total:.1f} ms, bp-high {sum(best['bp-high'].values()):.1f} ms: "
          f"bp-high / baseline {1 + extra / base_total:.3f} (under the profiler)")
    for g, ms in grouped.items():
        print(f"  {g:12s} {ms:8.1f} ms per step  {100 * ms / base_total:6.2f} % of the baseline step")
    print("largest differences by operator (ms per step, bp-high - baseline):")
    for op in sorted(ops, key=lambda o: -abs(diff[o]))[:14]:
        print(f"  {op[:44]:44s} {best['baseline'].get(op, 0.0):8.1f} {best['bp-high'].get(op, 0.0):8.1f} "
              f"{diff[op]:8.1f}  calls {counts['baseline'].get(op, 0)} / {counts['bp-high'].get(op, 0)}")
    if args.json_out:
        out = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
               "package": package_state(), "threads": threads, "keeps_freed_memory": kept,
               "torch": torch.__version__, "python": platform.python_version(), "load_average_start": load_start,
               "length": args.length, "batch_size": args.batch_size, "rounds": args.rounds,
               "baseline_step_ms": base_total, "groups_ms": grouped,
               "groups_share_of_baseline": {g: ms / base_total for g, ms in grouped.items()},
               "per_operator_ms": {v: best[v] for v in best}, "calls": counts}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
