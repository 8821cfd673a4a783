"""Pretrain small BERTs with and without SAOBP, then fine-tune them: the study of docs/benchmarks.md.

One command per budget:

    python bench/pretrain_study.py --budget cpu     # fits the shared 2-core machine (~40 minutes, 2 jobs)
    python bench/pretrain_study.py --budget gpu     # the same study at BERT-Mini / BERT-Small scale, on CUDA

For every seed it pretrains (``attnprobe refine --task masked-lm --init ...``) a "mini" model as baseline,
bp-low and bp-high, and a baseline model "one size up", all with the same seed, data order, masks and
steps, on the pretraining corpus (train.txt, perplexity on valid.txt). Each pretrained model is then
fine-tuned on SST-2 and RTE (``attnprobe refine RUN/model``: the variant is inherited from the
checkpoint). Every run appends one JSON line to ``--results``; ``--summarize`` prints the tables of
docs/benchmarks.md from that file. The data are read from ``--data`` (never copied into the project).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS = ("baseline", "bp-low", "bp-high")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent

BUDGETS = {
    "cpu": dict(  # sized for 2 shared cores: about 20 CPU-minutes in all (docs/benchmarks.md)
        vocab=4096, sizes={"mini": "L4-H128", "up": "L4-H192"}, max_length=64, batch=8, steps=250, eval_every=50,
        lr=1e-3, train_docs=3000, eval_docs=100, warmup=0.06, device="cpu", dtype="float32", seeds=[0, 1],
        finetune=dict(train=600, eval=200, epochs=1, lr=3e-4, batch=16, max_length=64), jobs=2, threads=1,
        finetune_variants=("baseline", "bp-high"),  # bp-low is pretrained only: the CPU time did not stretch
    ),
    "gpu": dict(
        vocab=None, sizes={"mini": "mini", "up": "small"}, max_length=128, batch=128, steps=20000, eval_every=1000,
        lr=5e-4, train_docs=None, eval_docs=None, warmup=0.06, device="cuda", dtype="bfloat16", seeds=[0, 1, 2],
        finetune=dict(train=None, eval=None, epochs=3, lr=1e-4, batch=32, max_length=128), jobs=1, threads=8,
        finetune_variants=VARIANTS,
    ),
}


def train_tokenizer(corpus: Path, vocab: int, folder: Path) -> Path:
    """A lower-cased WordPiece tokenizer of ``vocab`` entries learnt from the corpus (BERT's special tokens)."""
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train([str(corpus)], vocab_size=vocab, min_frequency=2,
                    special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    folder.mkdir(parents=True, exist_ok=True)
    wordpiece.save_model(str(folder))
    BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))
    return folder


def _finished(run: Path, args: list[str]) -> bool:
    """A complete run in ``run`` (so a stopped study continues where it was; use a fresh --out for other settings)."""
    try:
        meta = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("complete"))


def _refine(args: list[str], threads: int, log: Path, run: Path) -> dict:
    if _finished(run, args):
        return {"command": "refine " + " ".join(args), "wall_s": None, "reused": True}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "attnprobe", "refine", *args, "--json", "--overwrite", "--no-checkpoints"]
    started = time.time()
    with open(log, "w") as err:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}); see {log}")
    return {"command": " ".join(cmd[2:]), "wall_s": round(time.time() - started, 1)}


def _layer_rows(run: Path, stage_filter=None) -> list[dict]:
    import pandas as pd

    diag = pd.read_parquet(run / "diagnostics.parquet")
    cols = ["direct_entropy_norm", "indirect_entropy_norm", "gtd", "bp_shift", "sink_mass", "collapsed"]
    means = diag.groupby(["step", "layer"])[cols].mean().reset_index()
    return means.astype(object).where(means.notna(), None).to_dict(orient="records")


def _record(results: Path, row: dict) -> None:
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=float) + "\n")


def lineage(b: dict, size: str, variant: str, seed: int, paths: dict, out: Path, results: Path) -> None:
    """Pretrain one model, then fine-tune it on SST-2 and RTE; one JSON line per run."""
    name = f"{size}-{variant}-s{seed}"
    pre = out / name
    ft = b["finetune"]
    common = ["--device", b["device"], "--dtype", b["dtype"], "--seed", str(seed)]
    pre_args = [paths["family"], "--task", "masked-lm", "--init", b["sizes"][size], "--train", str(paths["train"]),
                "--eval", str(paths["valid"]), "--variant", variant, "--out", str(pre),
                "--max-length", str(b["max_length"]), "--batch-size", str(b["batch"]), "--max-steps", str(b["steps"]),
                "--eval-every", str(b["eval_every"]), "--lr", str(b["lr"]), "--warmup-ratio", str(b["warmup"]), *common]
    if paths.get("tokenizer"):
        pre_args += ["--tokenizer", str(paths["tokenizer"])]
    if b["eval_docs"]:
        pre_args += ["--max-eval-samples", str(b["eval_docs"])]
    if b["train_docs"]:
        pre_args += ["--max-train-samples", str(b["train_docs"])]
    info = _refine(pre_args, b["threads"], out / f"{name}.log", pre)
    meta = json.loads((pre / "run.json").read_text())
    _record(results, {"stage": "pretrain", "budget": paths["budget"], "size": size, "shape": b["sizes"][size],
                      "variant": variant, "seed": seed, "run": str(pre), **info, "perplexity": meta["final"]["perplexity"],
                      "eval_loss": meta["final"]["eval_loss"], "steps": meta["steps"], "init": meta["init"],
                      "step_time_s": meta["step_time_s"], "history": _history(pre), "layers": _layer_rows(pre)})
    if variant not in b["finetune_variants"]:
        return
    for task, train, dev in (("sst2", paths["sst2_train"], paths["sst2_dev"]), ("rte", paths["rte_train"], paths["rte_dev"])):
        run = out / f"{name}-{task}"
        args = [str(pre / "model"), "--train", str(train), "--eval", str(dev), "--out", str(run),
                "--epochs", str(ft["epochs"]), "--lr", str(ft["lr"]), "--batch-size", str(ft["batch"]),
                "--max-length", str(ft["max_length"]), *common]
        if ft["train"]:
            args += ["--max-train-samples", str(ft["train"])]
        if ft["eval"]:
            args += ["--max-eval-samples", str(ft["eval"])]
        info = _refine(args, b["threads"], out / f"{name}-{task}.log", run)
        meta = json.loads((run / "run.json").read_text())
        _record(results, {"stage": task, "budget": paths["budget"], "size": size, "shape": b["sizes"][size],
                          "variant": meta["variant"], "seed": seed, "run": str(run), **info, **meta["final"],
                          "parent": meta["parent"]["run"] if meta.get("parent") else None,
                          "step_time_s": meta["step_time_s"], "layers": _layer_rows(run)})


def _history(run: Path) -> list[dict]:
    import pandas as pd

    return pd.read_parquet(run / "history.parquet").to_dict(orient="records")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                    help="folder holding pretrain/ and glue/ (default: ../shared/data)")
    ap.add_argument("--out", type=Path, default=None, help="run folders (default: bench/results/pretrain-BUDGET)")
    ap.add_argument("--results", type=Path, default=None, help="JSON lines file (default: OUT/results.jsonl)")
    ap.add_argument("--family", default="minilm-l6", help="MODEL whose family (and tokenizer on the GPU budget) is used")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--jobs", type=int, default=None, help="lineages run at once")
    ap.add_argument("--sizes", nargs="+", default=["up", "mini"], help="which sizes to run (default: both)")
    ap.add_argument("--summarize", action="store_true", help="only print the tables from --results")
    args = ap.parse_args()
    b = dict(BUDGETS[args.budget])
    out = args.out or HERE / "results" / f"pretrain-{args.budget}"
    results = args.results or out / "results.jsonl"
    if args.summarize:
        from pretrain_summary import summarize

        summarize(results)
        return
    out.mkdir(parents=True, exist_ok=True)
    data = args.data
    paths = {"budget": args.budget, "family": args.family, "train": data / "pretrain" / "train.txt",
             "valid": data / "pretrain" / "valid.txt", "sst2_train": data / "glue" / "SST-2" / "train.tsv",
             "sst2_dev": data / "glue" / "SST-2" / "dev.tsv", "rte_train": data / "glue" / "RTE" / "train.tsv",
             "rte_dev": data / "glue" / "RTE" / "dev.tsv"}
    missing = [str(p) for k, p in paths.items() if isinstance(p, Path) and not p.is_file()]
    if missing:
        sys.exit(f"missing data files: {', '.join(missing)}; pass --data DIR holding pretrain/ and glue/")
    if b["vocab"]:
        paths["tokenizer"] = train_tokenizer(paths["train"], b["vocab"], out / f"wordpiece-{b['vocab']}")
    seeds = args.seeds or b["seeds"]
    # the expensive lineage (one size up) first, so two jobs finish together
    plan = [("up", "baseline", s) for s in seeds] + [("mini", v, s) for s in seeds for v in VARIANTS]
    plan = [p for p in plan if p[0] in args.sizes]
    print(f"{len(plan)} lineages ({args.budget} budget), results -> {results}", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs or b["jobs"]) as pool:
        futures = {pool.submit(lineage, b, size, v, s, paths, out, results): (size, v, s) for size, v, s in plan}
        for future, key in futures.items():
            try:
                future.result()
                print(f"done {key} {time.strftime('%H:%M:%S')}", flush=True)
            except Exception as exc:  # one failed lineage must not stop the others
                print(f"FAILED {key}: {exc}", flush=True)


if __name__ == "__main__":
    main()
