"""Cost of ``--patterns``: a scan with ``--patterns 0`` against ``--patterns 4`` (or ``--patterns N``), alternated.

Both settings run ``attnprobe.scanning.scanner.scan`` on the same loaded model (default the bundled ``minilm-l6``)
over the built-in sample corpus (what ``make demo`` scans), each writing its run folder (Parquet files and
run.json) into a fresh temporary folder, as the CLI does. The order of the two settings alternates every
repeat (0 first, then N first, ...), and each repeat gives one paired ratio (seconds with N over seconds
with 0); the script prints the median seconds of each setting, the median paired ratio with its range, the
extra pass's own time (run.json ``patterns.seconds``), and the size of patterns.parquet.

It also times what a refine run adds (refinepatterns.StagePatterns: choosing the examples of an eval set,
here the sample corpus, then the before and after passes, with the same untrained model standing in for the
trained one), and, with ``--memory``, the peak resident memory of one scan per setting, each in a fresh
subprocess of this script. Run it single-threaded on a shared machine:

    OMP_NUM_THREADS=1 python bench/bench_patterns.py --repeats 5 --memory

This script measures; it changes nothing in the package.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnprobe.data import sources  # noqa: E402
from attnprobe.models import loading  # noqa: E402
from attnprobe.runtime import outputs  # noqa: E402
from attnprobe.config import ScanConfig  # noqa: E402
from attnprobe.scanning.scanner import scan  # noqa: E402


def timed_scan(loaded, patterns: int, limit: int | None) -> dict:
    """One scan written to a fresh folder: wall seconds, the extra pass's seconds, patterns.parquet bytes."""
    with tempfile.TemporaryDirectory(prefix="bench-patterns-") as tmp:
        out = outputs.prepare_out_dir(Path(tmp) / "run", "scan", overwrite=True)
        started = time.perf_counter()
        result = scan(ScanConfig(patterns=patterns, limit=limit, device="cpu"), loaded=loaded, out_dir=out)
        seconds = time.perf_counter() - started
        path = out / outputs.PATTERNS
        size = path.stat().st_size if path.is_file() else 0
        outputs.release(out)
    kept = result.meta.get("patterns") or {}
    return {"seconds": seconds, "pass_seconds": kept.get("seconds", 0.0), "bytes": size,
            "rows": 0 if result.patterns is None else len(result.patterns),
            "tokens": kept.get("tokens", []), "sequences": result.meta["data"]["sequences_scanned"]}


def refine_extra(loaded, patterns: int, max_length: int = 128) -> float:
    """Seconds StagePatterns adds to a refine whose eval set is the sample corpus: pick, before, after."""
    from types import SimpleNamespace

    from attnprobe.training.stage_patterns import StagePatterns

    texts, pairs = [], []
    for chunk in sources.sample_source().chunks():
        texts += chunk.texts
        pairs += chunk.pairs or [None] * len(chunk.texts)
    eval_data = SimpleNamespace(texts=texts, pairs=pairs if any(pairs) else None)
    with tempfile.TemporaryDirectory(prefix="bench-refine-patterns-") as tmp:
        started = time.perf_counter()
        staged = StagePatterns(patterns, loaded, eval_data, max_length, Path(tmp) / "checkpoints")
        staged.before(loaded.model, resumed=False)
        staged.after(loaded.model)
        staged.frame()
        return time.perf_counter() - started


def memory_child(model: str, patterns: int, limit: int | None) -> None:
    """(subprocess) Load, scan once with ``patterns``, print the peak resident memory in MiB as JSON."""
    torch.set_num_threads(1)
    loaded = loading.load_model(model, device="cpu")
    timed_scan(loaded, patterns, limit)
    print(json.dumps({"patterns": patterns, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_memory(model: str, patterns: int, limit: int | None) -> float:
    cmd = [sys.executable, __file__, "--model", model, "--memory-child", str(patterns)]
    cmd += ["--limit", str(limit)] if limit else []
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--patterns", type=int, default=4, help="N compared against 0")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="scan only the first rows of the sample corpus")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS, one fresh process each")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.model, args.memory_child, args.limit)
        return
    torch.set_num_threads(args.threads)
    loaded = loading.load_model(args.model, device="cpu")
    timed_scan(loaded, args.patterns, 16)  # warm-up: kernels, tokenizer, the example pass
    settings = (0, args.patterns)
    runs: dict[int, list[dict]] = {p: [] for p in settings}
    ratios = []
    for repeat in range(args.repeats):
        order = settings if repeat % 2 == 0 else settings[::-1]
        got = {}
        for p in order:
            got[p] = timed_scan(loaded, p, args.limit)
            runs[p].append(got[p])
            print(f"repeat {repeat} --patterns {p}: {got[p]['seconds']:.2f} s", flush=True)
        ratios.append(got[args.patterns]["seconds"] / got[0]["seconds"])
    refine_seconds = [refine_extra(loaded, args.patterns) for _ in range(3)]
    last = runs[args.patterns][-1]
    result = {
        "model": args.model, "threads": args.threads, "repeats": args.repeats, "limit": args.limit,
        "sequences": last["sequences"], "patterns": args.patterns,
        "seconds": {str(p): spread([r["seconds"] for r in runs[p]]) for p in settings},
        "ratio": spread(ratios),
        "pass_seconds": spread([r["pass_seconds"] for r in runs[args.patterns]]),
        "patterns_parquet_bytes": last["bytes"], "patterns_rows": last["rows"], "tokens": last["tokens"],
        "refine_extra_seconds": spread(refine_seconds),
        "torch": torch.__version__, "command": " ".join(sys.argv),
    }
    if args.memory:
        result["peak_rss_mib"] = {str(p): peak_memory(args.model, p, args.limit) for p in settings}
    s0, sn = result["seconds"]["0"], result["seconds"][str(args.patterns)]
    print(f"{args.model}, {last['sequences']} sequences of the sample corpus, {args.threads} thread(s), "
          f"{args.repeats} repeats, order alternating")
    print(f"scan --patterns 0: median {s0['median']:.2f} s (range {s0['min']:.2f}-{s0['max']:.2f})")
    print(f"scan --patterns {args.patterns}: median {sn['median']:.2f} s (range {sn['min']:.2f}-{sn['max']:.2f})")
    r = result["ratio"]
    print(f"paired ratio (--patterns {args.patterns} / 0): median {r['median']:.3f} "
          f"(range {r['min']:.3f}-{r['max']:.3f})")
    print(f"the extra pass alone (run.json patterns.seconds): median {result['pass_seconds']['median']:.3f} s; "
          f"examples of {last['tokens']} tokens")
    print(f"patterns.parquet: {last['bytes']:,} bytes, {last['rows']:,} rows")
    rx = result["refine_extra_seconds"]
    print(f"refine --patterns {args.patterns} extra (pick over the corpus, before and after passes): "
          f"median {rx['median']:.3f} s (range {rx['min']:.3f}-{rx['max']:.3f}, 3 runs)")
    if args.memory:
        m = result["peak_rss_mib"]
        print(f"peak RSS: --patterns 0 {m['0']:.0f} MiB, --patterns {args.patterns} {m[str(args.patterns)]:.0f} MiB "
              f"(difference {m[str(args.patterns)] - m['0']:+.0f} MiB)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
