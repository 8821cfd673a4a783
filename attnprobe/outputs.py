"""Run folders and atomic writes: every output goes to a temporary name and is renamed when complete.

A run folder gets its ``run.json`` last, with ``"complete": true``; a folder whose run.json is missing
or says ``false`` is not a finished run. This module knows file names and how to write them safely; it
does not compute anything (scan.py, refine.py) or draw anything (report.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from attnprobe import AttnprobeError

RUN_JSON = "run.json"
HEADS = "heads.parquet"
LAYERS = "layers.parquet"
EXAMPLES = "examples.parquet"
PATTERNS = "patterns.parquet"
HISTORY = "history.parquet"
DIAGNOSTICS = "diagnostics.parquet"
DEFAULT_RUNS_DIR = "attnprobe-runs"

# Files that mark a folder as holding a run of ours.
RUN_FILES = (RUN_JSON, HEADS, LAYERS, EXAMPLES, PATTERNS, HISTORY, DIAGNOSTICS, "model")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path`` and rename it over ``path``."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n")


def atomic_write_parquet(df, path: str | Path) -> Path:
    """Write a pandas DataFrame as Parquet through a temporary name."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class ParquetRowWriter:
    """Append pandas frames as Parquet row groups; the file appears under its name only on ``close()``.

    Used for ``examples.parquet`` so per-example rows are never all held in memory.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = _tmp_path(self.path)
        self._writer = None
        self.rows = 0

    def write(self, df) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(df, preserve_index=False)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, table.schema)
        self._writer.write_table(table)
        self.rows += len(df)

    def close(self) -> Path | None:
        if self._writer is None:
            return None
        self._writer.close()
        self._writer = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.tmp.exists():
            self.tmp.unlink()


def new_run_dir(kind: str, base: str | Path = DEFAULT_RUNS_DIR) -> Path:
    """A fresh folder name under ``base`` such as ``attnprobe-runs/scan-20261201-073000``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(base)
    candidate = base / f"{kind}-{stamp}"
    i = 1
    while candidate.exists():
        i += 1
        candidate = base / f"{kind}-{stamp}-{i}"
    return candidate


def prepare_out_dir(out: str | Path | None, kind: str, overwrite: bool = False) -> Path:
    """Create the output folder, refusing one that holds another run unless ``overwrite``.

    With ``overwrite``, the previous run's files are removed first so nothing stale stays behind.
    """
    path = Path(out) if out else new_run_dir(kind)
    if path.exists() and not path.is_dir():
        raise AttnprobeError(f"output path {path} is a file; pass a folder with --out")
    if path.is_dir():
        existing = [name for name in RUN_FILES if (path / name).exists()]
        if existing and not overwrite:
            raise AttnprobeError(
                f"output folder {path} already holds a run ({', '.join(existing)}); "
                "pass --overwrite to replace it or choose another --out"
            )
        if existing:
            import shutil

            (path / RUN_JSON).unlink(missing_ok=True)  # first, so a crash below leaves no 'complete' run
            for name in existing:
                target = path / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".attnprobe-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise AttnprobeError(
            f"cannot write to output folder {path} ({exc.strerror or exc}); choose a writable --out"
        ) from None
    return path


def read_run_json(run_dir: str | Path) -> dict[str, Any]:
    """Read a run folder's run.json; raise a clear error for a folder that is not a finished run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AttnprobeError(f"{run_dir} is not a folder; pass a run folder written by attnprobe scan or refine")
    meta_path = run_dir / RUN_JSON
    if not meta_path.is_file():
        raise AttnprobeError(
            f"{run_dir} has no run.json, so it is not an attnprobe run (or the run did not finish); "
            "pass a folder written by attnprobe scan or refine"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AttnprobeError(f"{meta_path} is not valid JSON ({exc}); rerun the scan or refine") from None
    if not isinstance(meta, dict) or not meta.get("complete", False):
        raise AttnprobeError(
            f"{run_dir} holds an incomplete run (run.json says complete: false); rerun it to finish"
        )
    return meta
