"""Replication grid: do SAOBP variants help small models on SST-2 and RTE (and HellaSwag, SQuAD), and do they keep
deep layers diverse?

One ``attnprobe.training.refine.refine(RefineConfig(...))`` per configuration (task x layers x variant x seed) on the
bundled MiniLM (``minilm-l6``, truncated with ``num_layers``), trained on GLUE train files and evaluated
on the official dev sets. Each finished run appends one JSON line to ``--results`` (accuracy, F1, MCC,
per-layer diagnostics before training and after the last epoch, wall time), so partial progress survives
and ``--resume-results`` skips what is already there. Run folders go under ``--runs-dir`` (default in
/tmp); their ``model/`` is deleted after each run and no ``checkpoints/`` are saved, unless ``--keep-runs``.

Within a seed every variant and size sees the same training subsample and the same classifier-head
initialisation (both come from the seed), so the variants are compared on paired runs.

    OMP_NUM_THREADS=2 nohup python bench/replicate.py --results bench/results/replicate.jsonl \\
        --resume-results > /tmp/replicate.log 2>&1 &
    python bench/replicate.py --summarize bench/results/replicate.jsonl

The method's other tasks run with ``--tasks hellaswag squad`` (multiple choice, accuracy; extractive question
answering, SQuAD exact match and F1) on the files in /work/shared/data/hellaswag and /work/shared/data/squad
(``--shared-data``); their rows carry ``score`` (accuracy, or F1 for SQuAD) besides the task's own scores, and
``--summarize`` prints a table of their own for them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

GLUE = Path("/work/shared/data/glue")
TASKS = {
    # name: (train file, eval file, default max_length)
    "sst2": ("SST-2/train.tsv", "SST-2/dev.tsv", 64),
    "rte": ("RTE/train.tsv", "RTE/dev.tsv", 128),
}
VARIANTS = ("baseline", "bp-low", "bp-high")
SHARED = Path("/work/shared/data")
OTHER_TASKS = {
    # name: (refine --task, train file, eval file, the score the summary compares)
    "hellaswag": ("multiple-choice", "hellaswag/train.jsonl", "hellaswag/dev.jsonl", "accuracy"),
    "squad": ("question-answering", "squad/train.jsonl", "squad/dev.jsonl", "f1"),
}


def key_of(row: dict) -> tuple:
    return (row["task"], int(row["layers"]), row["variant"], int(row["seed"]))


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by a killed run
                continue
    return rows


def layer_profile(diagnostics, epoch: float) -> dict[str, list]:
    """Per layer (0..L-1): head means of normalized direct entropy, GTD and bp_shift; collapsed heads."""
    rows = diagnostics[diagnostics["epoch"] == epoch]
    g = rows.groupby("layer", sort=True)
    out = {
        "direct_entropy_norm": [float(x) for x in g["direct_entropy_norm"].mean()],
        "indirect_entropy_norm": [float(x) for x in g["indirect_entropy_norm"].mean()],
        "gtd": [float(x) for x in g["gtd"].mean()],
        "bp_shift": [None if math.isnan(x) else float(x) for x in g["bp_shift"].mean()],
    }
    if "collapsed" in rows.columns:
        out["collapsed_heads"] = [int(x) for x in g["collapsed"].sum()]
    return out


def run_other(task: str, layers: int, variant: str, seed: int, args) -> dict:
    """One HellaSwag or SQuAD run: the task's scores, the paired score, the last layers' diagnostics."""
    from attnprobe.config import RefineConfig
    from attnprobe.training.refine import refine

    kind, train, dev, score = OTHER_TASKS[task]
    out = Path(args.runs_dir) / f"{task}-L{layers}-{variant}-s{seed}"
    cfg = RefineConfig(
        model=args.model, train=str(args.shared_data / train), eval=str(args.shared_data / dev), out=str(out),
        task=kind, variant=variant, num_layers=layers, epochs=args.other_epochs, lr=args.other_lr,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        max_length=args.hellaswag_max_length if task == "hellaswag" else args.squad_max_length,
        doc_stride=args.squad_doc_stride, seed=seed, device="cpu", overwrite=True, checkpoints=args.keep_runs,
        max_train_samples=(args.hellaswag_train_samples if task == "hellaswag" else args.squad_train_samples) or None,
        max_eval_samples=(args.hellaswag_eval_samples if task == "hellaswag" else args.squad_eval_samples) or None,
        patterns=0)
    t0 = time.time()
    result = refine(cfg)
    wall = time.time() - t0
    diag = result.diagnostics
    epochs_seen = sorted(float(e) for e in diag["epoch"].unique())
    before, after = layer_profile(diag, epochs_seen[0]), layer_profile(diag, epochs_seen[-1])
    final, hist = result.meta["final"], result.history
    row = {
        "task": task, "layers": layers, "variant": variant, "seed": seed, "score": final[score],
        **{k: v for k, v in final.items()}, "score_epoch0": float(hist.iloc[0][score]),
        "last_direct_entropy_norm": after["direct_entropy_norm"][-1], "last_gtd": after["gtd"][-1],
        "last_direct_entropy_norm_epoch0": before["direct_entropy_norm"][-1],
        "last_gtd_epoch0": before["gtd"][-1], "profile_epoch0": before, "profile_final": after,
        "train": result.meta["data"]["train"], "eval": result.meta["data"]["eval"],
        "max_length": result.meta["data"]["max_length"], "epochs": args.other_epochs, "lr": args.other_lr,
        "batch_size": args.batch_size, "steps": result.meta["steps"], "wall_time_s": round(wall, 2),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None, "run_dir": str(out),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if not args.keep_runs:
        for sub in ("model", "checkpoints"):
            shutil.rmtree(out / sub, ignore_errors=True)
    return row


def run_one(task: str, layers: int, variant: str, seed: int, args) -> dict:
    from attnprobe.config import RefineConfig
    from attnprobe.training.refine import refine

    if task in OTHER_TASKS:
        return run_other(task, layers, variant, seed, args)

    train, dev, default_len = TASKS[task]
    max_length = args.sst2_max_length if task == "sst2" else args.rte_max_length
    max_train = args.sst2_train_samples if task == "sst2" else args.rte_train_samples
    epochs = args.sst2_epochs if task == "sst2" else args.rte_epochs
    out = Path(args.runs_dir) / f"{task}-L{layers}-{variant}-s{seed}"
    cfg = RefineConfig(
        model=args.model, train=str(args.glue / train), eval=str(args.glue / dev), out=str(out),
        variant=variant, num_layers=layers, epochs=epochs, lr=args.lr, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, max_length=max_length or default_len, seed=seed,
        max_train_samples=max_train, device="cpu", overwrite=True, group_by_length=args.group_by_length,
        checkpoints=args.keep_runs)  # saving optimizer state every epoch only costs time here
    t0 = time.time()
    result = refine(cfg)
    wall = time.time() - t0
    diag = result.diagnostics
    epochs_seen = sorted(float(e) for e in diag["epoch"].unique())
    first, last = epochs_seen[0], epochs_seen[-1]
    before, after = layer_profile(diag, first), layer_profile(diag, last)
    final = result.meta["final"]
    hist = result.history
    row = {
        "task": task, "layers": layers, "variant": variant, "seed": seed,
        "accuracy": final["accuracy"], "f1": final["f1"], "mcc": final["mcc"], "eval_loss": final["eval_loss"],
        "accuracy_epoch0": float(hist.iloc[0]["accuracy"]),
        "accuracy_by_epoch": [float(x) for x in hist["accuracy"]],
        "last_direct_entropy_norm": after["direct_entropy_norm"][-1],
        "last_gtd": after["gtd"][-1],
        "last_direct_entropy_norm_epoch0": before["direct_entropy_norm"][-1],
        "last_gtd_epoch0": before["gtd"][-1],
        "final_epoch": last,
        "profile_epoch0": before, "profile_final": after,
        "train_rows": result.meta["data"]["train"].get("rows_used"),
        "eval_rows": result.meta["data"]["eval"].get("rows_used"),
        "max_length": result.meta["data"]["max_length"], "epochs": epochs, "lr": args.lr,
        "batch_size": args.batch_size, "steps": result.meta["steps"],
        "group_by_length": args.group_by_length,
        "wall_time_s": round(wall, 2), "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "load_average_end": os.getloadavg()[0], "run_dir": str(out),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if not args.keep_runs:
        for sub in ("model", "checkpoints"):
            shutil.rmtree(out / sub, ignore_errors=True)
    return row


def grid(args) -> list[tuple]:
    # seeds outermost: if the budget runs out, the finished seeds are complete grids
    return [(t, n, v, s) for s in args.seeds for t in args.tasks for n in args.layers for v in args.variants]


def run_grid(args) -> int:
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {key_of(r) for r in read_results(results)} if args.resume_results else set()
    todo = [c for c in grid(args) if c not in done]
    print(f"{len(todo)} runs to do ({len(done)} already in {results})", flush=True)
    started = time.time()
    for i, (task, layers, variant, seed) in enumerate(todo, 1):
        row = run_one(task, layers, variant, seed, args)
        with results.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        scores = (f"acc {row['accuracy']:.4f} mcc {row['mcc']:.3f}" if task in TASKS else
                  " ".join(f"{k} {v:.4f}" for k, v in row.items() if k in ("accuracy", "exact_match", "f1")))
        print(f"[{i}/{len(todo)}] {task} L{layers} {variant} seed {seed}: {scores} "
              f"last-layer H {row['last_direct_entropy_norm']:.3f} "
              f"gtd {row['last_gtd']:.3f} ({row['wall_time_s']:.0f} s, total {time.time() - started:.0f} s)",
              flush=True)
    print(f"done in {time.time() - started:.0f} s", flush=True)
    return 0


# ---- summary -------------------------------------------------------------------------------------


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else math.nan


def _std(xs):
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


def _paired(values: list[float]) -> str:
    """``mean ± std`` of paired differences (in the score's unit), with the paired t where it is defined."""
    if len(values) > 1 and _std(values) > 0:
        return f"{_mean(values):+.2f} ± {_std(values):.2f} (t = {_mean(values) / (_std(values) / math.sqrt(len(values))):.1f})"
    return f"{_mean(values):+.2f}"


def summarize_other(rows: list[dict]) -> str:
    """The HellaSwag / SQuAD table: scores in %, paired differences to the baseline of the same size and seed."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], int(r["layers"]), r["variant"]), []).append(r)
    order = {v: i for i, v in enumerate(VARIANTS)}
    lines = ["| task | layers | variant | seeds | score (mean ± std) | Δ score vs baseline (paired) | exact match "
             "| Δ EM | last-layer H_dir norm: epoch 0 → final | Δ H | last-layer GTD: epoch 0 → final | Δ GTD "
             "| wall s/run |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(cells, key=lambda k: (k[0], k[1], order.get(k[2], 9))):
        rs = cells[k]
        scale = 100.0 if k[0] == "hellaswag" else 1.0  # accuracy is a fraction, SQuAD scores are percentages
        bseed = {r["seed"]: r for r in cells.get((k[0], k[1], "baseline"), [])}
        pairs = [(r, bseed[r["seed"]]) for r in rs if r["seed"] in bseed and k[2] != "baseline"]
        em = [r.get("exact_match") for r in rs]

        def diff(key, factor=1.0):
            return _paired([factor * (a[key] - b[key]) for a, b in pairs]) if pairs else "—"

        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {len(rs)} | {scale * _mean([r['score'] for r in rs]):.2f} ± "
            f"{scale * _std([r['score'] for r in rs]):.2f} | {diff('score', scale)} "
            f"| {f'{_mean(em):.2f}' if k[0] == 'squad' else '—'} | {diff('exact_match') if k[0] == 'squad' else '—'} "
            f"| {_mean([r['last_direct_entropy_norm_epoch0'] for r in rs]):.3f} → "
            f"{_mean([r['last_direct_entropy_norm'] for r in rs]):.3f} | {diff('last_direct_entropy_norm')} "
            f"| {_mean([r['last_gtd_epoch0'] for r in rs]):.3f} → {_mean([r['last_gtd'] for r in rs]):.3f} "
            f"| {diff('last_gtd')} | {_mean([r['wall_time_s'] for r in rs]):.0f} |")
    lines.append("")
    lines.append("Score: HellaSwag accuracy, SQuAD F1 (both %). Δ = paired difference to the baseline of the same "
                 "task, size and seed, mean ± std over seeds, with the paired t (df = seeds - 1).")
    return "\n".join(lines)


def summarize(path: Path, markdown: bool = True) -> str:
    rows = read_results(path)
    other = [r for r in rows if r["task"] in OTHER_TASKS]
    rows = [r for r in rows if r["task"] not in OTHER_TASKS]
    if not rows:
        return summarize_other(other)
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], int(r["layers"]), r["variant"]), []).append(r)
    order_task = {t: i for i, t in enumerate(TASKS)}
    order_var = {v: i for i, v in enumerate(VARIANTS)}
    keys = sorted(cells, key=lambda k: (order_task.get(k[0], 9), k[1], order_var.get(k[2], 9)))
    lines = [("| task | layers | variant | seeds | accuracy (mean ± std) | Δ acc vs baseline | MCC (mean) "
              "| Δ MCC | last-layer H_dir norm: epoch 0 → final | Δ H vs baseline | last-layer GTD: epoch 0 → final "
              "| Δ GTD vs baseline | min-layer H_dir norm (final) | collapsed heads (final, all layers) | wall s/run |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        rs = cells[k]
        base = cells.get((k[0], k[1], "baseline"), [])
        acc, mcc = [r["accuracy"] for r in rs], [r["mcc"] for r in rs]
        h, g = [r["last_direct_entropy_norm"] for r in rs], [r["last_gtd"] for r in rs]
        h0, g0 = [r["last_direct_entropy_norm_epoch0"] for r in rs], [r["last_gtd_epoch0"] for r in rs]
        hmin = [min(r["profile_final"]["direct_entropy_norm"]) for r in rs]
        coll = [sum(r["profile_final"].get("collapsed_heads") or [0]) for r in rs]
        if k[2] == "baseline" or not base:
            d_acc = d_mcc = d_h = d_g = "—"
        else:
            # paired by seed where both exist
            bseed = {r["seed"]: r for r in base}
            pairs = [(r, bseed[r["seed"]]) for r in rs if r["seed"] in bseed]
            da = [a["accuracy"] - b["accuracy"] for a, b in pairs]
            if len(da) > 1 and _std(da) > 0:
                t = _mean(da) / (_std(da) / math.sqrt(len(da)))
                d_acc = f"{100 * _mean(da):+.2f} ± {100 * _std(da):.2f} (t = {t:.1f})"
            else:
                d_acc = f"{100 * _mean(da):+.2f}"
            d_mcc = f"{_mean([a['mcc'] - b['mcc'] for a, b in pairs]):+.3f}"
            d_h = f"{_mean([a['last_direct_entropy_norm'] - b['last_direct_entropy_norm'] for a, b in pairs]):+.3f}"
            d_g = f"{_mean([a['last_gtd'] - b['last_gtd'] for a, b in pairs]):+.3f}"
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {len(rs)} | {100 * _mean(acc):.2f} ± {100 * _std(acc):.2f} | {d_acc} "
            f"| {_mean(mcc):.3f} | {d_mcc} | {_mean(h0):.3f} → {_mean(h):.3f} | {d_h} "
            f"| {_mean(g0):.3f} → {_mean(g):.3f} | {d_g} | {_mean(hmin):.3f} | {_mean(coll):.1f} "
            f"| {_mean([r['wall_time_s'] for r in rs]):.0f} |")
    total = sum(r["wall_time_s"] for r in rows)
    lines.append("")
    lines.append(f"{len(rows)} runs, {total / 60:.1f} min of run time in total. Accuracy in %; Δ = paired "
                 "difference to the baseline of the same task, size and seed (mean ± std over seeds); t = paired "
                 "t statistic (|t| > 4.30 is significant at the two-sided 5% level with 3 seeds, df = 2). "
                 "Collapsed heads: the `collapsed` flag (normalized direct entropy < 0.15 or GTD < 0.05), "
                 "summed over layers, mean over seeds, out of 12 heads per layer.")
    # per-layer profile (final epoch), mean over seeds
    lines.append("")
    lines.append("Per-layer normalized direct entropy / GTD after training (mean over seeds and heads):")
    lines.append("")
    lines.append("| task | layers | variant | H_dir norm per layer (0 → last) | GTD per layer (0 → last) |")
    lines.append("|---|---|---|---|---|")
    for k in keys:
        rs = cells[k]
        n = k[1]
        hs = [_mean([r["profile_final"]["direct_entropy_norm"][i] for r in rs]) for i in range(n)]
        gs = [_mean([r["profile_final"]["gtd"][i] for r in rs]) for i in range(n)]
        lines.append(f"| {k[0]} | {n} | {k[2]} | {' '.join(f'{x:.3f}' for x in hs)} "
                     f"| {' '.join(f'{x:.3f}' for x in gs)} |")
    if other:
        lines += ["", summarize_other(other)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summarize", metavar="FILE", default=None, help="print the summary table of a results file")
    p.add_argument("--results", default="bench/results/replicate.jsonl", help="JSON-lines file, one row per run")
    p.add_argument("--resume-results", action="store_true", help="skip configurations already in --results")
    p.add_argument("--runs-dir", default="/tmp/attnprobe-replicate", help="where run folders go")
    p.add_argument("--keep-runs", action="store_true", help="keep model/ and checkpoints/ of each run")
    p.add_argument("--glue", type=Path, default=GLUE, help="folder with SST-2/ and RTE/")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=[*TASKS, *OTHER_TASKS])
    p.add_argument("--shared-data", type=Path, default=SHARED, help="folder with hellaswag/ and squad/")
    p.add_argument("--other-epochs", type=float, default=1.0, help="epochs of the hellaswag and squad runs")
    p.add_argument("--other-lr", type=float, default=2e-4, help="learning rate of the hellaswag and squad runs")
    p.add_argument("--hellaswag-train-samples", type=int, default=240, help="seeded subsample (0: all 7,066)")
    p.add_argument("--hellaswag-eval-samples", type=int, default=160, help="seeded subsample (0: all 1,970)")
    p.add_argument("--hellaswag-max-length", type=int, default=40)
    p.add_argument("--squad-train-samples", type=int, default=120, help="seeded subsample (0: all 705)")
    p.add_argument("--squad-eval-samples", type=int, default=100, help="seeded subsample (0: all 225)")
    p.add_argument("--squad-max-length", type=int, default=128)
    p.add_argument("--squad-doc-stride", type=int, default=32)
    p.add_argument("--layers", nargs="+", type=int, default=[2, 4, 6])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--sst2-train-samples", type=int, default=2000,
                   help="seeded subsample of SST-2/train.tsv (0: all 60,614 rows)")
    p.add_argument("--rte-train-samples", type=int, default=0, help="seeded subsample of RTE train (0: all 2,490)")
    p.add_argument("--sst2-epochs", type=float, default=1.0)
    p.add_argument("--rte-epochs", type=float, default=1.0)
    p.add_argument("--sst2-max-length", type=int, default=64)
    p.add_argument("--rte-max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--group-by-length", action="store_true",
                   help="length-grouped training batches (another batch order: use a separate --results file)")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return 0
    args.sst2_train_samples = args.sst2_train_samples or None
    args.rte_train_samples = args.rte_train_samples or None
    return run_grid(args)


if __name__ == "__main__":
    sys.exit(main())
