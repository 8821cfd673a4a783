"""What a refine inherits from the checkpoint it starts from: its SAOBP variant, and the run that made it.

A refine without ``--variant`` (and without ``--gamma``) keeps the SAOBP settings stored in MODEL's
config.json: ``saobp`` for a refined checkpoint, ``attnprobe_variant: "baseline"`` for a checkpoint that an
attnprobe baseline run saved. Any other checkpoint (e.g. a published one) gets bp-high, the default before
this rule. When MODEL is the ``model/`` folder of an attnprobe run, that run is the new run's ``parent``.
This module only reads; it does not load weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from attnprobe.runtime import outputs
from attnprobe.config import RefineConfig

DEFAULT_VARIANT = "bp-high"
VARIANT_KEY = "attnprobe_variant"  # written into a saved model's config.json by refine


def _checkpoint_config(spec: str) -> dict[str, Any]:
    from attnprobe.models import checkpoints

    path, _, _ = checkpoints.resolve_model(spec)
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # load_model reports an unreadable config with its own message


def resolve_variant(cfg: RefineConfig) -> tuple[RefineConfig, str]:
    """``cfg`` with ``variant`` (and, when inherited, gamma / strength / bp_layers) filled in, and where
    the variant came from: ``"option"``, ``"checkpoint"`` or ``"default"``."""
    if cfg.variant is not None or cfg.gamma is not None:
        return (cfg if cfg.variant is not None else dataclasses.replace(cfg, variant=DEFAULT_VARIANT)), "option"
    if cfg.init is not None:  # a fresh model has no settings of its own
        return dataclasses.replace(cfg, variant=DEFAULT_VARIANT), "default"
    raw = _checkpoint_config(cfg.model)
    saved = raw.get("saobp")
    if isinstance(saved, dict) and saved.get("gamma"):
        layers = saved.get("layers", "all")
        variant = str(saved.get("variant", "custom"))
        custom = variant not in ("bp-low", "bp-high")
        return dataclasses.replace(
            cfg, variant="bp-high" if custom else variant, gamma=float(saved["gamma"]) if custom else None,
            strength=float(saved.get("strength", 1.0)),
            bp_layers="all" if layers in ("all", None) else ",".join(str(int(x)) for x in layers)), "checkpoint"
    if raw.get(VARIANT_KEY) == "baseline":
        return dataclasses.replace(cfg, variant="baseline"), "checkpoint"
    return dataclasses.replace(cfg, variant=DEFAULT_VARIANT), "default"


def parent_run(spec: str) -> dict[str, Any] | None:
    """``{"run", "task", "variant", "init"}`` of the run whose ``model/`` folder ``spec`` is, else None."""
    path = Path(spec)
    meta_path = path.parent / outputs.RUN_JSON
    if not path.is_dir() or path.name != "model" or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("kind") != "refine":
        return None
    return {"run": str(path.parent.resolve()), "task": meta.get("task", "sequence-classification"),
            "variant": meta.get("variant"), "init": meta.get("init"), "steps": meta.get("steps"),
            "final": meta.get("final")}


def with_parents(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """``paths`` with the parent run of each refine run put just before it (once, where its folder still
    exists and it is not given already), and a note for each parent added: the report shows the
    pretraining and the fine-tuning of one lineage side by side."""
    given = {p.resolve() for p in paths}
    out: list[Path] = []
    notes = []
    for p in paths:
        try:
            meta = json.loads((p / outputs.RUN_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}  # the report's own loading gives the error
        parent = meta.get("parent") if isinstance(meta.get("parent"), dict) else None
        folder = Path(parent["run"]) if parent and parent.get("run") else None
        if folder is not None and folder.resolve() not in given and (folder / outputs.RUN_JSON).is_file():
            given.add(folder.resolve())
            out.append(folder)
            notes.append(f"{p.name} was fine-tuned from the model of {folder.name} "
                         f"({parent.get('task')}, {parent.get('variant')}); both are shown.")
        out.append(p)
    return out, notes
