"""One layer's SAOBP refinement, forward and backward, fused against the readable form and plain softmax.

The work that SAOBP adds to one attention layer of a training step, isolated: from scores ``S`` (B, H, L, L)
with ``requires_grad``, ``A = softmax(S)``, then one of

    plain      nothing more (the baseline's attention probabilities)
    readable   ``saobp.saobp_probs_readable`` (the term-by-term form, autograd; the form used before)
    fused      ``saobp.saobp_probs`` (the message term as one Function with a hand-written backward)

and the backward of ``sum(out * R)`` for a fixed random ``R``. Modes are alternated call by call (order
rotating) for ``--rounds`` rounds; reported are medians, the extra cost over plain, and the paired
per-round ratio fused / readable with its quartiles. This script measures; it changes nothing in the package.

    OMP_NUM_THREADS=1 python bench/bench_saobp.py --length 128 --batch-size 16 --rounds 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from attnprobe.formulas.saobp import GAMMAS, saobp_probs, saobp_probs_readable

MODES = ("plain", "readable", "fused")


def step(mode: str, scores0: torch.Tensor, weights: torch.Tensor, gamma: float) -> float:
    scores = scores0.clone().requires_grad_()
    t0 = time.perf_counter()
    probs = torch.softmax(scores, -1)
    if mode == "readable":
        probs = saobp_probs_readable(scores, gamma, 1.0, probs=probs)
    elif mode == "fused":
        probs = saobp_probs(scores, gamma, 1.0, probs=probs)
    (probs * weights).sum().backward()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.heads, args.length, args.length)
    scores0 = torch.randn(shape, generator=gen) * 2
    weights = torch.randn(shape, generator=gen)
    gamma = GAMMAS["bp-high"]
    for mode in MODES:  # warm-up
        step(mode, scores0, weights, gamma)
    times = {m: [] for m in MODES}
    load_start = os.getloadavg()
    for r in range(args.rounds):
        order = MODES[r % 3:] + MODES[:r % 3]
        for mode in order:
            times[mode].append(step(mode, scores0, weights, gamma))
    median = {m: statistics.median(ts) for m, ts in times.items()}
    paired = [f / r for f, r in zip(times["fused"], times["readable"])]
    extra = [(f - b) / (r - b) for f, r, b in zip(times["fused"], times["readable"], times["plain"])]
    q = statistics.quantiles(paired, n=4)
    qe = statistics.quantiles(extra, n=4)
    print(f"B={args.batch_size} H={args.heads} L={args.length}, {threads} threads, {args.rounds} rounds: "
          + "  ".join(f"{m} {1e3 * median[m]:.1f} ms" for m in MODES))
    print(f"  fused / readable (whole layer step) = {statistics.median(paired):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")
    print(f"  fused extra / readable extra (over plain) = {statistics.median(extra):.3f} "
          f"(quartiles {qe[0]:.3f}-{qe[2]:.3f})")
    if args.json_out:
        out = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
               "threads": threads, "torch": torch.__version__, "python": platform.python_version(),
               "load_average_start": load_start, "median_s": median, "all_s": times,
               "paired_fused_over_readable": statistics.median(paired), "paired_quartiles": [q[0], q[2]],
               "extra_fused_over_readable": statistics.median(extra), "extra_quartiles": [qe[0], qe[2]]}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
