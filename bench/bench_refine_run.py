"""Whole-run cost of refine's diagnostics: one pass over the eval set per evaluation against two.

Each run is a fresh process running ``python -m attnprobe refine ...`` with the given options, in one of two
modes, alternated run by run (order rotating every repeat):

    one-pass   the diagnostics come from the Trainer's own evaluation forward passes (the default)
    two-pass   the same refine with those passes not probed, so each evaluation is followed by a separate
               scan of the eval set (``scanner.run_batches``), as refine did before

The two-pass mode is set in the child by replacing ``attnprobe.capture.evalprobe.supported`` with a function that
says no; nothing else differs. Reported: wall seconds of each run (the child process), the median per mode,
the one-pass / two-pass ratio of the medians and the median of the per-repeat ratios with their range,
and whether the diagnostics of the two modes agree (max abs difference). This script measures; it changes
nothing in the package.

    OMP_NUM_THREADS=1 python bench/bench_refine_run.py --repeats 2 -- minilm-l6 --num-layers 2 \\
        --train ../shared/data/glue/SST-2/train.tsv --eval ../shared/data/glue/SST-2/dev.tsv \\
        --max-train-samples 2000 --epochs 1 --device cpu --no-checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("one-pass", "two-pass")

CHILD = """
import sys
mode = sys.argv.pop(1)
if mode == "two-pass":
    from attnprobe.capture import evalprobe
    evalprobe.supported = lambda loaded, args: False
from attnprobe.cli import main
sys.argv = ["attnprobe", *sys.argv[1:]]
main()
"""


def run_once(mode: str, refine_args: list[str], out: Path) -> float:
    cmd = [sys.executable, "-c", CHILD, mode, "refine", *refine_args, "--out", str(out), "--overwrite", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    p.add_argument("refine_args", nargs=argparse.REMAINDER, help="after --: MODEL and refine options")
    args = p.parse_args(argv)
    refine_args = [a for a in args.refine_args if a != "--"]
    import pandas as pd

    walls = {m: [] for m in MODES}
    meta = {}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                out = Path(tmp) / mode
                wall = run_once(mode, refine_args, out)
                walls[mode].append(wall)
                run = json.loads((out / "run.json").read_text())
                meta[mode] = {"diagnostics_from": run["diagnostics_from"], "wall_time_s": run["wall_time_s"],
                              "steps": run["steps"], "eval_rows": run["data"]["eval"]["rows_used"],
                              "epochs": run["epochs"]}
                print(f"repeat {r} {mode}: {wall:.1f} s (run.json wall_time_s {run['wall_time_s']:.1f}, "
                      f"diagnostics from {run['diagnostics_from']})", flush=True)
            frames = {m: pd.read_parquet(Path(tmp) / m / "diagnostics.parquet") for m in MODES}
        num = [c for c in frames["one-pass"].select_dtypes("number").columns if c not in ("epoch", "step")]
        diff = float((frames["one-pass"][num] - frames["two-pass"][num]).abs().max().max())
    median = {m: statistics.median(ws) for m, ws in walls.items()}
    per_repeat = [a / b for a, b in zip(walls["one-pass"], walls["two-pass"])]
    print(f"one-pass {median['one-pass']:.1f} s, two-pass {median['two-pass']:.1f} s (medians); one-pass / two-pass "
          f"= {median['one-pass'] / median['two-pass']:.3f} (medians), per repeat {statistics.median(per_repeat):.3f} "
          f"({min(per_repeat):.3f}-{max(per_repeat):.3f}); diagnostics max abs difference {diff:.2e}", flush=True)
    if args.json_out:
        out = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
               "threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
               "load_average_start": load_start, "wall_s": walls, "median_s": median,
               "ratio_of_medians": median["one-pass"] / median["two-pass"], "ratio_per_repeat": per_repeat,
               "diagnostics_max_abs_difference": diff, "runs": meta}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0  # a measurement, not a test


if __name__ == "__main__":
    sys.exit(main())
