"""Scan throughput and peak memory against a plain eager forward pass and the naive approach (DESIGN §5).

Every mode runs the same fixed-length batches (sample-corpus text, exactly L tokens, no padding) under
``torch.no_grad()``:

    eager              plain eager forward of an ``attn_implementation="eager"`` copy of the weights
    scan               ``attnprobe.scanning.passes.forward_batch``: the forward with the streaming metrics as a scan runs
                       every pass after its first: ended at the last layer's attention (``stop_early``), logits
                       and probabilities in the probe's buffers (``Probe.reuse_buffers``); a fresh probe (and so
                       fresh buffers) per batch here
    scan_whole         the same with whole passes and fresh tensors (how ``scan`` was measured before 2026-12-03)
    scan_compiled      the same with ``scan --compile on``'s compiled per-block metrics (attnprobe/compiled.py),
                       compiled and checked once per length before the timing
    scan_before        the same forward with the probe of before the 2026-12-02 probe rewrite (``BeforeProbe``: the pure metric
                       functions on 1 MiB blocks, xlogy entropies, no logits), for before/after in one run
    naive              eager forward with ``output_attentions=True``, then python loops over examples and
                       heads computing the same metrics on each ``(n, n)`` matrix with plain torch ops
    output_attentions  eager forward with ``output_attentions=True`` only (the memory reference)

Timing interleaves the modes (their order rotates every repeat) and reports the median seconds per batch;
the ratios come from those medians, all measured in one run. Peak memory runs each mode once in a fresh
subprocess of this script (``--memory-mode``), before the parent loads any model. ``--sst2`` also times a
real ``attnprobe.scanning.scanner.scan`` over a GLUE file. This script measures; it changes nothing in the package.

    python bench/bench_scan.py --lengths 128 --batches 3 --repeats 3

``--sequences N`` sets the batches to cover N sequences (e.g. 10,000 on a GPU, ``bench/gpu_check.sh``);
``--dtype bfloat16`` runs both models in that precision.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from attnprobe.data import sources
from attnprobe.formulas import metrics
from attnprobe.models import checkpoints, loading
from attnprobe.config import ScanConfig
from attnprobe.capture.probe import Probe, means
from attnprobe.data.batching import effective_max_length, encode_chunk, make_batches  # noqa: E402
from attnprobe.scanning.passes import forward_batch  # noqa: E402
from attnprobe.scanning.scanner import CHUNK_ROWS, scan, versions

MODES = ("eager", "scan", "scan_whole", "scan_compiled", "scan_before", "naive", "output_attentions")
PROBED = {"scan", "scan_whole", "scan_compiled", "scan_before"}
# Throughput ratios reported: key -> (numerator mode, denominator mode), i.e. seconds of num / seconds of den.
RATIOS = {"scan_over_eager": ("eager", "scan"), "scan_over_naive": ("naive", "scan"),
          "scan_before_over_eager": ("eager", "scan_before"), "scan_over_scan_before": ("scan_before", "scan"),
          "scan_compiled_over_eager": ("eager", "scan_compiled"), "scan_compiled_over_scan": ("scan", "scan_compiled"),
          "scan_whole_over_eager": ("eager", "scan_whole"), "scan_over_scan_whole": ("scan_whole", "scan")}
NAIVE_METRICS = ("direct_entropy", "direct_entropy_norm", "indirect_entropy", "indirect_entropy_norm", "gtd",
                 "self_mass", "local_mass", "first_mass", "special_mass", "sink_mass")
WARMUP_ROWS = 2  # sequences in the warm-up batch: enough to initialise kernels, small next to a real batch


# ----------------------------------------------------------------------------------------------- inputs

def package_state() -> dict:
    """The git commit the package was imported from, and any uncommitted change to it (results drift)."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return None

    dirty = git("status", "--porcelain", "--", "attnprobe")
    return {"commit": git("rev-parse", "--short", "HEAD"), "package_changes": dirty.splitlines() if dirty else []}


def token_stream(tokenizer) -> list[int]:
    """Every sample-corpus text (and pair text) tokenized without special tokens, concatenated."""
    ids: list[int] = []
    for chunk in sources.sample_source().chunks():
        pairs = chunk.pairs or [None] * len(chunk.texts)
        for text, pair in zip(chunk.texts, pairs):
            for part in (text, pair):
                if part:
                    ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids


def fixed_batches(tokenizer, length: int, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``batch_size`` sequences of exactly ``length`` tokens: [CLS] text... [SEP].

    Each sequence is a different window of the (repeated) sample-corpus token stream; no padding.
    """
    stream = token_stream(tokenizer)
    body = length - 2
    stride = max(1, len(stream) // max(1, count * batch_size))
    batches = []
    for i in range(count):
        rows = []
        for b in range(batch_size):
            start = ((i * batch_size + b) * stride) % len(stream)
            window = [stream[(start + k) % len(stream)] for k in range(body)]
            rows.append([tokenizer.cls_token_id, *window, tokenizer.sep_token_id])
        input_ids = torch.tensor(rows, dtype=torch.long)  # (B, Q)
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                        "token_type_ids": torch.zeros_like(input_ids)})
    return batches


def special_of(batch: dict[str, torch.Tensor], tokenizer) -> torch.Tensor:
    """``(B, Q)`` bool: the tokenizer's special tokens."""
    ids = torch.tensor(loading.special_token_ids(tokenizer), dtype=torch.long)
    return torch.isin(batch["input_ids"], ids) & batch["attention_mask"].bool()


def head_rows(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    return {k: v[:rows] for k, v in batch.items()}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ naive mode

def naive_metrics(attentions, keep: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """Per-(layer, example, head) means of the scan metrics, one ``(n, n)`` matrix at a time.

    The straightforward version a user would write from ``output_attentions``: ``(L, B, H, 10)`` float64,
    columns as ``NAIVE_METRICS``.
    """
    L, (B, H) = len(attentions), attentions[0].shape[:2]
    out = torch.empty(L, B, H, len(NAIVE_METRICS), dtype=torch.float64)
    for layer, probs in enumerate(attentions):  # probs (B, H, Q, K)
        for b in range(B):
            n = int(keep[b].sum())
            log_n = math.log(n)
            spec = special[b, :n].to(probs.device)
            for h in range(H):
                A = probs[b, h, :n, :n]  # (n, n)
                h_dir = -torch.special.xlogy(A, A).sum(-1)
                M = A @ A
                h_ind = -torch.special.xlogy(M, M).sum(-1)
                gtd = 0.5 * (M - A).abs().sum(-1)
                local = torch.zeros(n, dtype=A.dtype, device=A.device)
                local[1:] += A.diagonal(-1)
                local[:-1] += A.diagonal(1)
                out[layer, b, h] = torch.stack([
                    h_dir.mean(), h_dir.mean() / log_n, h_ind.mean(), h_ind.mean() / log_n, gtd.mean(),
                    A.diagonal().mean(), local.mean(), A[:, 0].mean(), A[:, spec].sum(-1).mean(),
                    A.mean(0).max(),
                ]).to(torch.float64).cpu()
    return out


# ---------------------------------------------------------------------------------------- before probe

class BeforeProbe(Probe):
    """The probe as it was before the 2026-12-02 probe rewrite: ``query_metrics`` + ``query_sums`` on 1 MiB blocks of heads.

    Kept here only to measure before and after in one run; it ignores the logits the attention passes.
    """

    CHUNK = 1 << 18

    def observe(self, module, probs, plain=None, *, scores=None):
        self.calls += 1
        if self._keep is None:
            return
        B, H, Q, K = probs.shape
        keep, special = self._keep, self._special
        h_step = max(1, min(H, self.CHUNK // max(1, B * Q * K)))
        b_step = B if B * Q * K <= self.CHUNK else max(1, self.CHUNK // max(1, Q * K))
        rows = []
        for b0 in range(0, B, b_step):
            kb = keep[b0:b0 + b_step]
            sb = special[b0:b0 + b_step] if special is not None else None
            parts = []
            for h0 in range(0, H, h_step):
                p = probs[b0:b0 + b_step, h0:h0 + h_step].to(self.metric_dtype)
                values = metrics.query_metrics(p, kb, sb, self.hops)
                parts.append({k: v.cpu() for k, v in metrics.query_sums(values, kb).items()})
                del values, p
            rows.append({k: torch.cat([part[k] for part in parts], dim=1) for k in parts[0]})
        sums = {k: torch.cat([row[k] for row in rows], dim=0) for k in rows[0]}
        sums["bp_shift"] = torch.full_like(sums["queries"], float("nan"))
        self._batch.append(sums)


# ---------------------------------------------------------------------------------------------- modes

class Runner:
    """The models and the one call per mode."""

    def __init__(self, loaded, eager, tokenizer, device: torch.device):
        self.loaded, self.eager, self.tokenizer, self.device = loaded, eager, tokenizer, device
        self.compiled = None  # compiled.MetricsPath of scan_compiled, prepared on first use per length

    def prepare_compiled(self, length: int) -> dict:
        from attnprobe.formulas import compiled

        self.compiled = compiled.prepare("on", self.device, torch.float32, self.loaded.num_heads, length)
        if self.compiled.name != "compiled":
            raise SystemExit(f"scan_compiled: the compiled metrics are not used here: {self.compiled.info['reason']}")
        return self.compiled.info

    def run(self, mode: str, batch: dict[str, torch.Tensor], special: torch.Tensor):
        with torch.no_grad():
            if mode == "eager":
                return self.eager(**batch)
            if mode in PROBED:
                probe = (BeforeProbe if mode == "scan_before" else Probe)(self.loaded.num_layers, hops=2)
                if mode == "scan_compiled":
                    probe.block_fn = self.compiled.block_fn
                # scan, scan_compiled: as a scan after its first batch, the pass ends at the last attention and
                # the logits and probabilities go into the probe's buffers (scan_whole, scan_before: whole
                # passes, fresh tensors).
                as_scan = mode in ("scan", "scan_compiled")
                probe.reuse_buffers = as_scan
                forward_batch(self.loaded, probe, batch, special, stop_early=as_scan)
                return probe
            if mode == "output_attentions":
                return self.eager(**batch, output_attentions=True)
            if mode == "naive":
                out = self.eager(**batch, output_attentions=True)
                return naive_metrics(out.attentions, batch["attention_mask"].bool(), special)
        raise ValueError(mode)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def load_runner(model: str, device: str, need: set[str], dtype: str = "float32") -> Runner:
    """Load attnprobe's model (for ``scan``) and/or a plain eager copy of the same weights."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    path, _, _ = checkpoints.resolve_model(model)
    loaded = eager = None
    if need & PROBED:
        loaded = loading.load_model(model, device=device, dtype=dtype)
        if loaded.backend != "attnprobe":
            raise SystemExit(f"{model} runs backend {loaded.backend!r}, not the streamed 'attnprobe' one")
    torch_device = loading.pick_device(device)
    if need - PROBED:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        eager = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True)
        eager.to(torch_device, dtype=getattr(torch, dtype)).eval()
    tokenizer = loaded.tokenizer if loaded is not None else checkpoints.load_tokenizer(path)
    return Runner(loaded, eager, tokenizer, torch_device)


# --------------------------------------------------------------------------------------------- timing

def agreement(runner: Runner, batch, special) -> dict[str, float]:
    """Max |naive - scan| of the per-head means on one batch, and of the two models' hidden states."""
    probe = runner.run("scan", batch, special)
    m = means(probe.totals())
    naive = runner.run("naive", batch, special).mean(1)  # (L, H, 10): every sequence has n = L tokens
    diffs = {name: float((m[name] - naive[..., i]).abs().max()) for i, name in enumerate(NAIVE_METRICS)}
    with torch.no_grad():
        a = runner.loaded.model(**batch).last_hidden_state
        b = runner.eager(**batch).last_hidden_state
    return {"max_abs_diff": max(diffs.values()), "per_metric": diffs,
            "hidden_state_max_abs_diff": float((a - b).abs().max())}


def time_length(runner: Runner, length: int, args) -> dict:
    """Interleaved timing of the chosen modes on the same batches of one length."""
    device = runner.device
    cpu_batches = fixed_batches(runner.tokenizer, length, args.batch_size, args.batches)
    batches = [(to_device(b, device), special_of(b, runner.tokenizer).to(device)) for b in cpu_batches]
    modes = [m for m in MODES if m in args.modes]
    plan = {m: (args.naive_batches or args.batches, args.naive_repeats or args.repeats) if m == "naive"
            else (args.batches, args.repeats) for m in modes}
    result: dict = {"length": length, "batch_size": args.batch_size, "plan": {m: {"batches": p[0], "repeats": p[1]}
                                                                                  for m, p in plan.items()}}
    if "scan" in modes and "naive" in modes:
        small = head_rows(batches[0][0], min(4, args.batch_size))
        result["agreement"] = agreement(runner, small, batches[0][1][: small["input_ids"].shape[0]])
        print(f"  naive vs scan per-head means, max abs diff: {result['agreement']['max_abs_diff']:.2e} "
              f"(hidden states attnprobe vs eager: {result['agreement']['hidden_state_max_abs_diff']:.2e})",
              flush=True)
    if "scan_compiled" in modes:
        result["compiled"] = runner.prepare_compiled(length)
        print(f"  scan_compiled: compiled in {result['compiled']['compile_s']:.1f}s", flush=True)
        if "scan" in modes:
            now = means(runner.run("scan", *batches[0]).totals())
            comp = means(runner.run("scan_compiled", *batches[0]).totals())
            diffs = {k: float((now[k] - comp[k]).abs().max()) for k in NAIVE_METRICS}
            result["agreement_compiled"] = {"max_abs_diff": max(diffs.values()), "per_metric": diffs}
            print(f"  scan vs scan_compiled per-head means, max abs diff: {max(diffs.values()):.2e} "
                  f"({max(diffs, key=diffs.get)})", flush=True)
    if "scan" in modes and "scan_before" in modes:  # the same numbers before and after, on a full batch
        now = means(runner.run("scan", *batches[0]).totals())
        before = means(runner.run("scan_before", *batches[0]).totals())
        diffs = {k: float((now[k] - before[k]).abs().max()) for k in NAIVE_METRICS}
        result["agreement_before"] = {"max_abs_diff": max(diffs.values()), "per_metric": diffs}
        print(f"  scan vs scan_before per-head means, max abs diff: {max(diffs.values()):.2e} "
              f"({max(diffs, key=diffs.get)})", flush=True)
    for mode in modes:  # warm-up on a small slice: kernels and thread pools, not counted
        runner.run(mode, head_rows(batches[0][0], WARMUP_ROWS), batches[0][1][:WARMUP_ROWS])
    # Finest interleaving: for every batch, each mode once (order rotating), so the paired ratios of
    # one batch see the same machine load; the shared CPUs make whole-block timings drift by 2-3x.
    times: dict[str, list[float]] = {m: [] for m in modes}
    pairs: dict[str, list[float]] = {key: [] for key in RATIOS}
    step = 0
    for r in range(max(p[1] for p in plan.values())):
        for i, (batch, special) in enumerate(batches):
            order = modes[step % len(modes):] + modes[: step % len(modes)]
            step += 1
            these = {}
            for mode in order:
                n_batches, n_repeats = plan[mode]
                if r >= n_repeats or i >= n_batches:
                    continue
                gc.collect()
                runner.sync()
                t0 = time.perf_counter()
                out = runner.run(mode, batch, special)
                runner.sync()
                these[mode] = time.perf_counter() - t0
                del out
            for mode, t in these.items():
                times[mode].append(t)
            for key, (num, den) in RATIOS.items():
                if num in these and den in these:
                    pairs[key].append(these[num] / these[den])
            if not args.quiet_batches or i == len(batches) - 1:
                print(f"  L={length} repeat {r + 1} batch {i + 1}: "
                      + "  ".join(f"{m} {these[m]:.2f}s" for m in order if m in these), flush=True)
    rows = {}
    for mode in modes:
        sec = statistics.median(times[mode])
        rows[mode] = {"sec_per_batch": sec, "seq_per_s": args.batch_size / sec, "min_s": min(times[mode]),
                      "total_s": sum(times[mode]), "sequences": args.batch_size * len(times[mode]),
                      "all_s": times[mode]}
    result["modes"] = rows
    for key, (num, den) in RATIOS.items():
        if num in rows and den in rows and pairs[key]:
            result[key] = rows[num]["sec_per_batch"] / rows[den]["sec_per_batch"]
            result[f"{key}_paired"] = pairs[key]
            result[f"{key}_paired_median"] = statistics.median(pairs[key])
            result[f"{key}_min"] = rows[num]["min_s"] / rows[den]["min_s"]  # the least-disturbed batches
    return result


TARGETS = {"scan_over_eager": {128: 0.85, 512: 0.45}, "scan_compiled_over_eager": {128: 0.85, 512: 0.45},
           "scan_over_naive": {512: 3.0}}
LABELS = {"scan_over_eager": "scan/eager throughput", "scan_over_naive": "scan/naive throughput",
          "scan_before_over_eager": "scan_before/eager throughput", "scan_over_scan_before": "scan/scan_before speed-up",
          "scan_compiled_over_eager": "scan_compiled/eager throughput",
          "scan_compiled_over_scan": "scan_compiled/scan speed-up",
          "scan_whole_over_eager": "scan_whole/eager throughput",
          "scan_over_scan_whole": "scan/scan_whole speed-up"}


def print_timing(res: dict) -> None:
    L = res["length"]
    print(f"\nL = {L}, batch {res['batch_size']}: seconds per batch (median), sequences/s")
    print(f"  {'mode':<18}{'s/batch':>9}{'seq/s':>9}{'min s':>9}{'total s':>9}  batches x repeats")
    for mode, row in res["modes"].items():
        p = res["plan"][mode]
        print(f"  {mode:<18}{row['sec_per_batch']:>9.3f}{row['seq_per_s']:>9.2f}{row['min_s']:>9.3f}"
              f"{row['total_s']:>9.2f}  {p['batches']} x {p['repeats']} ({row['sequences']} sequences in all)")
    for key, label in LABELS.items():
        if key in res:
            target = TARGETS.get(key, {}).get(L)
            verdict = "" if target is None else f"  target >= {target}: {'met' if res[key] >= target else 'NOT met'}"
            paired = res[f"{key}_paired"]
            print(f"  {label}: {res[key]:.3f} from the medians; paired per batch: median "
                  f"{res[f'{key}_paired_median']:.3f}, range {min(paired):.3f}-{max(paired):.3f} (n={len(paired)}); from the fastest batches {res[f'{key}_min']:.3f}{verdict}")


# --------------------------------------------------------------------------------------------- memory

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs`` 5), so ru_maxrss restarts from now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(args) -> None:
    """One mode, one length, a fresh process: print a JSON line with the peak RSS increase of one batch."""
    mode, length = args.memory_mode, args.length
    runner = load_runner(args.model, args.device, {mode}, args.dtype)
    batch_cpu = fixed_batches(runner.tokenizer, length, args.batch_size, 1)[0]
    batch, special = to_device(batch_cpu, runner.device), special_of(batch_cpu, runner.tokenizer).to(runner.device)
    ru_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner.run(mode, head_rows(batch, WARMUP_ROWS), special[:WARMUP_ROWS])
    gc.collect()
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak()  # the load's transient peak would otherwise hide part of the batch's
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda = runner.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    out = runner.run(mode, batch, special)
    runner.sync()
    ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = {
        "mode": mode, "length": length, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "rss_after_load_warmup_kib": rss_before, "ru_maxrss_after_load_kib": ru_after_load,
        "ru_maxrss_before_kib": ru_before, "ru_maxrss_after_kib": ru_after, "peak_reset": reset,
        "peak_increase_bytes": (ru_after - ru_before) * 1024,
        "vmhwm_increase_bytes": (_status_kib("VmHWM") - rss_before) * 1024,
    }
    if cuda:
        record["cuda_peak_increase_bytes"] = torch.cuda.max_memory_allocated() - cuda_before
    del out
    print("MEMORY " + json.dumps(record), flush=True)


def memory_length(length: int, args) -> dict:
    """Run every chosen mode at one length in its own subprocess; peak increases in layer-attention units."""
    layer_bytes = args.batch_size * args.heads * length * length * 4  # one layer's (B, H, Q, K) float32
    rows = {}
    for mode in [m for m in MODES if m in args.modes]:
        cmd = [sys.executable, __file__, "--memory-mode", mode, "--length", str(length), "--batch-size",
               str(args.batch_size), "--model", args.model, "--device", args.device, "--dtype", args.dtype]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"memory child {mode} L={length} failed:\n{proc.stderr[-3000:]}")
        rec = json.loads(lines[-1][len("MEMORY "):])
        rec["wall_s"] = time.perf_counter() - t0
        key = "cuda_peak_increase_bytes" if "cuda_peak_increase_bytes" in rec else "peak_increase_bytes"
        rec["peak_layers"] = rec[key] / layer_bytes
        rows[mode] = rec
        print(f"  memory L={length} {mode:<17} +{rec[key] / 2**20:8.1f} MiB = {rec['peak_layers']:5.2f} layers' "
              f"attention ({rec['wall_s']:.0f}s)", flush=True)
    res = {"length": length, "batch_size": args.batch_size, "layer_attention_bytes": layer_bytes, "modes": rows}
    if "scan" in rows and "eager" in rows:
        res["scan_minus_eager_layers"] = rows["scan"]["peak_layers"] - rows["eager"]["peak_layers"]
    if "scan" in rows and "output_attentions" in rows:
        res["output_attentions_minus_scan_layers"] = (rows["output_attentions"]["peak_layers"]
                                                      - rows["scan"]["peak_layers"])
    return res


def print_memory(res: dict) -> None:
    L, lb = res["length"], res["layer_attention_bytes"]
    print(f"\nL = {L}, batch {res['batch_size']}: peak RSS increase of one batch (fresh process per mode); "
          f"one layer's attention = B*H*L*L*4 = {lb / 2**20:.1f} MiB")
    print(f"  {'mode':<18}{'after load':>12}{'peak +MiB':>11}{'layers':>8}  (ru_maxrss; VmHWM check)")
    for mode, r in res["modes"].items():
        print(f"  {mode:<18}{r['rss_after_load_warmup_kib'] / 1024:>11.0f}M{r['peak_increase_bytes'] / 2**20:>11.1f}"
              f"{r['peak_layers']:>8.2f}  ({r['vmhwm_increase_bytes'] / 2**20:.1f} MiB)")
    if "scan_minus_eager_layers" in res:
        d = res["scan_minus_eager_layers"]
        print(f"  scan - eager: {d:+.2f} layers' attention; target within 2: {'met' if d <= 2 else 'NOT met'}")
    if "output_attentions_minus_scan_layers" in res:
        print(f"  output_attentions - scan: {res['output_attentions_minus_scan_layers']:+.2f} layers' attention")


# ---------------------------------------------------------------------------------------------- SST-2

def sst2_bench(runner: Runner, args) -> dict:
    """A real scan() over a GLUE file, then eager and scan forwards alternated over the same batches."""
    cfg = ScanConfig(model=args.model, data=args.sst2, limit=args.sst2_limit, batch_size=args.batch_size,
                     device=args.device)
    t0 = time.perf_counter()
    result = scan(cfg, loaded=runner.loaded)
    scan_wall = time.perf_counter() - t0
    rows = result.meta["data"]["sequences_scanned"]
    print(f"  scan() over {args.sst2}: {rows} sequences, {result.meta['data']['tokens']} tokens, "
          f"{scan_wall:.1f}s = {rows / scan_wall:.1f} seq/s", flush=True)

    # The same batches scan() made (same chunks, tokenization, sorting, dynamic padding), forward only.
    loaded = runner.loaded
    tok = loaded.tokenizer
    source = sources.open_source(args.sst2)
    max_length = effective_max_length(loaded, None)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    special_ids = loading.special_token_ids(tok)
    prep = eager_s = scan_s = 0.0
    batches = 0
    probe = Probe(loaded.num_layers, hops=2)
    probe.reuse_buffers = True  # as scan()'s batch loop: the probe's buffers, passes after the first cut short
    t_prep = time.perf_counter()
    for chunk in source.chunks(CHUNK_ROWS, limit=args.sst2_limit):
        enc = encode_chunk(tok, chunk.texts, chunk.pairs, chunk.rows, max_length)
        for batch, special, _ in make_batches(enc, args.batch_size, pad_id, special_ids, loaded.device):
            prep += time.perf_counter() - t_prep
            first, second = ("eager", "scan") if batches % 2 == 0 else ("scan", "eager")
            for mode in (first, second):
                t = time.perf_counter()
                with torch.no_grad():
                    if mode == "eager":
                        runner.eager(**batch)
                    else:
                        forward_batch(loaded, probe, batch, special, stop_early=batches > 0)
                runner.sync()
                if mode == "eager":
                    eager_s += time.perf_counter() - t
                else:
                    scan_s += time.perf_counter() - t
            batches += 1
            t_prep = time.perf_counter()
    res = {"path": args.sst2, "limit": args.sst2_limit, "sequences": rows, "tokens": result.meta["data"]["tokens"],
           "batches": batches, "scan_wall_s": scan_wall, "scan_seq_per_s": rows / scan_wall,
           "prep_s": prep, "eager_forward_s": eager_s, "scan_forward_s": scan_s,
           "eager_pipeline_s": prep + eager_s,
           "forward_ratio": eager_s / scan_s, "end_to_end_ratio": (prep + eager_s) / scan_wall}
    print(f"  same {batches} batches, alternated: eager forward {eager_s:.1f}s, scan forward_batch {scan_s:.1f}s "
          f"(scan/eager throughput {res['forward_ratio']:.3f}); reading+tokenizing+batching {prep:.1f}s")
    print(f"  end to end: eager pipeline {prep + eager_s:.1f}s vs scan() {scan_wall:.1f}s "
          f"(scan/eager throughput {res['end_to_end_ratio']:.3f})")
    return res


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="*", default=[128, 512], help="sequence lengths (none: skip)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=3, help="batches per mode and repeat")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every mode")
    p.add_argument("--naive-batches", type=int, default=None, help="batches for naive (default --batches)")
    p.add_argument("--naive-repeats", type=int, default=None, help="repeats for naive (default --repeats)")
    p.add_argument("--sequences", type=int, default=None,
                   help="set --batches to cover this many sequences (e.g. 10000)")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--quiet-batches", action="store_true", help="print only the last batch of each repeat")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--skip-timing", action="store_true", help="only the memory subprocesses")
    p.add_argument("--skip-memory", action="store_true", help="only the timing")
    p.add_argument("--sst2", default=None, help="also time a scan of this GLUE .tsv (e.g. SST-2/train.tsv)")
    p.add_argument("--sst2-limit", type=int, default=None, help="rows of --sst2 to scan (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    p.add_argument("--memory-mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.sequences:
        args.batches = -(-args.sequences // args.batch_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_mode:
        memory_child(args)
        return
    config = loading.load_config(checkpoints.resolve_model(args.model)[0])
    args.heads = config.num_attention_heads
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "versions": versions(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
           "device": str(loading.pick_device(args.device)), "machine": platform.machine(),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "package": package_state()}
    print(f"torch threads: {env['torch_threads']} (interop {env['torch_interop_threads']}), cpus: {env['cpu_count']}, "
          f"device: {env['device']}, versions: {env['versions']}, package at {env['package']['commit']}"
          + (f" with changes {env['package']['package_changes']}" if env['package']['package_changes'] else ""),
          flush=True)
    results: dict = {"env": env, "args": {k: v for k, v in vars(args).items() if k not in ("memory_mode", "length")},
                     "timing": [], "memory": []}
    if not args.skip_memory:  # first, while this process is small: a child's ru_maxrss starts at its parent's
        env["parent_ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for length in args.lengths:
            results["memory"].append(memory_length(length, args))
    runner = None
    if not args.skip_timing and args.lengths or args.sst2:
        need = set(args.modes) | ({"scan", "eager"} if args.sst2 else set())
        runner = load_runner(args.model, args.device, need, args.dtype)
    if not args.skip_timing:
        for length in args.lengths:
            res = time_length(runner, length, args)
            results["timing"].append(res)
            print_timing(res)
    if args.sst2:
        results["sst2"] = sst2_bench(runner, args)
    for res in results["memory"]:
        print_memory(res)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
