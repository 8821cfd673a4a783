"""The run folder of a refine: where it is, whether it may be used, and preparing it (or resuming in it).

It only checks and creates folders; what goes into them is refine.py's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from attnprobe.errors import AttnprobeError
from attnprobe.runtime import outputs
from attnprobe.config import RefineConfig

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"


def out_dir(cfg: RefineConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if cfg.resume:
        raise AttnprobeError("--resume needs --out DIR, the folder of the run to continue")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise AttnprobeError("a refine on several processes needs --out DIR so that all of them use one folder")
    return outputs.new_run_dir("refine")


def check_folder(cfg: RefineConfig, out: Path) -> Path | None:
    """Refuse an unusable run folder before any slow work; return the checkpoint to resume from, if any.

    Only reads: ``prepare_folder`` makes the changes later, on the main process.
    """
    from attnprobe.training import trainer

    checkpoints = out / CHECKPOINTS
    if cfg.resume:
        last = trainer.newest_checkpoint(checkpoints)
        if last is None:
            raise AttnprobeError(f"--resume: {checkpoints} holds no finished checkpoint to continue from; "
                                 "run without --resume to start the refine")
        return last
    if out.exists() and not out.is_dir():
        raise AttnprobeError(f"output path {out} is a file; pass a folder with --out")
    if not cfg.overwrite:
        existing = [name for name in outputs.RUN_FILES if (out / name).exists()]
        if existing:
            raise AttnprobeError(f"output folder {out} already holds a run ({', '.join(existing)}); "
                                 "pass --overwrite to replace it or choose another --out")
        if checkpoints.exists():
            raise AttnprobeError(f"{out} holds checkpoints of an unfinished refine; pass --resume to continue it, "
                                 "--overwrite to start again, or choose another --out")
    return None


def prepare_folder(cfg: RefineConfig, out: Path) -> None:
    """Create the run folder (a fresh run) or mark a resumed one incomplete while it changes."""
    if cfg.resume:
        outputs.lock(out)  # one writer per folder; freed when the process ends
        (out / outputs.RUN_JSON).unlink(missing_ok=True)
        return
    outputs.prepare_out_dir(out, "refine", cfg.overwrite)  # takes the folder's lock until the process ends
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # stale checkpoints must never be resumed


def check_resume(progress: dict[str, Any], settings: dict[str, Any], checkpoint: Path) -> None:
    before = progress.get("settings", {})
    for key, value in settings.items():
        if key in before and before[key] != value:
            raise AttnprobeError(f"--resume: {checkpoint} was trained with {key} = {before[key]!r}, not {value!r}; "
                                 "pass the options of the first run")
