"""``attnprobe report``: read finished run folders and write their PNG figures and one HTML page.

This module loads and checks run folders (scan or refine), derives the tables a report shows (layer
means, flagged heads and their reasons, the comparison of several runs) and writes every file through
a temporary name. It draws nothing itself (figures.py: which figures and how), builds no markup
(page.py) and never changes the files of a run folder.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from attnprobe.errors import AttnprobeError
from attnprobe.version import __version__
from attnprobe.runtime import outputs
from attnprobe.config import ReportConfig, Thresholds
from attnprobe.report.datatypes import (
    FLAGS, METRICS, REQUIRED_HEAD_COLUMNS, REQUIRED_HISTORY_COLUMNS, REQUIRED_LAYER_COLUMNS, ReportResult, Run, flag_reasons, run_thresholds)

if TYPE_CHECKING:
    import pandas as pd

HTML_NAME = "report.html"


def write_report(runs: Sequence[str | Path], out: str | Path | None = None, fmt: str = "both") -> ReportResult:
    """Write the report of one or more run folders: PNG figures and/or one self-contained HTML page.

    Args:
        runs: scan or refine run folders; empty means the newest finished run under ./attnprobe-runs/.
        out: the output folder; default RUN_DIR/report for one run, ./attnprobe-runs/compare-<stamp>/
            for several.
        fmt: ``"html"`` (the page only, figures embedded), ``"png"`` (the figures only) or ``"both"``.

    Every run is read and every figure rendered before the first file is written, so a bad run leaves
    nothing behind; each file appears under its name only when complete, explore.html (report.explore)
    and then the HTML page last.
    """
    ReportConfig(format=fmt).validate()
    notes: list[str] = []
    paths = [Path(r) for r in runs]
    if not paths:
        latest = find_latest_run()
        notes.append(f"No run folder was given; this reports the newest finished run, {latest}.")
        paths = [latest]
    given = paths
    from attnprobe.training import lineage

    paths, lineage_notes = lineage.with_parents(paths)
    notes.extend(lineage_notes)
    loaded = [load_run(p) for p in paths]
    _unique_names(loaded, notes)
    for run in loaded:
        notes.extend(run_notes(run))

    from attnprobe.report import figures

    plots = figures.render_all(loaded, notes)
    comparison = comparison_table(loaded) if len(loaded) > 1 else None
    markup = None
    if fmt in ("html", "both"):
        from attnprobe.report import page

        markup = page.render_page(runs=loaded, plots=plots, comparison=comparison, notes=notes,
                                    generated=time.strftime("%Y-%m-%d %H:%M:%S"), version=__version__)
        from attnprobe.report import explore

        title = "attnprobe explorer: " + (loaded[0].label if len(loaded) == 1 else f"{len(loaded)} runs compared")
        explorer = explore.render(loaded, title=title, notes=notes, generated=time.strftime("%Y-%m-%d %H:%M:%S"),
                                  version=__version__)
        notes.extend(explorer.notes)  # the size notice, after report.html's notes were rendered

    if out is not None:
        out_dir = Path(out)
    elif len(given) == 1:
        out_dir = given[0] / "report"
    else:
        out_dir = outputs.new_run_dir("compare")
    created = not out_dir.exists()
    make_out_dir(out_dir)
    result = ReportResult(out_dir=out_dir, notes=notes)
    try:
        if fmt in ("png", "both"):
            result.pngs = [outputs.atomic_write_bytes(out_dir / plot.file, plot.png) for plot in plots]
        if markup is not None:
            result.explore = outputs.atomic_write_text(out_dir / explore.EXPLORE_NAME, explorer.markup)
            result.html = outputs.atomic_write_text(out_dir / HTML_NAME, markup)
    except BaseException:
        if created:  # a failed report leaves no folder behind
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return result


def find_latest_run(base: str | Path = outputs.DEFAULT_RUNS_DIR) -> Path:
    """The finished run folder directly under ``base`` whose run.json is newest (by mtime)."""
    base = Path(base)
    candidates: list[tuple[float, str, Path]] = []
    if base.is_dir():
        for child in base.iterdir():
            meta_path = child / outputs.RUN_JSON
            if not meta_path.is_file():
                continue
            try:
                outputs.read_run_json(child)
            except AttnprobeError:
                continue  # unfinished or broken runs are not candidates
            candidates.append((meta_path.stat().st_mtime, child.name, child))
    if not candidates:
        raise AttnprobeError(
            f"no finished runs under {base}/; run `attnprobe scan` first or pass a run folder to report"
        )
    return max(candidates)[2]


def load_run(path: str | Path) -> Run:
    """Read and check one run folder; raise AttnprobeError saying what is wrong and what to do."""
    path = Path(path)
    meta = outputs.read_run_json(path)
    kind = meta.get("kind")
    if kind is None:
        kind = "refine" if (path / outputs.DIAGNOSTICS).exists() else "scan"
        meta = {**meta, "kind": kind}
    name = sanitize_name(path.resolve().name)
    if kind == "scan":
        heads = _read_parquet(path, outputs.HEADS, "scan", REQUIRED_HEAD_COLUMNS)
        heads = _check_heads(_with_flags(heads), path / outputs.HEADS, "scan")
        layers = _read_parquet(path, outputs.LAYERS, "scan", REQUIRED_LAYER_COLUMNS)
        if "flagged_heads" not in layers.columns or "heads" not in layers.columns:
            layers = layers.drop(columns=["flagged_heads", "heads"], errors="ignore").merge(
                layer_means(heads)[["layer", "heads", "flagged_heads"]], on="layer", how="left")
        layers = layers.sort_values("layer", ignore_index=True)
        run = Run(path, name, meta, heads, layers, flagged_table(heads, run_thresholds(meta)))
        run.patterns = _read_patterns(path, "scan")
    elif kind == "refine":
        diagnostics = _read_parquet(path, outputs.DIAGNOSTICS, "refine", (*REQUIRED_HEAD_COLUMNS, "epoch"))
        history = _read_parquet(path, outputs.HISTORY, "refine", REQUIRED_HISTORY_COLUMNS)
        diagnostics = _check_heads(_with_flags(diagnostics), path / outputs.DIAGNOSTICS, "refine", ("epoch",))
        epochs = sorted(float(e) for e in diagnostics["epoch"].dropna().unique())
        if not epochs:
            raise AttnprobeError(f"{path / outputs.DIAGNOSTICS} has no epoch values; rerun the refine")
        by_epoch = {e: diagnostics[diagnostics["epoch"] == e].reset_index(drop=True) for e in epochs}
        epoch_layers = {e: layer_means(rows) for e, rows in by_epoch.items()}
        heads = by_epoch[epochs[-1]]
        run = Run(path, name, meta, heads, epoch_layers[epochs[-1]], flagged_table(heads, run_thresholds(meta)),
                  history=history.sort_values(["epoch"], kind="stable", ignore_index=True),
                  epoch_layers=epoch_layers, step_layers=step_layers(diagnostics))
        run.patterns = _read_patterns(path, "refine")
        if len(epochs) > 1:
            run.first_heads = by_epoch[epochs[0]]
    else:
        raise AttnprobeError(
            f"{path / outputs.RUN_JSON} says kind {kind!r}; report reads runs of attnprobe scan or refine"
        )
    run.extremes = extreme_table(run.heads)
    return run


def _read_patterns(run_dir: Path, command: str) -> list:
    """The kept attention patterns of a scan or refine (patterns.parquet; a refine's has a ``stage``
    column), or [] when the run kept none."""
    from attnprobe.scanning import patterns

    path = run_dir / outputs.PATTERNS
    if not path.is_file():
        return []
    required = (*patterns.COLUMNS, "stage") if command == "refine" else patterns.COLUMNS
    df = _read_parquet(run_dir, outputs.PATTERNS, command, required, allow_empty=True)
    try:
        return patterns.from_frame(df)
    except ValueError as exc:
        raise AttnprobeError(f"{path} is not a complete set of patterns ({exc}); rerun the {command}") from None


def extreme_table(heads: pd.DataFrame, per_end: int = 2) -> pd.DataFrame:
    """The most extreme heads, flagged or not: highest and lowest GTD and normalized direct entropy."""
    import pandas as pd

    rows, seen = [], set()
    for column, words in (("gtd", "GTD"), ("direct_entropy_norm", "normalized direct entropy")):
        values = pd.to_numeric(heads[column], errors="coerce")
        ranked = heads.assign(_v=values).dropna(subset=["_v"]).sort_values(["_v", "layer", "head"], kind="stable")
        for end, picked in (("highest", ranked.iloc[::-1][:per_end]), ("lowest", ranked[:per_end])):
            for rec in picked.to_dict("records"):
                key = (int(rec["layer"]), int(rec["head"]))
                if key in seen:
                    continue
                seen.add(key)
                rows.append({"extreme": f"{end} {words}", "layer": key[0], "head": key[1], "gtd": rec["gtd"],
                             "direct_entropy_norm": rec["direct_entropy_norm"],
                             "sink_mass": rec.get("sink_mass", float("nan")),
                             "flagged": "yes" if rec.get("flagged") else "no"})
    columns = ["extreme", "layer", "head", "gtd", "direct_entropy_norm", "sink_mass", "flagged"]
    return pd.DataFrame(rows, columns=columns)


def step_layers(diagnostics: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """Per-layer means of every diagnosis, keyed by optimizer step (empty without a ``step`` column)."""
    if "step" not in diagnostics.columns or diagnostics["step"].isna().all():
        return {}
    steps = sorted(int(s) for s in diagnostics["step"].dropna().unique())
    return {s: layer_means(diagnostics[diagnostics["step"] == s].reset_index(drop=True)) for s in steps}


def layer_means(heads: pd.DataFrame) -> pd.DataFrame:
    """Per layer: the mean over heads of each metric column, ``heads`` and ``flagged_heads`` counts."""
    import pandas as pd

    cols = [c for c in METRICS if c in heads.columns]
    numeric = heads[["layer", *cols]].copy()
    for c in cols:
        numeric[c] = pd.to_numeric(numeric[c], errors="coerce").astype(float)
    grouped = numeric.groupby("layer", sort=True)
    layers = grouped[cols].mean()
    layers["heads"] = grouped.size()
    layers["flagged_heads"] = heads.groupby("layer", sort=True)["flagged"].sum().astype(int)
    return layers.reset_index()


def flagged_table(heads: pd.DataFrame, thresholds: Thresholds) -> pd.DataFrame:
    """The flagged heads with the reasons, e.g. ``low GTD (0.012 < 0.05)``, sorted by layer and head."""
    import pandas as pd

    rows = []
    for rec in heads[heads["flagged"]].sort_values(["layer", "head"]).to_dict("records"):
        rows.append({
            "layer": int(rec["layer"]),
            "head": int(rec["head"]),
            "gtd": rec["gtd"],
            "gtd_se": rec.get("gtd_se", 0.0),
            "direct_entropy_norm": rec["direct_entropy_norm"],
            "sink_mass": rec.get("sink_mass", float("nan")),
            "reasons": "; ".join(flag_reasons(rec, thresholds)),
        })
    columns = ["layer", "head", "gtd", "gtd_se", "direct_entropy_norm", "sink_mass", "reasons"]
    table = pd.DataFrame(rows, columns=columns)
    sampled = "gtd_se" in heads.columns and bool((pd.to_numeric(heads["gtd_se"], errors="coerce") > 0).any())
    return table if sampled else table.drop(columns="gtd_se")  # the GTD's ± only where it was estimated


def comparison_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run: model, variant, task, final accuracy or perplexity (refine), mean GTD and entropy,
    flagged heads."""
    import pandas as pd

    rows = []
    for run in runs:
        final = run.meta.get("final") if isinstance(run.meta.get("final"), dict) else {}
        rows.append({
            "run": run.name,
            "model": run.model_name,
            "variant": run.variant or run.kind,
            "task": run.meta.get("task", "sequence-classification") if run.kind == "refine" else None,
            "accuracy": final.get("accuracy"),
            "perplexity": final.get("perplexity"),
            "mean GTD": float(run.heads["gtd"].mean()),
            "mean normalized direct entropy": float(run.heads["direct_entropy_norm"].mean()),
            "flagged heads": f"{int(run.heads['flagged'].sum())} / {len(run.heads)}",
        })
    return pd.DataFrame(rows)


def run_notes(run: Run) -> list[str]:
    """Things a reader of one run's report should know that the figures do not say."""
    notes = []
    if "nonfinite_flag" in run.heads.columns and run.heads["nonfinite_flag"].any():
        n = int(run.heads["nonfinite_flag"].sum())
        notes.append(f"{run.name}: {n} head(s) had attention rows with NaN/Inf; their metrics leave those rows out.")
    n = (run.meta.get("multi_hop") or {}).get("sample_queries")
    if n and "gtd_se" in run.heads.columns:
        se = {c: float(run.heads[c].astype(float).max()) for c in ("gtd_se", "indirect_entropy_norm_se")}
        notes.append(f"{run.name}: GTD and the indirect entropies are estimated from {n} sampled query rows per "
                     f"sequence and head (--sample-queries); their standard errors reach ±{se['gtd_se']:.4f} (GTD) "
                     f"and ±{se['indirect_entropy_norm_se']:.4f} (normalized indirect entropy); heads.parquet "
                     "*_se columns, and explore.html, give each head's.")
    kept = run.meta.get("patterns")
    for note in kept.get("notes", []) if isinstance(kept, dict) else []:
        notes.append(f"{run.name}: {note}.")
    return notes


def sanitize_name(name: str) -> str:
    """A file-name safe form of a run name: characters outside [A-Za-z0-9._-] become '_'.

    >>> sanitize_name("my run/<b>")
    'my_run__b_'
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return safe or "run"


def _unique_names(runs: Sequence[Run], notes: list[str]) -> None:
    seen: set[str] = set()
    for run in runs:
        base, name, i = run.name, run.name, 1
        while name in seen:
            i += 1
            name = f"{base}-{i}"
        if name != base:
            notes.append(f"Two runs are named {base}; {run.path} is shown as {name}.")
            run.name = name
        seen.add(name)


def _read_parquet(run_dir: Path, file: str, command: str, required: Sequence[str],
                  allow_empty: bool = False) -> pd.DataFrame:
    import pandas as pd
    import pyarrow as pa

    path = run_dir / file
    if not path.is_file():
        raise AttnprobeError(f"{path} is missing or not readable Parquet (no such file); rerun the {command}")
    try:
        df = pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise AttnprobeError(
            f"{path} is missing or not readable Parquet ({detail}); rerun the {command}"
        ) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise AttnprobeError(
            f"{path} lacks the column(s) {', '.join(missing)}; rerun the {command} with attnprobe {__version__}"
        )
    if df.empty and not allow_empty:
        raise AttnprobeError(f"{path} has no rows; rerun the {command}")
    return df


def _with_flags(heads: pd.DataFrame) -> pd.DataFrame:
    """Boolean flag columns (missing ones False) and ``flagged = collapsed | high_gtd | sink | diffuse``."""
    heads = heads.copy()
    for flag in FLAGS:
        if flag == "collapsed" and flag not in heads.columns:
            continue
        heads[flag] = heads[flag].fillna(False).astype(bool) if flag in heads.columns else False
    if "collapsed" not in heads.columns:
        heads["collapsed"] = heads["entropy_collapse"] | heads["low_gtd"]
    heads["flagged"] = heads["collapsed"] | heads["high_gtd"] | heads["sink"] | heads["diffuse"]
    return heads


def _check_heads(heads: pd.DataFrame, path: Path, command: str, keys: Sequence[str] = ()) -> pd.DataFrame:
    """Whole layer/head numbers from 0 and one row per (``keys``..., layer, head)."""
    for col in ("layer", "head"):
        values = heads[col]
        if values.isna().any() or (values < 0).any() or (values != values.round()).any():
            raise AttnprobeError(f"{path} has {col} values that are not whole numbers from 0; rerun the {command}")
    heads["layer"] = heads["layer"].astype(int)
    heads["head"] = heads["head"].astype(int)
    if heads.duplicated([*keys, "layer", "head"]).any():
        raise AttnprobeError(f"{path} has more than one row for some (layer, head); rerun the {command}")
    return heads


def make_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise AttnprobeError(f"output path {out_dir} is a file; pass a folder with --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AttnprobeError(
            f"cannot create the report folder {out_dir} ({exc.strerror or exc}); choose a writable --out"
        ) from None
