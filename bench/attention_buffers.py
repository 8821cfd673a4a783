"""The attention function with fresh tensors against the probe's reused buffers: time and page faults.

Calls ``attention.attention_forward`` on random ``(B, H, L, D)`` queries, keys and values with a padding bias, under
a probe whose metrics are switched off (so only the attention function is timed), with
``Probe.reuse_buffers`` off (four fresh ``(B, H, L, L)`` tensors per call: product, scaled, masked, softmax) and
on (the logits and softmax written into the probe's two buffers), alternated, median of ``--repeats``; minor
page faults per call from ``getrusage``. Checks that both give the same output. This script measures; it
changes nothing in the package.

    OMP_NUM_THREADS=1 python bench/attention_buffers.py --length 512 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import package_state  # noqa: E402

from attnprobe.runtime import memory  # noqa: E402
from attnprobe.capture import attention
from attnprobe.capture import probe as probe_mod  # noqa: E402
from attnprobe.scanning.scanner import versions  # noqa: E402


class Quiet(probe_mod.Probe):
    """A Probe that receives the attention and computes nothing."""

    def observe(self, module, probs, plain=None, *, scores=None):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kept = memory.keep_freed_memory()  # as the scan command runs
    B, H, L, D = args.batch_size, args.heads, args.length, args.head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    mask = torch.zeros(B, 1, L, L)
    mask[: B // 2, :, :, L - L // 8:] = torch.finfo(torch.float32).min  # half the batch padded
    module = torch.nn.Module()
    module.eval()
    header = {"shape": [B, H, L, L], "threads": args.threads, "cpu_allocator": memory.label(kept),
              "versions": versions(), "package": package_state(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps(header), flush=True)
    probes = {"fresh": Quiet(1), "buffers": Quiet(1)}
    probes["buffers"].reuse_buffers = True
    outputs = {}
    times: dict[str, list[float]] = {m: [] for m in probes}
    faults: dict[str, list[int]] = {m: [] for m in probes}
    for r in range(args.repeats + 1):  # the first round (buffers taken, pages first touched) is not counted
        for mode in (list(probes) if r % 2 == 0 else list(probes)[::-1]):
            with torch.no_grad(), probe_mod.capturing(probes[mode]):
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                out, _ = attention.attention_forward(module, q, k, v, mask)
                t = time.perf_counter() - t0
                f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            if r:
                times[mode].append(t)
                faults[mode].append(f)
            outputs[mode] = out
            del out
    same = torch.equal(outputs["fresh"], outputs["buffers"])
    summary = {m: {"median_ms": 1000 * statistics.median(times[m]), "min_ms": 1000 * min(times[m]),
                   "median_page_faults": statistics.median(faults[m])} for m in probes}
    for m, s in summary.items():
        print(f"  {m:8s} median {s['median_ms']:7.1f} ms, fastest {s['min_ms']:7.1f} ms, "
              f"{s['median_page_faults']:.0f} page faults per call")
    print(f"  fresh / buffers time: {summary['fresh']['median_ms'] / summary['buffers']['median_ms']:.2f}; "
          f"same output: {same}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**header, "times": times, "faults": faults, "summary": summary,
                                                   "same_output": same}, indent=2))


if __name__ == "__main__":
    main()
