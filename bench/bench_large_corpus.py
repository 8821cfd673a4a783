"""Peak memory of reading and scanning against corpus size: a 200,000-line and a 2,000-line .txt corpus.

DESIGN §4 makes capture and reading streaming, so peak memory should not grow with the file. This script
writes both corpora (varied fragments of the sample-corpus sentences) into a temporary folder, then runs
each job in a fresh process and takes that process's peak RSS from ``os.wait4`` (``ru_maxrss`` of that
child alone):

    read              every line through ``attnprobe.data.open_source(path).chunks()``, no model
    scan              ``python -m attnprobe scan --data FILE --limit N --out DIR --json``
    scan-per-example  the same with ``--per-example`` (examples.parquet written row group by row group)

and prints the big/small ratio of each (about 1 when memory is flat). A child's ``ru_maxrss`` starts at
its parent's peak (Linux carries it across exec), so the parent stays small: it imports neither torch nor
pandas, and even the corpora are written by a child. This script
measures; it changes nothing in the package.

    python bench/bench_large_corpus.py --limit 4000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attnprobe.data import sources


def source_sentences() -> list[str]:
    """The sample corpus's texts and pair texts."""
    out: list[str] = []
    for chunk in sources.sample_source().chunks():
        out += chunk.texts
        out += [p for p in (chunk.pairs or []) if p]
    return out


def write_corpus(path: Path, lines: int, seed: int) -> dict:
    """``lines`` varied lines: a random word span (4 to 30 words) of a sample sentence, sometimes two."""
    rng = random.Random(seed)
    words = [s.split() for s in source_sentences()]
    total_words = 0
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(lines):
            parts = []
            for _ in range(1 if rng.random() < 0.7 else 2):
                w = rng.choice(words)
                k = rng.randint(min(4, len(w)), min(30, len(w)))
                start = rng.randint(0, len(w) - k)
                parts.append(" ".join(w[start:start + k]))
            line = " ".join(parts)
            total_words += len(line.split())
            fh.write(line + "\n")
    return {"path": str(path), "lines": lines, "bytes": path.stat().st_size, "mean_words": total_words / lines}


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; return its exit code, wall time, output and peak RSS (``wait4``: this child's own)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return {"cmd": cmd, "rc": proc.returncode, "wall_s": wall, "stdout": out.read(), "stderr": err.read()[-3000:],
                "peak_rss_kib": usage.ru_maxrss}


def read_child(path: str) -> None:
    """Child: stream every row of ``path`` without a model; print rows, chunks and this process's peak."""
    t0 = time.perf_counter()
    source = sources.open_source(path)
    rows = chunks = chars = 0
    for chunk in source.chunks():
        rows += len(chunk.texts)
        chunks += 1
        chars += sum(len(t) for t in chunk.texts)
    stats = source.stats()
    print("READ " + json.dumps({"rows": rows, "chunks": chunks, "chars": chars, "rows_read": stats["rows_read"],
                                "seconds": time.perf_counter() - t0, "vmhwm_kib": _vmhwm_kib(),
                                "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def _vmhwm_kib() -> int:
    """This process's own peak RSS (its address space's high-water mark, not inherited at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def job_commands(kind: str, corpus: Path, out_dir: Path, args) -> list[str]:
    if kind == "read":
        return [sys.executable, __file__, "--read-child", str(corpus)]
    cmd = [sys.executable, "-m", "attnprobe", "scan", args.model, "--data", str(corpus), "--out", str(out_dir),
           "--batch-size", str(args.batch_size), "--device", args.device, "--json"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    if kind == "scan-per-example":
        cmd.append("--per-example")
    return cmd


def describe(kind: str, res: dict, out_dir: Path) -> dict:
    row = {"kind": kind, "rc": res["rc"], "wall_s": res["wall_s"], "peak_rss_mib": res["peak_rss_kib"] / 1024,
           "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(res["cmd"]))}
    if res["rc"] != 0:
        raise SystemExit(f"{row['command']} failed ({res['rc']}):\n{res['stderr']}")
    if kind == "read":
        line = next(x for x in res["stdout"].splitlines() if x.startswith("READ "))
        info = json.loads(line[len("READ "):])
        row.update(rows=info["rows"], chunks=info["chunks"], read_s=info["seconds"],
                   own_vmhwm_mib=info["vmhwm_kib"] / 1024)
    else:
        meta = json.loads((out_dir / "run.json").read_text())
        row.update(rows=meta["data"]["sequences_scanned"], tokens=meta["data"]["tokens"],
                   scan_wall_s=meta["wall_time_s"])
        examples = out_dir / "examples.parquet"
        if examples.exists():
            import pyarrow.parquet as pq

            md = pq.ParquetFile(examples).metadata
            row.update(examples_rows=md.num_rows, examples_row_groups=md.num_row_groups,
                       examples_mib=examples.stat().st_size / 2**20)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--big-lines", type=int, default=200_000)
    p.add_argument("--small-lines", type=int, default=2_000)
    p.add_argument("--limit", type=int, default=4000, help="rows scanned from each file (0: all)")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--kinds", nargs="+", default=["read", "scan", "scan-per-example"],
                   choices=["read", "scan", "scan-per-example"])
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    p.add_argument("--read-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--write-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.read_child:
        read_child(args.read_child)
        return
    if args.write_child:  # in a child: reading the sample .tsv imports pandas, which would grow the parent
        path, lines, seed = args.write_child
        print("WROTE " + json.dumps(write_corpus(Path(path), int(lines), int(seed))))
        return
    baseline = run_measured([sys.executable, "-c", "import attnprobe.data.sources"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, check=False).stdout.strip()
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpu_count": os.cpu_count(), "commit": commit,
               "python": platform.python_version(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "baseline_python_import_mib": baseline["peak_rss_kib"] / 1024, "corpora": {}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="attnprobe-bench-") as tmp:
        tmp = Path(tmp)
        corpora = {"big": tmp / "big.txt", "small": tmp / "small.txt"}
        for name, lines, seed in (("big", args.big_lines, 1), ("small", args.small_lines, 2)):
            made = run_measured([sys.executable, __file__, "--write-child", str(corpora[name]), str(lines), str(seed)])
            if made["rc"] != 0:
                raise SystemExit(f"writing the {name} corpus failed:\n{made['stderr']}")
            line = next(x for x in made["stdout"].splitlines() if x.startswith("WROTE "))
            results["corpora"][name] = json.loads(line[len("WROTE "):])
            c = results["corpora"][name]
            print(f"{name}: {c['lines']} lines, {c['bytes'] / 2**20:.1f} MiB, {c['mean_words']:.1f} words/line",
                  flush=True)
        results["parent_ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for kind in args.kinds:
            for name in ("small", "big"):  # alternate, same order each time
                out_dir = tmp / f"run-{kind}-{name}"
                res = run_measured(job_commands(kind, corpora[name], out_dir, args))
                row = describe(kind, res, out_dir)
                row["corpus"] = name
                results["runs"].append(row)
                extra = f", examples.parquet {row['examples_rows']} rows" if "examples_rows" in row else ""
                if "own_vmhwm_mib" in row:
                    extra += f", own VmHWM {row['own_vmhwm_mib']:.1f} MiB"
                print(f"  {kind:<17} {name:<6} rows {row['rows']:>7}  peak RSS {row['peak_rss_mib']:8.1f} MiB  "
                      f"{row['wall_s']:6.1f}s{extra}", flush=True)
    print(f"\nparent peak RSS {results['parent_ru_maxrss_mib']:.1f} MiB (a child's ru_maxrss starts there); "
          f"python + attnprobe.data alone {results['baseline_python_import_mib']:.1f} MiB")
    print(f"{'job':<18}{'small MiB':>10}{'big MiB':>10}{'big/small':>11}")
    results["ratios"] = {}
    for kind in args.kinds:
        small = next(r for r in results["runs"] if r["kind"] == kind and r["corpus"] == "small")
        big = next(r for r in results["runs"] if r["kind"] == kind and r["corpus"] == "big")
        ratio = big["peak_rss_mib"] / small["peak_rss_mib"]
        results["ratios"][kind] = ratio
        print(f"{kind:<18}{small['peak_rss_mib']:>10.1f}{big['peak_rss_mib']:>10.1f}{ratio:>11.3f}"
              f"   (rows {small['rows']} vs {big['rows']})")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
