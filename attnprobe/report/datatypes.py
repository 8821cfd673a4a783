"""The report's shared data types: a loaded run, a rendered figure, what a report wrote; flag reasons.

report.py loads runs and writes files, figures.py draws, htmlpage.py builds markup; all three use these
types, so none of them imports another for its types. Nothing here reads or writes files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnprobe.config import Thresholds

if TYPE_CHECKING:
    import pandas as pd

    from attnprobe.capture.patterns import Pattern

METRICS = (
    "direct_entropy", "direct_entropy_norm", "indirect_entropy", "indirect_entropy_norm", "gtd",
    "self_mass", "local_mass", "first_mass", "special_mass", "sink_mass", "bp_shift",
)
FLAGS = ("entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse", "collapsed", "nonfinite_flag")
# The columns a report cannot be drawn without; the others are used where present.
REQUIRED_HEAD_COLUMNS = ("layer", "head", "direct_entropy_norm", "indirect_entropy_norm", "gtd")
REQUIRED_LAYER_COLUMNS = ("layer", "direct_entropy_norm", "indirect_entropy_norm", "gtd")
REQUIRED_HISTORY_COLUMNS = ("epoch",)


@dataclass
class ReportResult:
    """What ``write_report`` wrote: the folder, the HTML pages (None for ``fmt="png"``), the PNGs, notes."""

    out_dir: Path
    html: Path | None = None
    pngs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    explore: Path | None = None  # explore.html, written with the HTML page


@dataclass
class Run:
    """One loaded run folder. ``heads`` of a refine run is its last epoch of diagnostics.parquet."""

    path: Path
    name: str  # file-name safe ([A-Za-z0-9._-]) and unique within one report
    meta: dict[str, Any]
    heads: pd.DataFrame  # one row per (layer, head), with a boolean ``flagged`` column added
    layers: pd.DataFrame  # one row per layer: metric means, ``heads``, ``flagged_heads``
    flagged: pd.DataFrame  # the flagged heads: layer, head, a few values, reasons
    history: pd.DataFrame | None = None  # refine only
    epoch_layers: dict[float, pd.DataFrame] = field(default_factory=dict)  # refine only: epoch -> layers
    step_layers: dict[int, pd.DataFrame] = field(default_factory=dict)  # refine only: optimizer step -> layers
    patterns: list[Pattern] = field(default_factory=list)  # patterns.parquet, when the run kept any
    extremes: pd.DataFrame | None = None  # the most extreme heads by GTD and entropy (report.extreme_table)
    first_heads: pd.DataFrame | None = None  # refine only: the first diagnosis (before training), if not the last

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "scan"))

    @property
    def variant(self) -> str | None:
        variant = self.meta.get("variant")
        return None if variant is None else str(variant)

    @property
    def label(self) -> str:
        """The run's name in legends and tables: folder name plus variant for refine runs."""
        return f"{self.name} ({self.variant})" if self.variant else self.name

    @property
    def model_name(self) -> str:
        model = self.meta.get("model")
        if isinstance(model, dict):
            return str(model.get("name") or model.get("path") or "?")
        return str(model or "?")

    @property
    def shape(self) -> tuple[int, int]:
        """(layers, heads) of the per-head grid."""
        return int(self.heads["layer"].max()) + 1, int(self.heads["head"].max()) + 1

    @property
    def thresholds(self) -> Thresholds:
        return run_thresholds(self.meta)


@dataclass
class Hover:
    """A rectangle of a figure, in PNG pixels from the top left, and the text shown when hovering it."""

    x: float
    y: float
    width: float
    height: float
    text: str


@dataclass
class Plot:
    """One rendered figure: its PNG file name, title and caption, and the run it belongs to (None: all)."""

    file: str
    title: str
    caption: str
    png: bytes
    run: str | None = None
    hover: list[Hover] = field(default_factory=list)  # values shown on hover in the HTML page
    head: tuple[int, int] | None = None  # a (layer, head) thumbnail of the flagged / extreme heads tables
    width: int = 0  # PNG size in pixels (set with ``hover``)
    height: int = 0


def flag_reasons(rec: dict[str, Any], t: Thresholds) -> list[str]:
    """Why one head (a heads.parquet row as a dict) is flagged, in words with its value and threshold."""
    reasons = []
    h = rec.get("direct_entropy_norm")
    if rec.get("entropy_collapse"):
        reasons.append(f"entropy collapse (normalized direct entropy {_num(h)} < {t.entropy_collapse:g})")
    if rec.get("low_gtd"):
        reasons.append(f"low GTD ({_num(rec.get('gtd'))} < {t.low_gtd:g})")
    if rec.get("high_gtd"):
        reasons.append(f"high GTD ({_num(rec.get('gtd'))} > {t.high_gtd:g})")
    if rec.get("sink"):
        reasons.append(f"sink (sink mass {_num(rec.get('sink_mass'))} > {t.sink:g})")
    if rec.get("diffuse"):
        reasons.append(f"diffuse (normalized direct entropy {_num(h)} > {t.diffuse:g})")
    if rec.get("collapsed") and not (rec.get("entropy_collapse") or rec.get("low_gtd")):
        reasons.append("collapsed")
    if rec.get("nonfinite_flag"):
        reasons.append(f"non-finite attention ({rec.get('nonfinite', '?')} rows with NaN/Inf)")
    return reasons


def run_thresholds(meta: dict[str, Any]) -> Thresholds:
    """The thresholds a run was flagged with (run.json), falling back to the defaults for missing keys."""
    stored = meta.get("thresholds")
    if not isinstance(stored, dict):
        return Thresholds()
    values = asdict(Thresholds())
    for key in values:
        if isinstance(stored.get(key), (int, float)) and not isinstance(stored.get(key), bool):
            values[key] = float(stored[key])
    return Thresholds(**values)


def _num(value: Any) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return "?"


# The normalized metrics the report draws per layer (profiles) and per head (heatmaps), with their labels.
PROFILE = (
    ("direct_entropy_norm", "normalized direct entropy"),
    ("indirect_entropy_norm", "normalized indirect entropy"),
    ("gtd", "GTD"),
)


def column_values(df: pd.DataFrame, column: str):
    """``df[column]`` as a float array (NaN where a value is not a number; all NaN if the column is absent)."""
    import numpy as np

    if column not in df.columns:
        return np.full(len(df), np.nan)
    return numeric(df[column]).to_numpy(float)


def numeric(series: pd.Series) -> pd.Series:
    """``series`` as floats, NaN where a value is not a number."""
    import pandas as pd

    return pd.to_numeric(series, errors="coerce").astype(float)
