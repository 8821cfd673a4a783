"""The single operators of one layer's SAOBP work, timed one by one: where the floor of a bp-high step is.

On tensors of one attention layer's shape (B, H, L, L) float32: the three batched ``(L x L) @ (L x L)``
products SAOBP adds (one forward, two backward), against the linear layers' GEMM of the same model for
GFLOP/s, and the elementwise passes of the forward and backward (``saobp._Messages``). Each operator runs
``--repeats`` times on preallocated inputs; the median is printed. This script measures; it changes nothing
in the package.

    OMP_NUM_THREADS=1 python bench/saobp_ops.py --length 128 --batch-size 16 \
        --json bench/results/saobp_ops_128_threads1.json
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


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])  # two warm-up calls left out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--hidden", type=int, default=384, help="hidden size for the linear layers' GEMM")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    B, H, L, gamma = args.batch_size, args.heads, args.length, 0.9
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(B, H, L, L, generator=gen) * 2, -1)
    weights, logs = probs.clone(), torch.log1p(-gamma * probs)
    grad = torch.randn(B, H, L, L, generator=gen)
    inverse = torch.rand(B, H, L, 1, generator=gen)
    out = torch.empty_like(probs)
    w3, l3, s3 = weights.view(-1, L, L), logs.view(-1, L, L), grad.view(-1, L, L)
    tokens = torch.randn(B * L, args.hidden, generator=gen)
    ffn = torch.randn(4 * args.hidden, args.hidden, generator=gen)
    product_flop = 2 * B * H * L**3
    linear_flop = 2 * B * L * args.hidden * 4 * args.hidden
    ops = {
        "products: baddbmm S + W @ L (forward)": (lambda: torch.baddbmm(s3, w3, l3), product_flop),
        "products: G @ L^T (backward)": (lambda: torch.matmul(grad, logs.transpose(-1, -2)), product_flop),
        "products: W^T @ G (backward)": (lambda: torch.matmul(weights.transpose(-1, -2), grad), product_flop),
        "linear layer GEMM (B*L x hidden) @ (hidden x 4 hidden)":
            (lambda: torch.nn.functional.linear(tokens, ffn), linear_flop),
        "softmax": (lambda: torch.softmax(grad, -1), None),
        "softmax backward": (lambda: torch._softmax_backward_data(grad, probs, -1, probs.dtype), None),
        "clone (W from A)": (lambda: probs.clone(), None),
        "row sum": (lambda: probs.sum(-1, keepdim=True), None),
        "log1p(-gamma * A)": (lambda: torch.mul(probs, -gamma).log1p_(), None),
        "row dot: linalg.vecdot": (lambda: torch.linalg.vecdot(grad, weights), None),
        "row dot: product and sum": (lambda: (grad * weights).sum(-1, keepdim=True), None),
        "sub_ and mul_ by a column": (lambda: out.copy_(grad).sub_(inverse).mul_(inverse), None),
        "1 - gamma * A (rsub)": (lambda: torch.rsub(probs, 1.0, alpha=gamma), None),
        "addcdiv_": (lambda: out.addcdiv_(grad, weights.add(1.0), value=-gamma), None),
        "copy (a pass for reference)": (lambda: out.copy_(grad), None),
    }
    results = {}
    print(f"B={B} H={H} L={L} float32, {threads} threads, median of {args.repeats}")
    for name, (fn, flop) in ops.items():
        ms = median_ms(fn, args.repeats)
        results[name] = {"ms": ms, "gflop_per_s": flop / ms / 1e6 if flop else None}
        rate = f"  {flop / ms / 1e6:6.1f} GFLOP/s" if flop else ""
        print(f"  {name:58s} {ms:7.2f} ms{rate}")
    if args.json_out:
        doc = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
               "threads": threads, "torch": torch.__version__, "python": platform.python_version(),
               "load_average_start": os.getloadavg(), "shape": [B, H, L, L], "results": results}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
