"""Whole processes: the ``attnprobe scan`` command against a script that only runs the eager forward pass.

Each mode is one fresh process over the same corpus (a TSV of sample-corpus text, every row longer than
``--length`` tokens, so every batch is ``--batch-size`` sequences of exactly ``--length`` tokens):

    eager          a plain script: load the model with ``attn_implementation="eager"``, tokenize the rows
                   (truncated to ``--length``), forward them in batches under ``torch.no_grad()``
    eager_kept     the same script after ``memory.keep_freed_memory()`` (the allocator setting scan uses)
    eager_cut      the eager script with each pass ended after the last layer's self-attention module (a
                   forward hook that raises), the model work a scan does since it ends its passes at the last
                   attention: scan against it is the probe's own cost
    scan           ``attnprobe scan minilm-l6 --data corpus.tsv --max-length L --batch-size B --patterns 0``
    scan_default   the same with ``ATTNPROBE_KEEP_FREED_MEMORY=0`` (glibc's default thresholds)
    scan_compiled  the same as scan with ``--compile on``

The modes run in rounds, their order rotating from round to round, so each round's processes see similar
machine load; every process gets ``OMP_NUM_THREADS=--threads``. Reported per mode: the median and the best
wall time of the whole process, and for each pair the ratio of the best, of the medians, and the median of
the per-round ratios, and each process's minor page faults. This script measures; it changes nothing in the
package.

    python bench/bench_process.py --length 128 --rows 1024 --rounds 3 --threads 1

Peak memory of a scan with and without the allocator setting (``--write-corpus`` writes the same corpus):

    python bench/bench_process.py --length 512 --rows 64 --write-corpus /tmp/corpus512.tsv
    /usr/bin/time -f "%M KiB" attnprobe scan minilm-l6 --data /tmp/corpus512.tsv --max-length 512 \
        --patterns 0 --out /tmp/r
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODES = ("eager", "eager_kept", "eager_cut", "scan", "scan_default", "scan_compiled")
PAIRS = (("eager", "scan"), ("eager", "scan_default"), ("eager", "scan_compiled"), ("eager_kept", "scan"),
         ("eager_cut", "scan"), ("eager_cut", "scan_compiled"), ("eager", "eager_cut"), ("eager", "eager_kept"),
         ("scan_default", "scan"))


def write_corpus(path: Path, rows: int, length: int) -> None:
    """``rows`` texts, each a window of the sample-corpus text of ``length + 40`` tokens, one per TSV row."""
    from bench_scan import token_stream

    from attnprobe.models import checkpoints

    tokenizer = checkpoints.load_tokenizer(checkpoints.resolve_model("minilm-l6")[0])
    stream = token_stream(tokenizer)
    body = length + 40
    stride = max(1, len(stream) // max(1, rows))
    with path.open("w", encoding="utf-8") as f:
        f.write("sentence\n")
        for i in range(rows):
            start = (i * stride) % len(stream)
            window = [stream[(start + k) % len(stream)] for k in range(body)]
            text = tokenizer.decode(window).replace("\t", " ").replace("\n", " ")
            f.write(text + "\n")


def child_eager(args) -> None:
    """The plain eager-forward script (one process): prints the seconds of its batch loop as JSON."""
    import torch

    if args.child == "eager_kept":
        from attnprobe.runtime import memory

        memory.keep_freed_memory()
    from transformers import AutoModel, AutoTokenizer

    from attnprobe.models import checkpoints

    torch.set_num_threads(args.threads)
    path = checkpoints.resolve_model("minilm-l6")[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class Cut(Exception):
        pass

    def cut(*_):
        raise Cut

    if args.child == "eager_cut":
        model.encoder.layer[-1].attention.self.register_forward_hook(cut)
    lines = Path(args.data).read_text(encoding="utf-8").splitlines()[1:]
    started = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for i in range(0, len(lines), args.batch_size):
            batch = tokenizer(lines[i:i + args.batch_size], truncation=True, max_length=args.length,
                              padding=True, return_tensors="pt")
            tokens += int(batch["attention_mask"].sum())
            try:
                model(**batch)
            except Cut:
                pass
    print(json.dumps({"loop_s": time.perf_counter() - started, "tokens": tokens}))


def run_mode(mode: str, corpus: Path, args, work: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if mode.startswith("eager"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--data", str(corpus),
               "--length", str(args.length), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    else:
        out = work / f"run-{mode}-{time.time_ns()}"
        cmd = [sys.executable, "-m", "attnprobe", "scan", "minilm-l6", "--data", str(corpus), "--max-length",
               str(args.length), "--batch-size", str(args.batch_size), "--patterns", "0", "--out", str(out)]
        if mode == "scan_compiled":
            cmd += ["--compile", "on"]
        if mode == "scan_default":
            env["ATTNPROBE_KEEP_FREED_MEMORY"] = "0"
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - started
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults  # the finished child's page faults
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    result = {"wall_s": wall, "minor_faults": faults}
    if mode.startswith("eager"):
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        meta = json.loads((out / "run.json").read_text())
        result.update({"tokens": meta["data"]["tokens"], "cpu_allocator": meta.get("cpu_allocator"),
                       "metrics_path": meta.get("metrics_path")})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--write-corpus", default=None, metavar="TSV",
                    help="only write the corpus (--rows, --length) to this file, e.g. for a scan under /usr/bin/time")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_eager(args)
        return
    if args.write_corpus:
        write_corpus(Path(args.write_corpus), args.rows, args.length)
        return

    from bench_scan import package_state

    from attnprobe.scanning.scanner import versions

    header = {"threads": args.threads, "length": args.length, "rows": args.rows, "batch_size": args.batch_size,
              "rounds": args.rounds, "versions": versions(), "package": package_state(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps(header), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "corpus.tsv"
        write_corpus(corpus, args.rows, args.length)
        if "scan_compiled" in args.modes:  # compile once so that torch's on-disk cache serves the timed runs
            run_mode("scan_compiled", corpus, args, work)
        runs: dict[str, list[dict]] = {m: [] for m in args.modes}
        for r in range(args.rounds):
            order = args.modes[r % len(args.modes):] + args.modes[:r % len(args.modes)]
            for mode in order:
                res = run_mode(mode, corpus, args, work)
                runs[mode].append(res)
                print(f"  round {r + 1} {mode:14s} {res['wall_s']:7.1f} s whole process"
                      + (f", loop {res['loop_s']:.1f} s" if "loop_s" in res else "")
                      + (f", allocator {res['cpu_allocator']}" if res.get("cpu_allocator") else "")
                      + f", {res['minor_faults']} page faults", flush=True)
    tokens = {m: {v["tokens"] for v in runs[m]} for m in runs}
    print(f"tokens per process: {tokens}")
    summary = {}
    for m, v in runs.items():
        walls = [x["wall_s"] for x in v]
        summary[m] = {"median_s": statistics.median(walls), "best_s": min(walls)}
        print(f"{m:14s} median {summary[m]['median_s']:7.1f} s, best {summary[m]['best_s']:7.1f} s")
    ratios = {}
    for a, b in PAIRS:
        if a not in runs or b not in runs:
            continue
        paired = [x["wall_s"] / y["wall_s"] for x, y in zip(runs[a], runs[b])]
        ratios[f"{a}_over_{b}"] = {
            "best": summary[a]["best_s"] / summary[b]["best_s"],
            "medians": summary[a]["median_s"] / summary[b]["median_s"],
            "paired_median": statistics.median(paired), "paired_min": min(paired), "paired_max": max(paired)}
        q = ratios[f"{a}_over_{b}"]
        print(f"{a} time / {b} time (= {b} throughput / {a}): best {q['best']:.3f}, medians {q['medians']:.3f}, "
              f"paired {q['paired_median']:.3f} ({q['paired_min']:.3f}-{q['paired_max']:.3f})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**header, "runs": runs, "summary": summary, "ratios": ratios},
                                                  indent=2))


if __name__ == "__main__":
    main()
