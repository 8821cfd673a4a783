"""Frozen configuration for each command, TOML loading and validation with helpful messages.

Precedence is explicit flags over the ``--config`` file over the defaults below. This module does not
parse command lines (cli.py does) and imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from attnprobe.errors import AttnprobeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MODEL = "minilm-l6"
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "trackio")  # refine --report-to: the Trainer's trackers
VARIANTS = {"baseline": None, "bp-low": 0.5, "bp-high": 0.9}
TASKS = ("sequence-classification", "masked-lm", "question-answering", "multiple-choice", "causal-lm")


@dataclass(frozen=True)
class Thresholds:
    """Flag thresholds (DESIGN §2): a head is flagged when its metric crosses one of these."""

    entropy_collapse: float = 0.15  # normalized direct entropy below this
    low_gtd: float = 0.05  # gtd below this
    high_gtd: float = 0.60  # gtd above this
    sink: float = 0.5  # sink_mass above this
    diffuse: float = 0.95  # normalized direct entropy above this

    def validate(self) -> Thresholds:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 1.0:
                raise AttnprobeError(
                    f"threshold {f.name} = {value} is outside [0, 1]; pass a value between 0 and 1"
                )
        return self


@dataclass(frozen=True)
class ScanConfig:
    """Options of ``attnprobe scan``."""

    model: str = DEFAULT_MODEL
    data: str | None = None
    text: tuple[str, ...] = ()
    out: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    encoding: str = "utf-8"
    num_layers: int | None = None
    hops: int = 2
    batch_size: int = 32
    max_length: int | None = None
    limit: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    per_example: bool = False
    patterns: int = 4  # keep the full attention of this many short examples (patterns.parquet); 0 = off
    compile: str = "off"  # "on": the compiled per-block metrics where they check out (fused.py)
    sample_queries: int | None = None  # the multi-hop metrics from N sampled query rows per sequence and head
    seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    overwrite: bool = False
    tokenizer: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)

    def validate(self) -> ScanConfig:
        _check_common(self)
        if self.hops < 2:
            raise AttnprobeError(f"--hops must be 2 or more (got {self.hops}); multi-hop attention needs at least two hops")
        if self.limit is not None and self.limit < 1:
            raise AttnprobeError(f"--limit must be 1 or more (got {self.limit})")
        if self.data is not None and self.text:
            raise AttnprobeError("pass either --data FILE or --text TEXT, not both")
        if self.compile not in ("off", "on"):
            raise AttnprobeError(f"--compile must be on or off (got {self.compile!r})")
        _check_sample_queries(self.sample_queries)
        _check_patterns(self.patterns)
        self.thresholds.validate()
        return self


@dataclass(frozen=True)
class RefineConfig:
    """Options of ``attnprobe refine``."""

    model: str = DEFAULT_MODEL
    train: str | None = None
    eval: str | None = None
    out: str | None = None
    variant: str | None = None  # None: the checkpoint's own SAOBP settings, else bp-high (refine_settings.py)
    gamma: float | None = None
    strength: float = 1.0
    bp_layers: str = "all"
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    encoding: str = "utf-8"
    num_layers: int | None = None
    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int | None = None
    grad_accum: int = 1
    max_length: int = 128
    seed: int = 42
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_split: float = 0.1
    hops: int = 2
    sample_queries: int | None = None  # diagnostics: multi-hop metrics from N sampled rows (ScanConfig)
    device: str = "auto"
    dtype: str = "float32"
    resume: bool = False
    checkpoints: bool = True
    group_by_length: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    overwrite: bool = False
    tokenizer: str | None = None
    task: str = "sequence-classification"
    init: str | None = None
    max_steps: int | None = None
    eval_every: int | None = None
    diagnose_every: int | None = None
    report_to: str = "none"
    patterns: int = 4  # keep the full attention of this many eval examples before and after training; 0 = off
    doc_stride: int = 32  # question answering: tokens shared by consecutive windows of a long context
    max_answer_length: int = 30  # question answering: the most tokens a predicted answer may have
    context_column: str | None = None  # multiple choice: the columns of a layout that is not recognized
    question_column: str | None = None
    choices_column: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)

    def validate(self) -> RefineConfig:
        _check_common(self)
        if self.train is None:
            raise AttnprobeError("refine needs --train FILE (a labelled .tsv/.csv/.jsonl/.parquet file)")
        if self.task not in TASKS:
            raise AttnprobeError(f"unknown --task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.init is not None and self.task not in ("masked-lm", "causal-lm"):
            raise AttnprobeError("--init builds a fresh model to pretrain; use it with --task masked-lm or causal-lm")
        _check_task_options(self)
        _check_sample_queries(self.sample_queries)
        if self.init is not None and self.num_layers is not None:
            raise AttnprobeError("--init sets the number of layers itself (e.g. L4-H256); drop --num-layers")
        if self.report_to not in REPORT_TO:
            raise AttnprobeError(f"unknown --report-to {self.report_to!r}; choose one of {', '.join(REPORT_TO)}")
        for name in ("max_steps", "eval_every", "diagnose_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AttnprobeError(f"--{name.replace('_', '-')} must be 1 or more (got {value})")
        if self.variant is not None and self.variant not in VARIANTS:
            raise AttnprobeError(f"unknown --variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.gamma is not None and not 0.0 <= self.gamma < 1.0:
            raise AttnprobeError(f"--gamma must be in [0, 1) (got {self.gamma})")
        if self.strength < 0:
            raise AttnprobeError(f"--strength must be 0 or more (got {self.strength})")
        if self.epochs <= 0:
            raise AttnprobeError(f"--epochs must be positive (got {self.epochs})")
        if self.lr <= 0:
            raise AttnprobeError(f"--lr must be positive (got {self.lr})")
        if not 0.0 < self.eval_split < 1.0:
            raise AttnprobeError(f"eval_split must be in (0, 1) (got {self.eval_split})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise AttnprobeError(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.hops < 2:
            raise AttnprobeError(f"--hops must be 2 or more (got {self.hops})")
        _check_patterns(self.patterns)
        self.thresholds.validate()
        return self

    @property
    def effective_gamma(self) -> float:
        """gamma of the variant unless ``--gamma`` overrides it; 0.0 for baseline."""
        if self.gamma is not None:
            return self.gamma
        return VARIANTS[self.variant or "bp-high"] or 0.0


@dataclass(frozen=True)
class ShowConfig:
    """Options of ``attnprobe show``."""

    model: str = DEFAULT_MODEL
    text: str | None = None
    pair: str | None = None
    layers: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    out: str | None = None
    format: str = "both"
    max_tokens: int = 64
    num_layers: int | None = None
    hops: int = 2
    sample_queries: int | None = None  # multi-hop metrics from N sampled query rows (ScanConfig)
    device: str = "auto"
    dtype: str = "float32"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    tokenizer: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)

    def validate(self) -> ShowConfig:
        if not self.text or not self.text.strip():
            raise AttnprobeError("show needs --text TEXT (the sentence to draw; --pair adds a second one)")
        _check_sample_queries(self.sample_queries)
        if self.format not in ("html", "png", "both"):
            raise AttnprobeError(f"unknown --format {self.format!r}; choose html, png or both")
        if self.max_tokens < 2:
            raise AttnprobeError(f"--max-tokens must be 2 or more (got {self.max_tokens})")
        if self.hops < 2:
            raise AttnprobeError(f"--hops must be 2 or more (got {self.hops})")
        bad = [x for x in (*self.layers, *self.heads) if x < 0]
        if bad:
            raise AttnprobeError(f"--layer and --head count from 0 (got {bad[0]})")
        _check_common(replace_batch(self))
        self.thresholds.validate()
        return self


def replace_batch(cfg: Any) -> Any:
    """``cfg`` seen with the fields ``_check_common`` reads (show has no batch size or max length)."""
    return types.SimpleNamespace(batch_size=1, max_length=None, num_layers=cfg.num_layers, device=cfg.device,
                                 dtype=cfg.dtype)


@dataclass(frozen=True)
class ReportConfig:
    """Options of ``attnprobe report``."""

    runs: tuple[str, ...] = ()
    out: str | None = None
    format: str = "both"
    overwrite: bool = True

    def validate(self) -> ReportConfig:
        if self.format not in ("html", "png", "both"):
            raise AttnprobeError(f"unknown --format {self.format!r}; choose html, png or both")
        return self


def _check_task_options(cfg: RefineConfig) -> None:
    """The question-answering and multiple-choice options: in range, and only with their task."""
    if cfg.task != "multiple-choice":
        for name in ("context_column", "question_column", "choices_column"):
            if getattr(cfg, name) is not None:
                raise AttnprobeError(f"--{name.replace('_', '-')} names a multiple-choice column; use it with "
                                     "--task multiple-choice")
    if cfg.task == "question-answering":
        if cfg.max_answer_length < 1:
            raise AttnprobeError(f"--max-answer-length must be 1 or more (got {cfg.max_answer_length})")
        if not 0 <= cfg.doc_stride < cfg.max_length // 2:
            raise AttnprobeError(f"--doc-stride must be in [0, {cfg.max_length // 2}) for --max-length "
                                 f"{cfg.max_length} (got {cfg.doc_stride})")


def _check_patterns(n: int) -> None:
    if not 0 <= n <= 64:
        raise AttnprobeError(f"--patterns must be 0 (off) to 64 (got {n}); each kept example holds every "
                             "head's full attention")


def _check_sample_queries(n: int | None) -> None:
    if n is not None and n < 2:
        raise AttnprobeError(f"--sample-queries must be 2 or more (got {n}): a standard error needs two rows")


def _check_common(cfg: Any) -> None:
    if cfg.batch_size < 1:
        raise AttnprobeError(f"--batch-size must be 1 or more (got {cfg.batch_size})")
    if cfg.num_layers is not None and cfg.num_layers < 1:
        raise AttnprobeError(f"--num-layers must be 1 or more (got {cfg.num_layers})")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise AttnprobeError(f"--max-length must be 2 or more (got {cfg.max_length})")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise AttnprobeError(f"unknown --device {cfg.device!r}; choose auto, cpu or cuda")
    if cfg.dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise AttnprobeError(f"unknown --dtype {cfg.dtype!r}; choose float32, bfloat16, float16 or float64")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a ``[scan]``/``[refine]`` table or top-level keys are both accepted."""
    p = Path(path)
    if not p.is_file():
        raise AttnprobeError(f"config file {p} does not exist; pass the path of a TOML file (see sample_configs/)")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise AttnprobeError(f"config file {p} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise AttnprobeError(f"config file {p} is not UTF-8 text; save it as UTF-8 TOML") from None


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check one TOML value against the dataclass field type, converting lists to tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0], source)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise AttnprobeError(f"{source}: key {name!r} must be a list of strings (got {value!r})")
        return tuple(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AttnprobeError(f"{source}: key {name!r} must be a number (got {value!r})")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise AttnprobeError(f"{source}: key {name!r} must be an integer (got {value!r})")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise AttnprobeError(f"{source}: key {name!r} must be true or false (got {value!r})")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise AttnprobeError(f"{source}: key {name!r} must be a string (got {value!r})")
        return value
    return value


def from_mapping(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """Build ``cls`` from a plain mapping, refusing unknown keys and wrong types with the key's name."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise AttnprobeError(
                f"{source}: unknown key {key!r}; known keys are {', '.join(sorted(known))}"
            )
        if name == "thresholds":
            if not isinstance(value, dict):
                raise AttnprobeError(f"{source}: [thresholds] must be a table")
            kwargs[name] = from_mapping(Thresholds, value, f"{source} [thresholds]")
        else:
            kwargs[name] = _coerce(key, value, hints[name], source)
    return cls(**kwargs)


def build_config(cls: type, config_file: str | None, section: str, overrides: dict[str, Any]) -> Any:
    """Defaults, then the TOML file (``[section]`` table or top level), then explicit ``overrides``."""
    base: dict[str, Any] = {}
    if config_file:
        raw = read_toml(config_file)
        if section in raw and isinstance(raw[section], dict):
            raw = {**{k: v for k, v in raw.items() if not isinstance(v, dict) or k == "thresholds"}, **raw[section]}
        for other in ("scan", "refine", "report"):
            if other != section:
                raw.pop(other, None)
        base = raw
    cfg = from_mapping(cls, base, source=str(config_file or "defaults"))
    thr_over = {k[len("thresholds."):]: v for k, v in overrides.items() if k.startswith("thresholds.") and v is not None}
    plain = {k: v for k, v in overrides.items() if not k.startswith("thresholds.") and v is not None}
    if thr_over:
        plain["thresholds"] = replace(cfg.thresholds, **thr_over)
    return replace(cfg, **plain).validate()


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return dataclasses.asdict(cfg)
