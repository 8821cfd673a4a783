"""Run folders and atomic writes: every output goes to a temporary name and is renamed when complete.

A run folder gets its ``run.json`` last, with ``"complete": true``; a folder whose run.json is missing
or says ``false`` is not a finished run. One process writes a run folder at a time: ``prepare_out_dir``
takes the folder's lock file (created atomically), ``release`` (or the end of the process) frees it. This module knows file names and how to write them safely; it
does not compute anything (scan.py, refine.py) or draw anything (report.py).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attnprobe.errors import AttnprobeError

RUN_JSON = "run.json"
HEADS = "heads.parquet"
LAYERS = "layers.parquet"
EXAMPLES = "examples.parquet"
PATTERNS = "patterns.parquet"
HISTORY = "history.parquet"
DIAGNOSTICS = "diagnostics.parquet"
DEFAULT_RUNS_DIR = "attnprobe-runs"
LOCK = ".attnprobe.lock"

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


_HELD: set[Path] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock(path: str | Path) -> Path:
    """Take ``path``'s lock file (``O_CREAT | O_EXCL``, so of two processes exactly one gets it).

    The file holds the owner's pid, host and start time. A lock of this process is taken again freely;
    a lock whose process no longer runs on this host is stale and is replaced. A lock from another host
    cannot be checked: it stays until removed by hand. Raises AttnprobeError naming the folder otherwise.
    """
    path = Path(path)
    target = path / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(target.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                owner = {}
            if not owner:  # being written this instant, or unreadable: look again
                time.sleep(0.05)
                try:
                    owner = json.loads(target.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    owner = {"pid": "?", "host": "?"}
            pid, host = owner.get("pid"), owner.get("host")
            if pid == me["pid"] and host == me["host"]:
                _HELD.add(path.resolve())
                return target
            if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                target.unlink(missing_ok=True)  # stale: its process has ended
                continue
            raise AttnprobeError(
                f"output folder {path} is being written by another attnprobe run (pid {pid} on {host}, since "
                f"{owner.get('started', '?')}); wait for it or choose another --out (a stale lock: delete {target})"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        _HELD.add(path.resolve())
        return target
    raise AttnprobeError(f"cannot take the lock {target}; delete it if no attnprobe run writes {path}")


def release(path: str | Path) -> None:
    """Free ``path``'s lock if this process holds it (a no-op otherwise)."""
    path = Path(path)
    if path.resolve() not in _HELD:
        return
    _HELD.discard(path.resolve())
    target = path / LOCK
    try:
        owner = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        target.unlink(missing_ok=True)


@atexit.register
def release_all() -> None:
    """Free every folder lock this process holds (also run when the process ends)."""
    for path in list(_HELD):
        release(path)


def prepare_out_dir(out: str | Path | None, kind: str, overwrite: bool = False) -> Path:
    """Create the output folder and take its lock, refusing one that holds another run unless ``overwrite``.

    With ``overwrite``, the previous run's files are removed first so nothing stale stays behind. The
    caller frees the lock with ``release(path)`` when done (else it goes when the process ends).
    """
    path = Path(out) if out else new_run_dir(kind)
    if path.exists() and not path.is_dir():
        raise AttnprobeError(f"output path {path} is a file; pass a folder with --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AttnprobeError(
            f"cannot write to output folder {path} ({exc.strerror or exc}); choose a writable --out"
        ) from None
    try:
        lock(path)
    except PermissionError as exc:
        raise AttnprobeError(
            f"cannot write to output folder {path} ({exc.strerror or exc}); choose a writable --out"
        ) from None
    try:
        _clear(path, overwrite)
    except BaseException:
        release(path)
        raise
    return path


@contextlib.contextmanager
def output_folder(out: str | Path | None, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """``prepare_out_dir`` for the length of a command; if it fails, the folder is removed again when this
    call created it (no half-written output), and its lock is released either way."""
    existed = out is not None and Path(out).exists()
    path = prepare_out_dir(out, kind, overwrite=overwrite)  # takes the folder's lock
    try:
        yield path
    except BaseException:
        release(path)
        if not existed and path.exists() and not (path / RUN_JSON).exists():
            shutil.rmtree(path, ignore_errors=True)
        raise
    release(path)


def _clear(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        existing = [name for name in RUN_FILES if (path / name).exists()]
        if existing and not overwrite:
            raise AttnprobeError(
                f"output folder {path} already holds a run ({', '.join(existing)}); "
                "pass --overwrite to replace it or choose another --out"
            )
        if existing:
            (path / RUN_JSON).unlink(missing_ok=True)  # first, so a crash below leaves no 'complete' run
            for name in existing:
                target = path / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
    try:
        probe = path / f".attnprobe-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise AttnprobeError(
            f"cannot write to output folder {path} ({exc.strerror or exc}); choose a writable --out"
        ) from None


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
