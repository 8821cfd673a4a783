"""The closing summaries of scan and refine: a JSON-ready dict (``--json``) and what is printed instead.

A scan's are read from a ``scanner.ScanResult`` (per-layer means, the flagged heads with their reasons); a
refine's from a ``refine.RefineResult``: accuracy before and after, and per-layer head means of the
diagnostics at epoch 0 and at the last epoch. cli.py prints them; nothing here reads or writes files.
"""

from __future__ import annotations

import math
from typing import Any

SUMMARY_COLUMNS = ("direct_entropy_norm", "indirect_entropy_norm", "gtd", "bp_shift")
SE_NAMES = ("gtd_se", "indirect_entropy_se", "indirect_entropy_norm_se")


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
    elif s["task"] == "question-answering":
        first = result.history.iloc[0] if len(result.history) else {}
        console.print(f"exact match {_fmt(first.get('exact_match'))} -> {_fmt(final['exact_match'])}, "
                      f"F1 {_fmt(first.get('f1'))} -> {_fmt(final['f1'])} (SQuAD, %), eval loss {_fmt(final['eval_loss'])}")
    elif s["task"] == "multiple-choice":
        console.print(f"accuracy {_fmt(s['accuracy']['before'])} -> {_fmt(final['accuracy'])}, "
                      f"eval loss {_fmt(final['eval_loss'])}")
    else:
        console.print(f"accuracy {_fmt(s['accuracy']['before'])} -> {_fmt(final['accuracy'])}, "
                      f"F1 {_fmt(final['f1'])}, MCC {_fmt(final['mcc'])}, eval loss {_fmt(final['eval_loss'])}")
    kept = ", patterns.parquet" if result.meta.get("patterns") else ""
    kept += ", predictions.jsonl" if getattr(result, "predictions", None) is not None else ""
    console.print(f"wrote {s['out_dir']}/ (model/, history.parquet, diagnostics.parquet{kept}, run.json)")


def scan_summary(result, out_dir) -> dict[str, Any]:
    """The ``scan --json`` summary: per-layer means, the flagged heads (``flagged_heads``: flag names), timing."""
    layers = result.layers
    return {
        "out_dir": str(out_dir),
        "model": result.meta["model"]["name"],
        "layers": layers[["layer", "direct_entropy", "direct_entropy_norm", "indirect_entropy",
                          "indirect_entropy_norm", "gtd", "bp_shift", "heads", "flagged_heads",
                          *[c for c in SE_NAMES if c in layers]]]
        .astype(object).where(layers.notna(), None).to_dict(orient="records"),
        "sample_queries": result.meta.get("multi_hop", {}).get("sample_queries"),
        "flagged": [
            {"layer": int(r.layer), "head": int(r.head), "reasons": _reasons(r)}
            for r in result.heads.itertuples() if _reasons(r)
        ],
        "flagged_heads": [
            {"layer": int(r.layer), "head": int(r.head), "flags": [n for n in FLAG_NAMES if bool(getattr(r, n))]}
            for r in result.heads.itertuples() if any(bool(getattr(r, n)) for n in FLAG_NAMES)
        ],
        "sequences": result.meta["data"]["sequences_scanned"],
        "wall_time_s": result.meta["wall_time_s"],
    }


def print_scan_summary(result, out_dir, console) -> None:
    """The table printed after a scan, the flagged heads with their reasons, and the files written."""
    from rich.table import Table

    layers = result.layers
    meta = result.meta
    table = Table(title=f"attnprobe scan: {meta['model']['name']} ({meta['data']['sequences_scanned']} sequences)")
    for col in ("layer", "direct H (norm)", "indirect H (norm)", "GTD", "flagged heads"):
        table.add_column(col, justify="right")
    sampled = bool(meta.get("multi_hop", {}).get("sample_queries"))

    def pm(value, se) -> str:  # the standard error of a sampled scan, after its value
        return _fmt(value) + (f" ± {se:.3f}" if sampled and se == se else "")

    for r in layers.itertuples():
        table.add_row(str(r.layer), f"{_fmt(r.direct_entropy)} ({_fmt(r.direct_entropy_norm)})",
                      f"{pm(r.indirect_entropy, getattr(r, 'indirect_entropy_se', 0.0))} "
                      f"({_fmt(r.indirect_entropy_norm)})", pm(r.gtd, getattr(r, "gtd_se", 0.0)),
                      f"{int(r.flagged_heads)}/{int(r.heads)}")
    console.print(table)
    _print_flagged(result, console)
    files = "heads.parquet, layers.parquet" + (", examples.parquet" if meta["options"]["per_example"] else "")
    files += ", patterns.parquet" if result.patterns is not None else ""
    console.print(f"wrote {out_dir}/ ({files}, run.json)", markup=False)


FLAG_NAMES = ("entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse")
FLAGGED_LINES = 20  # flagged heads listed after the table; the rest are counted


def _print_flagged(result, console) -> None:
    """After the table: each flagged head with its reasons (values against thresholds), up to a screenful."""
    from attnprobe.report.datatypes import flag_reasons, run_thresholds

    flagged = [r for r in result.heads.to_dict("records") if any(bool(r.get(n)) for n in (*FLAG_NAMES, "nonfinite_flag"))]
    if not flagged:
        console.print("no head is flagged", markup=False)
        return
    thresholds = run_thresholds(result.meta)
    console.print(f"flagged heads ({len(flagged)} of {len(result.heads)}):", markup=False)
    for r in flagged[:FLAGGED_LINES]:
        console.print(f"  layer {int(r['layer'])} head {int(r['head'])}: {'; '.join(flag_reasons(r, thresholds))}",
                      markup=False, soft_wrap=True)
    if len(flagged) > FLAGGED_LINES:
        console.print(f"  ... and {len(flagged) - FLAGGED_LINES} more (heads.parquet, or `attnprobe report`)",
                      markup=False)


def _reasons(row) -> list[str]:
    names = ("entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse", "nonfinite_flag")
    return [n for n in names if bool(getattr(row, n))]
