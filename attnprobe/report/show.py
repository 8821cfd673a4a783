"""``attnprobe show``: the attention of one sentence (or pair) drawn over its tokens, with its metrics.

The sentence goes through the model twice: once under scan's own probe (``passes.forward_batch`` with a
``probe.Probe``, reduced by ``tables.head_frame``), so its per-head metrics are exactly what a scan of
that one sentence reports, and once under a ``patterns.PatternKeeper``, which keeps the full attention
for drawing. Without ``layers``/``heads`` the page shows every head small (the model view); with them,
the chosen heads large. For an SAOBP model, plain and refined attention are drawn side by side. Drawing
is pattern_figures.py, markup page.py; this module decides what goes in and writes the files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnprobe.errors import AttnprobeError
from attnprobe.version import __version__
from attnprobe.runtime import outputs
from attnprobe.config import ShowConfig
from attnprobe.report.datatypes import Plot, flag_reasons

HTML_NAME = "show.html"
MAX_HEAD_VIEWS = 48  # large head figures per page
FLAG_NAMES = ("entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse", "nonfinite_flag")


@dataclass
class ShowResult:
    """What ``show`` computed and wrote.

    ``heads`` has the heads.parquet columns for this one sentence; ``pattern`` its attention
    ``(L, H, n, n)`` (``pattern.plain``: before SAOBP); ``selected`` the (layer, head) drawn large.
    """

    tokens: list[str]
    heads: Any  # pandas.DataFrame
    pattern: Any  # patterns.Pattern
    selected: list[tuple[int, int]]
    notes: list[str] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    out_dir: Path | None = None
    html: Path | None = None
    pngs: list[Path] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    explore: Path | None = None  # explore.html, written with show.html


def show(config: ShowConfig, *, loaded=None, write: bool = True) -> ShowResult:
    """Draw one sentence's attention and compute its per-head metrics; write PNGs and/or a page."""
    import torch

    from attnprobe.data import batching
    from attnprobe.models import loading
    from attnprobe.scanning import passes, patterns, tables
    from attnprobe.capture.probe import Probe

    config = config.validate()
    if loaded is None:
        loaded = loading.load_model(config.model, num_layers=config.num_layers, device=config.device,
                                   dtype=config.dtype, allow_pickle=config.allow_pickle,
                                   trust_remote_code=config.trust_remote_code, tokenizer=config.tokenizer)
    elif config.tokenizer:
        loaded.tokenizer = _other_tokenizer(config.tokenizer, loaded, config.trust_remote_code)
    tokenizer = loaded.tokenizer
    limit = min(config.max_tokens, batching.effective_max_length(loaded, None))
    notes: list[str] = []
    full = len(tokenizer(config.text, config.pair)["input_ids"])
    enc = batching.encode_chunk(tokenizer, [config.text], [config.pair] if config.pair else None, [0], limit)
    if not enc.ids:
        raise AttnprobeError("the text has fewer than 2 tokens after tokenization; pass a longer --text")
    if full > limit:
        notes.append(f"The text has {full} tokens; show reads only the first {limit} (--max-tokens {config.max_tokens}"
                     f"{', the model limit' if limit < config.max_tokens else ''}), so the attention and the "
                     "metrics are those of the cut text.")
    ids = enc.ids[0]
    types = enc.token_types[0] if enc.token_types is not None else None

    metric_dtype = torch.float64 if next(loaded.model.parameters()).dtype == torch.float64 else torch.float32
    probe = Probe(loaded.num_layers, hops=config.hops, metric_dtype=metric_dtype, num_heads=loaded.num_heads or None,
                  sample_queries=config.sample_queries)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch, special, _ = next(batching.make_batches(enc, 1, pad_id, loading.special_token_ids(tokenizer),
                                                  loaded.device))
    passes.forward_batch(loaded, probe, batch, special)
    heads = tables.head_frame(probe.totals(), config.thresholds)
    pattern = patterns.sequence_pattern(loaded, ids, types)

    L, H = pattern.probs.shape[:2]
    selected = _selection(config, L, H, notes)
    meta = {"model": loaded.info, "text": config.text, "pair": config.pair, "tokens": len(ids),
            "tokens_in_text": full, "hops": config.hops, "thresholds": {
                k: getattr(config.thresholds, k) for k in ("entropy_collapse", "low_gtd", "high_gtd", "sink",
                                                             "diffuse")},
            "saobp": loaded.info.get("saobp"), "backend": loaded.backend}
    result = ShowResult(tokens=pattern.tokens, heads=heads, pattern=pattern, selected=selected, notes=notes,
                        meta=meta)
    result.plots = _plots(result, config)
    if write:
        _write(result, config)
    return result


def head_title(rec: dict[str, Any], thresholds) -> str:
    """The per-head metrics of the sentence as a figure title (four lines)."""
    def f(name: str) -> str:
        value = rec.get(name)
        return "-" if value is None or value != value else f"{value:.3f}"

    lines = [
        f"layer {int(rec['layer'])}, head {int(rec['head'])}",
        f"direct entropy {f('direct_entropy')} nats (normalized {f('direct_entropy_norm')}), "
        f"indirect {f('indirect_entropy')} ({f('indirect_entropy_norm')}), GTD {f('gtd')}",
        f"mass on self {f('self_mass')}, neighbours {f('local_mass')}, first token {f('first_mass')}, "
        f"special tokens {f('special_mass')}; sink mass {f('sink_mass')}"
        + (f"; bp_shift {f('bp_shift')}" if rec.get("bp_shift") is not None and rec["bp_shift"] == rec["bp_shift"]
           else ""),
    ]
    reasons = flag_reasons(rec, thresholds)
    lines.append("flags: " + "; ".join(reasons) if reasons else "not flagged on this sentence")
    return "\n".join(lines)


def head_flags(heads) -> dict[tuple[int, int], list[str]]:
    """(layer, head) -> the flag columns set, for the flagged heads of the sentence."""
    out = {}
    for rec in heads.to_dict("records"):
        names = [n for n in FLAG_NAMES if bool(rec.get(n))]
        if names:
            out[(int(rec["layer"]), int(rec["head"]))] = names
    return out


def _selection(config: ShowConfig, L: int, H: int, notes: list[str]) -> list[tuple[int, int]]:
    for name, values, count in (("--layer", config.layers, L), ("--head", config.heads, H)):
        bad = [v for v in values if v >= count]
        if bad:
            raise AttnprobeError(f"{name} {bad[0]} is out of range: the model has {count} "
                                 f"{'layers' if name == '--layer' else 'heads per layer'} (0..{count - 1})")
    if not config.layers and not config.heads:
        return []
    layers = list(dict.fromkeys(config.layers)) or list(range(L))
    heads = list(dict.fromkeys(config.heads)) or list(range(H))
    selected = [(layer, head) for layer in layers for head in heads]
    if len(selected) > MAX_HEAD_VIEWS:
        notes.append(f"{len(selected)} heads were chosen; the page draws the first {MAX_HEAD_VIEWS} large "
                     "(pass fewer --layer / --head).")
        selected = selected[:MAX_HEAD_VIEWS]
    return selected


def _plots(result: ShowResult, config: ShowConfig) -> list[Plot]:
    from attnprobe.report import pattern_figures

    p, n = result.pattern, len(result.tokens)
    name = pattern_figures.token_label(str(result.meta["model"].get("name", "model")), 60)
    probs = p.probs.numpy()
    refined = p.plain is not None
    plots = []
    if not result.selected:
        flags = head_flags(result.heads)
        what = "refined (SAOBP) attention" if refined else "attention"
        plots.append(Plot("model-view.png", f"{what} of every head",
                          f"Layers down, heads across; each cell is one head's {n} x {n} attention (queries down, "
                          "keys across). A red frame marks a head flagged on this sentence.",
                          pattern_figures.model_view(probs, flags, f"{name}: {what} of every head ({n} tokens)",
                                                 config.thresholds)))
        if refined:
            plain = p.plain.numpy()
            plain = _fill_unrefined(plain, probs)
            plots.append(Plot("model-view-plain.png", "plain attention of every head (before SAOBP)",
                              "The same heads without the SAOBP refinement (layers that are not refined repeat "
                              "the attention above).",
                              pattern_figures.model_view(plain, {}, f"{name}: plain attention of every head ({n} tokens)")))
        return plots
    by_head = {(int(r["layer"]), int(r["head"])): r for r in result.heads.to_dict("records")}
    for layer, head in result.selected:
        plain = None
        if refined and not _nan(p.plain[layer, head]):
            plain = p.plain[layer, head].numpy()
        title = head_title(by_head[(layer, head)], config.thresholds)
        png, hovers, (w, h) = pattern_figures.head_view(probs[layer, head], result.tokens, title, plain=plain)
        plots.append(Plot(f"head-L{layer}-H{head}.png", f"layer {layer}, head {head}",
                          "Queries (attending tokens) down, keys (attended tokens) across"
                          + ("; plain attention left, SAOBP-refined right" if plain is not None else "")
                          + ". Hover a cell in the HTML page for its weight.",
                          png, hover=hovers, width=w, height=h, head=(layer, head)))
    return plots


def _nan(t) -> bool:
    import torch

    return bool(torch.isnan(t).all())


def _fill_unrefined(plain, probs):
    import numpy as np

    return np.where(np.isnan(plain), probs, plain)


def _other_tokenizer(spec: str, loaded, trust_remote_code: bool):
    """``--tokenizer``: the tokenizer of another folder or alias, refused if it does not fit the model."""
    from attnprobe.models import checkpoints

    path, _, _ = checkpoints.resolve_model(spec)
    tokenizer = checkpoints.load_tokenizer(path, trust_remote_code)
    vocab = getattr(loaded.model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise AttnprobeError(f"the tokenizer of {spec} has {len(tokenizer)} tokens but the model's vocabulary has "
                             f"{vocab}; pass the tokenizer the model was trained with")
    return tokenizer


def _write(result: ShowResult, config: ShowConfig) -> None:
    from attnprobe.report import page
    from attnprobe.report.writer import make_out_dir

    markup = None
    if config.format in ("html", "both"):
        markup = page.render_show_page(result, generated=time.strftime("%Y-%m-%d %H:%M:%S"), version=__version__,
                                         thresholds=config.thresholds)
    out_dir = Path(config.out) if config.out else outputs.new_run_dir("show")
    make_out_dir(out_dir)
    result.out_dir = out_dir
    explorer = None
    if markup is not None:
        from attnprobe.report import explore

        explorer = explore.render([_explore_run(result, config.thresholds)], title=f"attnprobe explorer: "
                                  f"{result.meta['model'].get('name', 'model')}", notes=result.notes,
                                  generated=time.strftime("%Y-%m-%d %H:%M:%S"), version=__version__).markup
    if config.format in ("png", "both"):
        result.pngs = [outputs.atomic_write_bytes(out_dir / plot.file, plot.png) for plot in result.plots]
    if markup is not None:
        result.explore = outputs.atomic_write_text(out_dir / explore.EXPLORE_NAME, explorer)
        result.html = outputs.atomic_write_text(out_dir / HTML_NAME, markup)


def _explore_run(result: ShowResult, thresholds):
    """The sentence as a one-example Run, so that its explore.html is the report's page."""
    from attnprobe.capture.patterns import Pattern
    from attnprobe.report.datatypes import Run
    from attnprobe.report.writer import _with_flags, extreme_table, flagged_table, layer_means

    heads = _with_flags(result.heads)
    meta = {"kind": "show", "model": result.meta.get("model", {}), "thresholds": {
        k: getattr(thresholds, k) for k in ("entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse")}}
    run = Run(Path(result.out_dir or "."), "sentence", meta, heads, layer_means(heads), flagged_table(heads, thresholds))
    run.patterns = [Pattern(row=0, tokens=list(result.tokens), probs=result.pattern.probs, plain=result.pattern.plain)]
    run.extremes = extreme_table(heads)
    return run
