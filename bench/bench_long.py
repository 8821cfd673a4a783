"""Long sequences: the scan's cost against the eager forward from 128 to 8,192 tokens, exact and sampled.

Two models with random weights at real widths, built here (nothing is downloaded): a long-context encoder shaped
like ModernBERT-base (hidden 768, 12 heads, feed-forward 1,152, global attention every third layer, 8,192
positions) and a decoder shaped like SmolLM2-135M (Llama: hidden 576, 9 query heads over 3 key/value heads,
feed-forward 1,536), both with ``--layers`` layers. One sequence of L random token ids per pass, under
``torch.no_grad()``. Modes, alternated within each repeat (their order rotates):

    eager     the plain forward of an ``attn_implementation="eager"`` copy of the weights
    exact     ``scanning.passes.forward_batch`` under a Probe (the scan's exact path; up to ``--exact-max``)
    sampled   the same with ``--sample-queries N`` (default 32)

Prints seconds per pass (median over repeats) and throughput against eager (eager seconds / mode seconds). With
``--memory``, each (mode, length) also runs once in a fresh subprocess that reports its peak resident memory
above the loaded model's, in units of one layer's attention of the eager forward (H x L x L x 4 bytes).

    python bench/bench_long.py --lengths 128 512 1024 2048 4096 8192 --threads 2 --memory
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("eager", "exact", "sampled")


def build(kind: str, layers: int, attn: str):
    from transformers import LlamaConfig, LlamaModel, ModernBertConfig, ModernBertModel

    torch.manual_seed(0)
    if kind == "encoder":
        config = ModernBertConfig(vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=layers,
                                  num_attention_heads=12, max_position_embeddings=8192, global_attn_every_n_layers=3,
                                  local_attention=128, attn_implementation=attn)
        return ModernBertModel(config).eval()
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         attn_implementation=attn)
    return LlamaModel(config).eval()


class Loaded:
    """The little of a LoadedModel that ``forward_batch`` reads."""

    def __init__(self, model, heads: int, causal: bool):
        self.model, self.num_layers, self.num_heads = model, model.config.num_hidden_layers, heads
        self.backend, self.causal, self.recover = "attnprobe", causal, None


def heads_of(kind: str) -> int:
    return 12 if kind == "encoder" else 9


def run(kind: str, mode: str, length: int, layers: int, n: int, models: dict) -> float:
    from attnprobe.capture.probe import Probe
    from attnprobe.scanning.passes import forward_batch

    ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "eager":
            models["eager"](**batch)
        else:
            loaded = models["probe"]
            probe = Probe(layers, num_heads=loaded.num_heads, sample_queries=n if mode == "sampled" else None)
            probe.reuse_buffers = True
            forward_batch(loaded, probe, batch, torch.zeros_like(ids, dtype=torch.bool))
    return time.perf_counter() - t0


def load(kind: str, layers: int) -> dict:
    from attnprobe.models import loading

    loading.register_attention()
    probed = build(kind, layers, "attnprobe")
    eager = build(kind, layers, "eager")
    eager.load_state_dict(probed.state_dict())
    return {"eager": eager, "probe": Loaded(probed, heads_of(kind), kind == "decoder")}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args) -> None:
    """One pass of one mode in this fresh process; prints the peak resident memory above the loaded model's
    (Linux: the peak is reset after loading by writing 5 to /proc/self/clear_refs, then read as VmHWM)."""
    torch.set_num_threads(args.threads)
    models = load(args.kind, args.layers)
    run(args.kind, args.mode, 64, args.layers, args.sample_queries, models)  # allocator warm-up
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    run(args.kind, args.mode, args.length, args.layers, args.sample_queries, models)
    print(json.dumps({"peak_above_model_kib": _status_kib("VmHWM") - base}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=["encoder", "decoder"], choices=["encoder", "decoder"])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--sample-queries", type=int, default=32)
    p.add_argument("--exact-max", type=int, default=2048, help="longest length the exact scan is timed at")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="also peak memory, one fresh subprocess per mode and length")
    p.add_argument("--skip-timing", action="store_true", help="only the peak memory (with --memory)")
    p.add_argument("--memory-lengths", type=int, nargs="*", default=None, help="lengths to measure memory at (default all)")
    p.add_argument("--json", dest="json_out", default=str(ROOT / "bench/results/long_sequences.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    results = []
    for kind in args.kinds:
        models = load(kind, args.layers)
        heads = heads_of(kind)
        for length in args.lengths:
            modes = [m for m in MODES if m != "exact" or length <= args.exact_max]
            times: dict[str, list[float]] = {m: [] for m in modes}
            run(kind, "eager", min(length, 256), args.layers, args.sample_queries, models)  # warm-up
            for r in range(0 if args.skip_timing else args.repeats):
                for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                    times[mode].append(run(kind, mode, length, args.layers, args.sample_queries, models))
            row = {"kind": kind, "length": length, "layers": args.layers, "threads": args.threads,
                   "sample_queries": args.sample_queries,
                   **{f"{m}_s": statistics.median(v) for m, v in times.items() if v}}
            for m in modes[1:]:
                if not args.skip_timing:
                    row[f"{m}_throughput"] = row["eager_s"] / row[f"{m}_s"]
            measure = args.memory and (args.memory_lengths is None or length in args.memory_lengths)
            if measure:
                unit = heads * length * length * 4 / 1024  # one layer's attention, KiB
                for mode in modes:
                    out = subprocess.run([sys.executable, __file__, "--child", "--kind", kind, "--mode", mode,
                                          "--length", str(length), "--layers", str(args.layers),
                                          "--threads", str(args.threads), "--sample-queries",
                                          str(args.sample_queries)], capture_output=True, text=True, check=True)
                    kib = json.loads(out.stdout.strip().splitlines()[-1])["peak_above_model_kib"]
                    row[f"{mode}_peak_layers"] = kib / unit
            results.append(row)
            cells = "  ".join(m + ("" if args.skip_timing else f" {row[f'{m}_s']:.3f}s")
                              + (f" ({row[f'{m}_throughput']:.2f}x)" if m != "eager" and not args.skip_timing else "")
                              + (f" peak {row[f'{m}_peak_layers']:.2f}" if measure else "") for m in modes)
            print(f"{kind:8s} L={length:5d}  {cells}", flush=True)
    from attnprobe.scanning.scanner import versions

    Path(args.json_out).write_text(json.dumps({"rows": results, "versions": versions(),
                                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                                              indent=1))
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
