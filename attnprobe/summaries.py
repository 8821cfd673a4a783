"""The closing summary of a refine: a JSON-ready dict (``--json``) and the rich table printed after it.

Both are read from a ``refine.RefineResult``: accuracy before and after, and per-layer head means of the
diagnostics at epoch 0 and at the last epoch.
"""

from __future__ import annotations

import math
from typing import Any

SUMMARY_COLUMNS = ("direct_entropy_norm", "indirect_entropy_norm", "gtd", "bp_shift")


def _layer_profile(diagnostics, epoch: float) -> dict[int, dict[str, float | None]]:
    rows = diagnostics[diagnostics["epoch"] == epoch]
    means = rows.groupby("layer", sort=True)[list(SUMMARY_COLUMNS)].mean()
    return {int(layer): {c: (None if math.isnan(v) else float(v)) for c, v in r.items()}
            for layer, r in means.iterrows()}


def summary(result) -> dict[str, Any]:
    """A JSON-ready summary: accuracy and per-layer entropy/GTD/bp_shift before training and at the end."""
    history, diag = result.history, result.diagnostics
    epochs = sorted(diag["epoch"].unique()) if len(diag) else []
    first, last = (epochs[0], epochs[-1]) if epochs else (None, None)
    before = _layer_profile(diag, first) if epochs else {}
    after = _layer_profile(diag, last) if epochs else {}
    first_eval = history.iloc[0] if len(history) else None
    return {
        "out_dir": str(result.out_dir),
        "model": result.meta["model"]["name"],
        "variant": result.meta["variant"],
        "saobp": result.meta["saobp"],
        "epochs": result.meta["epochs"],
        "task": result.meta.get("task", "sequence-classification"),
        "accuracy": {"before": None if first_eval is None else float(first_eval.get("accuracy", math.nan)),
                     "after": result.meta["final"].get("accuracy")},
        "perplexity": {"before": None if first_eval is None else float(first_eval.get("perplexity", math.nan)),
                       "after": result.meta["final"].get("perplexity")},
        "init": result.meta.get("init"),
        "parameters": result.meta.get("parameters"),
        "steps": result.meta.get("steps"),
        "final": result.meta["final"],
        "layers": [{"layer": layer, "before": before.get(layer), "after": after.get(layer)}
                   for layer in sorted(set(before) | set(after))],
        "wall_time_s": result.meta.get("wall_time_s"),
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def print_summary(result, console) -> None:
    """Print the summary as a rich Table (per layer, before -> after) and the accuracy line (main process only)."""
    from rich.table import Table

    if not result.is_main:
        return

    s = summary(result)
    table = Table(title=f"attnprobe refine: {s['model']} ({s['variant']})")
    for col in ("layer", "direct H norm", "indirect H norm", "GTD", "bp_shift"):
        table.add_column(col, justify="right")
    for row in s["layers"]:
        b, a = row["before"] or {}, row["after"] or {}
        cells = [f"{_fmt(b.get(c))} -> {_fmt(a.get(c))}" for c in SUMMARY_COLUMNS]
        table.add_row(str(row["layer"]), *cells)
    console.print(table)
    final = s["final"]
    if s["task"] == "masked-lm":
        console.print(f"perplexity {_fmt(s['perplexity']['before'])} -> {_fmt(final['perplexity'])}, "
                      f"eval loss {_fmt(final['eval_loss'])} (masked-LM, nats per predicted token)")
    else:
        console.print(f"accuracy {_fmt(s['accuracy']['before'])} -> {_fmt(final['accuracy'])}, "
                      f"F1 {_fmt(final['f1'])}, MCC {_fmt(final['mcc'])}, eval loss {_fmt(final['eval_loss'])}")
    console.print(f"wrote {s['out_dir']}/ (model/, history.parquet, diagnostics.parquet, run.json)")
