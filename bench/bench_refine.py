"""Refine training step time: SAOBP variants against baseline attention (DESIGN §5).

Each variant is the bundled model loaded through ``attnprobe.models.load_model`` for sequence
classification with its ``SaobpSettings`` (baseline: gamma 0, i.e. plain attention through attnprobe's
attention function; bp-low: gamma 0.5; bp-high: gamma 0.9), in train mode (dropout on), with its own AdamW.
One timed step is ``zero_grad`` + forward with labels + ``loss.backward()`` + ``optimizer.step()`` on a
fixed-length batch (sample-corpus text, exactly L tokens, no padding); every variant sees the same batches.

Timing interleaves the variants step by step: a round is one step of every variant on the same batch, back
to back, in an order that rotates every round; there are ``--repeats`` x ``--steps`` rounds. Reported are
the median seconds per step of each variant, the ratio of those medians, and the median over rounds of the
per-round ratio (robust against load from other processes that changes over minutes), all from one run. This script measures; it changes nothing in the package.

``--readable`` adds a fourth mode, ``bp-high-readable``: bp-high with the message term written out term by term
and differentiated by autograd (``saobp.saobp_probs_readable``, the form used before the fused message term), so
the fused and the readable form are timed against the same baseline in one run. ``--variants`` picks which of
bp-low and bp-high run (baseline always does). Each step's minor page faults (pages newly taken from the kernel)
are counted too.

    OMP_NUM_THREADS=2 python bench/bench_refine.py --lengths 128 64 --batch-size 16 --steps 4 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import contextlib

from attnprobe.runtime import memory
from attnprobe.models import loading
from attnprobe.formulas import saobp
from attnprobe.formulas.saobp import GAMMAS, SaobpSettings
from bench_scan import token_stream  # the same fixed-length token source as the scan benchmark

VARIANTS = ("baseline", "bp-low", "bp-high")
READABLE = "bp-high-readable"
TARGET = 1.15  # bp-high step time / baseline step time should stay at or below this


def fixed_batches(tokenizer, length: int, batch_size: int, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``batch_size`` sequences of exactly ``length`` tokens ([CLS] text... [SEP]) with
    seeded random 0/1 labels; each sequence is a different window of the (repeated) sample-corpus tokens."""
    stream = token_stream(tokenizer)
    body = length - 2
    stride = max(1, len(stream) // max(1, count * batch_size))
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        rows = []
        for b in range(batch_size):
            start = ((i * batch_size + b) * stride) % len(stream)
            rows.append([tokenizer.cls_token_id, *(stream[(start + k) % len(stream)] for k in range(body)),
                         tokenizer.sep_token_id])
        input_ids = torch.tensor(rows, dtype=torch.long)
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                        "token_type_ids": torch.zeros_like(input_ids),
                        "labels": torch.randint(0, 2, (batch_size,), generator=gen)})
    return batches


@contextlib.contextmanager
def implementation(variant: str):
    """Run ``variant``'s steps with the readable SAOBP form where it asks for it (attention_forward looks
    ``saobp_probs`` up at every call)."""
    if variant != READABLE:
        yield
        return
    fused = saobp.saobp_probs
    saobp.saobp_probs = saobp.saobp_probs_readable
    try:
        yield
    finally:
        saobp.saobp_probs = fused


def load_variant(model: str, variant: str, num_layers: int | None, seed: int):
    torch.manual_seed(seed)  # the same classifier head for every variant
    name = "bp-high" if variant == READABLE else variant
    settings = SaobpSettings(gamma=GAMMAS[name], variant=name)
    loaded = loading.load_model(model, task="sequence-classification", num_labels=2, num_layers=num_layers,
                               saobp=settings, device="cpu")
    net = loaded.model
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=0.01)
    return loaded, net, optimizer


def train_step(net, optimizer, batch) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = net(**batch).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def bench_length(nets: dict, tokenizer, length: int, batch_size: int, steps: int, repeats: int,
                 seed: int) -> dict:
    batches = fixed_batches(tokenizer, length, batch_size, steps, seed)
    for v, (net, optimizer) in nets.items():  # warm-up: allocator, kernels, optimizer state
        for batch in batches[:2]:
            with implementation(v):
                train_step(net, optimizer, batch)
    per_step = {v: [] for v in nets}
    faults = {v: [] for v in nets}  # minor page faults (pages newly taken from the kernel) per step
    order = list(nets)
    rounds = 0
    for r in range(repeats):
        for b, batch in enumerate(batches):
            shift = (r * len(batches) + b) % len(order)
            for v in order[shift:] + order[:shift]:  # every variant steps once per round, order rotating
                net, optimizer = nets[v]
                with implementation(v):
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = time.perf_counter()
                    train_step(net, optimizer, batch)
                    per_step[v].append(time.perf_counter() - t0)
                    faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            rounds += 1
    median = {v: statistics.median(ts) for v, ts in per_step.items()}
    # paired: the ratio within each round (the variants ran back to back), median over rounds
    ratios = {v: [t / b for t, b in zip(per_step[v], per_step["baseline"])] for v in nets if v != "baseline"}
    paired = {v: statistics.median(rs) for v, rs in ratios.items()}
    # spread: the quartiles of the per-round ratios
    spread = {v: [round(q, 4) for q in statistics.quantiles(rs, n=4)[::2]] for v, rs in ratios.items()}
    if READABLE in nets:  # fused against readable, paired within each round
        fused = [t / r for t, r in zip(per_step["bp-high"], per_step[READABLE])]
        paired["bp-high/" + READABLE] = statistics.median(fused)
        spread["bp-high/" + READABLE] = [round(q, 4) for q in statistics.quantiles(fused, n=4)[::2]]
    base = median["baseline"]
    return {
        "length": length, "batch_size": batch_size, "steps": steps, "repeats": repeats,
        "seconds_per_step": median,
        "all_seconds_per_step": per_step,
        "ratio_vs_baseline": {v: median[v] / base for v in median if v != "baseline"},
        "paired_ratio_vs_baseline": paired,
        "paired_ratio_quartiles": spread,
        "rounds": rounds,
        "median_page_faults_per_step": {v: statistics.median(f) for v, f in faults.items()},
        "all_page_faults_per_step": faults,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first N layers (default: all)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 64],
                   help="sequence lengths to time, in order (default: 128 64)")
    p.add_argument("--length", type=int, default=None, help="time only this length (overrides --lengths)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="batches (one step of each variant on each) per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--readable", action="store_true",
                   help=f"also time {READABLE}: bp-high with the readable (autograd) SAOBP form")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="the variants to time (baseline is always timed; default: all three)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    lengths = [args.length] if args.length else args.lengths
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    kept = memory.keep_freed_memory()  # as refine does on the CPU (ATTNPROBE_KEEP_FREED_MEMORY=0: off)

    variants = ("baseline", *(v for v in args.variants if v != "baseline"))
    if args.readable:
        variants = (*variants, *(() if "bp-high" in variants else ("bp-high",)), READABLE)
    nets, tokenizer, info = {}, None, None
    for v in variants:
        loaded, net, optimizer = load_variant(args.model, v, args.num_layers, args.seed)
        nets[v] = (net, optimizer)
        tokenizer, info = loaded.tokenizer, loaded.info
        assert loaded.backend == "attnprobe", loaded.backend
    print(f"model {args.model}: {info['layers']} layers, {info['heads']} heads, hidden {info['hidden_size']}; "
          f"torch {torch.__version__}, {threads} threads, freed memory {'kept' if kept else 'returned (default)'}; "
          f"batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats per variant, interleaved", flush=True)

    load_start = os.getloadavg()
    started = time.time()
    results = []
    for length in lengths:
        r = bench_length(nets, tokenizer, length, args.batch_size, args.steps, args.repeats, args.seed)
        results.append(r)
        s, pf = r["seconds_per_step"], r["median_page_faults_per_step"]
        print(f"L={length:4d}  " + "  ".join(f"{v} {s[v]:.3f} s/step" for v in variants), flush=True)
        print("         page faults per step (median): " + "  ".join(f"{v} {pf[v]:.0f}" for v in variants),
              flush=True)
        for v, ratio in r["ratio_vs_baseline"].items():
            note = f"  (target <= {TARGET})" if v == "bp-high" else ""
            q1, q3 = r["paired_ratio_quartiles"][v]
            print(f"         {v} / baseline = {ratio:.3f} (ratio of medians), "
                  f"{r['paired_ratio_vs_baseline'][v]:.3f} (median of paired per-round ratios, "
                  f"quartiles {q1:.3f}-{q3:.3f}){note}", flush=True)
        key = "bp-high/" + READABLE
        if key in r["paired_ratio_vs_baseline"]:
            q1, q3 = r["paired_ratio_quartiles"][key]
            print(f"         bp-high (fused) / {READABLE} = {r['paired_ratio_vs_baseline'][key]:.3f} "
                  f"(median of paired per-round ratios, quartiles {q1:.3f}-{q3:.3f})", flush=True)
    wall = time.time() - started
    if args.json_out:
        out = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
               "model": info, "threads": threads, "keeps_freed_memory": kept, "torch": torch.__version__,
               "python": platform.python_version(), "machine": platform.machine(), "load_average_start": load_start,
               "wall_time_s": round(wall, 2),
               "results": results}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    return 0  # a measurement, not a test: it reports the ratio and never fails on it


if __name__ == "__main__":
    sys.exit(main())
