"""Where scan's time goes: the metric share of a scan forward, a torch.profiler table, and each metric's cost.

Three measurements on one fixed-length batch (the inputs of bench_scan.py):

1. the seconds inside ``Probe.observe`` (the streaming metrics) against the whole ``forward_batch``, and a
   plain eager forward of the same batch, interleaved over ``--repeats``;
2. ``torch.profiler`` on one scan forward: the top operators by self CPU time, grouped by input shape;
3. the cost of each piece of ``metrics.query_metrics`` / ``query_sums`` on one head chunk of the shape the
   probe uses, next to an equivalent formulation (checked to agree), interleaved, median of repeats;
4. ``--parts layer``: one layer's probe time before the 2026-12-02 probe rewrite (``bench_scan.BeforeProbe``) and now
   (``Probe.observe`` with the logits, and without them as on the ``output_attentions`` path), and a
   breakdown of both by piece, per layer, interleaved, median of repeats.

Nothing here changes the package; the alternatives are measurements for a possible fix.

    python bench/profile_scan.py --length 512 --batch-size 32
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import BeforeProbe, fixed_batches, load_runner, package_state, special_of  # noqa: E402

from attnprobe.formulas import blocks, metrics  # noqa: E402
from attnprobe.capture import probe as probe_mod  # noqa: E402
from attnprobe.scanning.passes import forward_batch  # noqa: E402
from attnprobe.scanning.scanner import versions  # noqa: E402


class TimedProbe(probe_mod.Probe):
    """A Probe that adds up the seconds spent reducing attention (its ``observe``)."""

    observe_s = 0.0

    def observe(self, module, probs, plain=None):
        t0 = time.perf_counter()
        super().observe(module, probs, plain)
        self.observe_s += time.perf_counter() - t0


class Capture:
    """Stand-in probe that keeps one layer's probabilities."""

    def __init__(self, layer: int):
        self.layer, self.calls, self.probs = layer, 0, None

    def observe(self, module, probs, plain=None):
        if self.calls == self.layer:
            self.probs = probs.clone()
        self.calls += 1


class CaptureLogits(probe_mod.Probe):
    """Stand-in probe that keeps one layer's probabilities and logits (a Probe, so it is handed both)."""

    def __init__(self, num_layers: int, layer: int):
        super().__init__(num_layers)
        self.layer, self.seen, self.probs, self.scores = layer, 0, None, None

    def observe(self, module, probs, plain=None, *, scores=None):
        if self.seen == self.layer:
            self.probs, self.scores = probs.clone(), scores.clone()
        self.seen += 1


def _usage() -> tuple[float, float, int]:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime, u.ru_stime, u.ru_minflt


def share(runner, batch, special, repeats: int) -> dict:
    """Interleaved eager and scan forwards: wall, seconds in Probe.observe, system time, page faults."""
    loaded = runner.loaded
    rows = []
    for r in range(repeats):
        for mode in (("eager", "scan") if r % 2 == 0 else ("scan", "eager")):
            gc.collect()
            u0, s0, f0 = _usage()
            t0 = time.perf_counter()
            with torch.no_grad():
                if mode == "eager":
                    runner.eager(**batch)
                    observe = 0.0
                else:
                    probe = TimedProbe(loaded.num_layers, hops=2)
                    forward_batch(loaded, probe, batch, special)
                    observe = probe.observe_s
            wall = time.perf_counter() - t0
            u1, s1, f1 = _usage()
            rows.append({"mode": mode, "wall_s": wall, "observe_s": observe, "user_s": u1 - u0, "sys_s": s1 - s0,
                         "minor_faults": f1 - f0})
    out = {}
    for mode in ("eager", "scan"):
        these = [x for x in rows if x["mode"] == mode]
        out[mode] = {k: statistics.median(x[k] for x in these) for k in these[0] if k != "mode"}
    return {"eager": out["eager"], "scan": out["scan"], "rows": rows}


def chunking(runner, batch, special, repeats: int) -> dict:
    """One layer's metrics (query_metrics + query_sums, all heads) with chunks of different sizes.

    ``heads`` is what Probe.observe does (whole batch, as many heads as fit CHUNK_ELEMENTS); the others
    also split the batch, to ``rows`` sequences per chunk.
    """
    B, Q = batch["input_ids"].shape
    cap = Capture(layer=runner.loaded.num_layers - 1)
    with torch.no_grad(), probe_mod.capturing(cap):
        runner.loaded.model(**batch)
    probs = cap.probs  # (B, H, Q, K)
    H = probs.shape[1]
    keep = batch["attention_mask"].bool()
    step = max(1, min(H, blocks.CHUNK_ELEMENTS // max(1, B * Q * Q)))

    def run(rows: int):
        for b0 in range(0, B, rows):
            for h0 in range(0, H, step if rows == B else 1):
                h1 = h0 + (step if rows == B else 1)
                p = probs[b0:b0 + rows, h0:h1]
                values = metrics.query_metrics(p, keep[b0:b0 + rows], special[b0:b0 + rows], 2)
                metrics.query_sums(values, keep[b0:b0 + rows])

    variants = {f"heads (probe now: {B} seqs x {step} head)": B}
    for rows in (8, 2, 1):
        if rows < B:
            variants[f"{rows} seqs x 1 head"] = rows
    times = {name: [] for name in variants}
    usage = {name: [] for name in variants}
    for _ in range(repeats):
        for name, rows in variants.items():
            gc.collect()
            u0, s0, f0 = _usage()
            t0 = time.perf_counter()
            run(rows)
            times[name].append(time.perf_counter() - t0)
            u1, s1, f1 = _usage()
            usage[name].append((s1 - s0, f1 - f0))
    layers = runner.loaded.num_layers
    out = {}
    for name, rows in variants.items():
        sec = statistics.median(times[name])
        chunk = rows * (step if rows == B else 1) * Q * Q
        out[name] = {"rows": rows, "chunk_mib": chunk * 4 / 2**20, "layer_s": sec, "batch_s": sec * layers,
                     "sys_s": statistics.median(u[0] for u in usage[name]),
                     "minor_faults": statistics.median(u[1] for u in usage[name])}
    return out


def profile_table(runner, batch, special, limit: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    probe = probe_mod.Probe(runner.loaded.num_layers, hops=2)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, torch.no_grad():
        forward_batch(runner.loaded, probe, batch, special)
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=limit, max_name_column_width=24, max_shapes_column_width=70)


def pieces(p: torch.Tensor, keep: torch.Tensor, special: torch.Tensor) -> dict:
    """Named (package's, alternative) callables on one head chunk ``p`` (B, h, Q, K); None: no alternative.

    The alternative for the direct entropy needs the scores ``S`` (``A = softmax(S)``), which the probe does
    not receive: ``H(A_i) = logsumexp(S_i) - sum_k A_ik S_ik``. It is timed on scores of the same shape
    (the cost does not depend on the values) and checked against xlogy on ``softmax`` of those scores.
    """
    multi = metrics.multi_hop(p, 2)
    values = metrics.query_metrics(p, keep, special, 2)
    torch.manual_seed(0)
    scores = torch.randn_like(p) * 4
    soft = torch.softmax(scores, -1)
    return {
        "multi_hop A@A": (lambda: metrics.multi_hop(p, 2), None),
        "entropy via xlogy (called twice)": (lambda: metrics.entropy(p), lambda: torch.special.entr(p).sum(-1)),
        "entropy: xlogy vs -(p * log(clamp(p)))": (
            lambda: metrics.entropy(p), lambda: -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)),
        "torch.log(p) alone (vectorized; reference)": (lambda: p.log(), None),
        "entropy of softmax(S): xlogy vs from S": (
            lambda: metrics.entropy(soft), lambda: torch.logsumexp(scores, -1) - (soft * scores).sum(-1)),
        "gtd": (lambda: metrics.gtd(p, multi), None),
        "special_mass": (lambda: metrics.special_mass(p, special[:, None, :]), None),
        "sink_mass": (lambda: metrics.sink_mass(p, keep[:, None, :]), None),
        "self/local/first mass": (
            lambda: (metrics.self_mass(p), metrics.local_mass(p), metrics.first_mass(p)), None),
        "query_sums": (lambda: metrics.query_sums(values, keep), None),
        "query_metrics (all, unreduced)": (lambda: metrics.query_metrics(p, keep, special, 2), None),
    }


def _max_diff(a, b) -> float:
    if isinstance(a, tuple):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


def micro(runner, batch, special, repeats: int) -> dict:
    B, Q = batch["input_ids"].shape
    H = runner.loaded.num_heads
    cap = Capture(layer=runner.loaded.num_layers - 1)
    with torch.no_grad(), probe_mod.capturing(cap):
        runner.loaded.model(**batch)
    step = max(1, min(H, blocks.CHUNK_ELEMENTS // max(1, B * Q * Q)))  # as Probe.observe chunks heads
    chunks_per_batch = -(-H // step) * runner.loaded.num_layers
    p = cap.probs[:, :step].contiguous()  # (B, step, Q, K)
    keep = batch["attention_mask"].bool()
    out = {"chunk_shape": list(p.shape), "chunks_per_batch": chunks_per_batch, "pieces": {}}
    named = pieces(p, keep, special)
    times: dict[str, list[float]] = {f"{n}|{k}": [] for n in named for k in ("now", "alt") if k == "now" or named[n][1]}
    for _ in range(repeats):
        for name, (now, alt) in named.items():
            for kind, fn in (("now", now), ("alt", alt)):
                if fn is None:
                    continue
                gc.collect()
                t0 = time.perf_counter()
                fn()
                times[f"{name}|{kind}"].append(time.perf_counter() - t0)
    for name, (now, alt) in named.items():
        row = {"now_ms": 1e3 * statistics.median(times[f"{name}|now"])}
        row["now_s_per_batch"] = row["now_ms"] / 1e3 * chunks_per_batch
        if alt is not None:
            row["alt_ms"] = 1e3 * statistics.median(times[f"{name}|alt"])
            row["alt_s_per_batch"] = row["alt_ms"] / 1e3 * chunks_per_batch
            row["alt_max_abs_diff"] = _max_diff(now(), alt())
        out["pieces"][name] = row
    return out


def _median_ms(fn, setup=None, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def layer_pieces(probs, scores, keep, special, repeats: int) -> dict:
    """Per-layer milliseconds of each piece, before (one old block, x blocks) and now (one new block, x blocks)."""
    B, H, Q, K = probs.shape
    # before: the old blocking (1 MiB of heads across the batch) and the pure functions
    h_step = max(1, min(H, BeforeProbe.CHUNK // max(1, B * Q * K)))
    b_step = B if B * Q * K <= BeforeProbe.CHUNK else max(1, BeforeProbe.CHUNK // max(1, Q * K))
    old_blocks = -(-B // b_step) * -(-H // h_step)
    p, kb, sb = probs[:b_step, :h_step], keep[:b_step], special[:b_step]
    multi = metrics.multi_hop(p, 2)
    values = metrics.query_metrics(p, kb, sb, 2)
    spare = torch.empty_like(multi)
    before = {
        "A @ A": lambda: metrics.multi_hop(p, 2),
        "direct entropy": lambda: metrics.direct_entropy(p),
        "indirect entropy": lambda: metrics.indirect_entropy(multi),
        "gtd": (lambda: 0.5 * torch.linalg.vector_norm(spare.sub_(p), ord=1, dim=-1), lambda: spare.copy_(multi)),
        "special mass": lambda: metrics.special_mass(p, sb[:, None, :]),
        "self/local/first/sink mass": lambda: (metrics.self_mass(p), metrics.local_mass(p), metrics.first_mass(p),
                                               metrics.sink_mass(p, kb[:, None, :])),
        "reduction (query_sums)": lambda: metrics.query_sums(values, kb),
        "total": lambda: metrics.query_sums(metrics.query_metrics(p, kb, sb, 2), kb),
    }
    # now: the probe's blocking and block_sums' pieces on the same scratch buffers
    b0, b1, h0, h1 = blocks.blocks(B, H, Q * K)[0]
    new_blocks = len(blocks.blocks(B, H, Q * K))
    q, s, kq, sq = probs[b0:b1, h0:h1], scores[b0:b1, h0:h1], keep[b0:b1], special[b0:b1]
    scratch = blocks.Scratch()
    m, w = scratch.get("multi", q), scratch.get("work", q)
    torch.matmul(q, q, out=m)
    m_copy = m.clone()
    sf = sq[:, None, None, :].to(q.dtype)
    now = {
        "A @ A": lambda: torch.matmul(q, q, out=m),
        "direct entropy": lambda: blocks.entropy_from_scores(q, s, w),
        "direct entropy, no logits (log path)": lambda: blocks.entropy_into(q, w),
        "indirect entropy": lambda: blocks.entropy_into(m_copy, w),
        "gtd": (lambda: m.sub_(q).abs_().sum(-1).mul_(0.5), lambda: m.copy_(m_copy)),
        "special mass": lambda: torch.mul(q, sf, out=w).sum(-1),
        "self/local/first/sink mass": lambda: (metrics.self_mass(q), metrics.local_mass(q), metrics.first_mass(q),
                                               metrics.sink_mass(q, kq[:, None, :])),
        "total": lambda: blocks.block_sums(q, kq, sq, 2, scores=s, scratch=scratch),
        "total, no logits": lambda: blocks.block_sums(q, kq, sq, 2, scratch=scratch),
    }
    out = {"before_block": list(p.shape), "before_blocks_per_layer": old_blocks,
           "now_block": list(q.shape), "now_blocks_per_layer": new_blocks, "pieces": {}}
    times: dict[str, dict[str, list[float]]] = {}
    for _ in range(repeats):  # interleaved: each piece before, then now, every repeat
        for name in dict.fromkeys([*before, *now]):
            for kind, table, blocks in (("before", before, old_blocks), ("now", now, new_blocks)):
                if name in table:
                    fn = table[name]
                    fn, setup = fn if isinstance(fn, tuple) else (fn, None)
                    times.setdefault(name, {}).setdefault(kind, []).append(_median_ms(fn, setup, 1) * blocks)
    for name, kinds in times.items():
        out["pieces"][name] = {f"{k}_ms_per_layer": statistics.median(v) for k, v in kinds.items()}
    for kind in ("before", "now"):
        parts = sum(r.get(f"{kind}_ms_per_layer", 0.0) for n, r in out["pieces"].items()
                    if not n.startswith("total") and "no logits" not in n)
        out["pieces"].setdefault("rest (reductions, small ops)", {})[f"{kind}_ms_per_layer"] = (
            out["pieces"]["total"][f"{kind}_ms_per_layer"] - parts)
    return out


def layer_times(runner, batch, special, repeats: int) -> dict:
    """One layer's whole probe time (every block, assembly): before, now with logits, now without."""
    cap = CaptureLogits(runner.loaded.num_layers, layer=runner.loaded.num_layers - 1)
    with torch.no_grad(), probe_mod.capturing(cap):
        runner.loaded.model(**batch)
    probs, scores = cap.probs, cap.scores
    keep = batch["attention_mask"].bool()
    probes = {"before (BeforeProbe)": BeforeProbe(1), "now (Probe, logits)": probe_mod.Probe(1),
              "now (Probe, no logits)": probe_mod.Probe(1)}
    for pr in probes.values():
        pr.begin(keep, special)

    def run(name):
        pr = probes[name]
        pr._batch = []
        pr.observe(None, probs, scores=scores if name == "now (Probe, logits)" else None)
        return pr._batch[0]

    sums = {name: run(name) for name in probes}
    diff = max(float((sums["now (Probe, logits)"][k] - sums["before (BeforeProbe)"][k]).abs().max() /
                     max(1.0, float(sums["before (BeforeProbe)"]["queries"].max())))
               for k in metrics.QUERY_METRICS)
    times = {name: [] for name in probes}
    for _ in range(repeats):
        for name in probes:
            gc.collect()
            t0 = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - t0)
    return {"layer_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
            "layer_ms_range": {n: [1e3 * min(t), 1e3 * max(t)] for n, t in times.items()},
            "max_abs_diff_of_per_query_means_now_vs_before": diff,
            "pieces": layer_pieces(probs, scores, keep, special, repeats)}


def report_layer(res, runner, batch, special, args) -> None:
    res["layer"] = r = layer_times(runner, batch, special, args.micro_repeats)
    print(f"\none layer's probe, {tuple(batch['input_ids'].shape)} x {runner.loaded.num_heads} heads, median of "
          f"{args.micro_repeats} (interleaved); now vs before, per-query means differ by at most "
          f"{r['max_abs_diff_of_per_query_means_now_vs_before']:.1e}:")
    for name, ms in r["layer_ms"].items():
        lo, hi = r["layer_ms_range"][name]
        print(f"  {name:<28}{ms:8.1f} ms/layer  (range {lo:.1f}-{hi:.1f})")
    pc = r["pieces"]
    print(f"  by piece, ms per layer: before = block {tuple(pc['before_block'])} x {pc['before_blocks_per_layer']}, "
          f"now = block {tuple(pc['now_block'])} x {pc['now_blocks_per_layer']}")
    for name, row in pc["pieces"].items():
        b, n = row.get("before_ms_per_layer"), row.get("now_ms_per_layer")
        print(f"  {name:<40}{'' if b is None else f'{b:8.1f}':>8}{'' if n is None else f'{n:8.1f}':>8}")


def report_share(res, runner, batch, special, args) -> None:
    res["share"] = s = share(runner, batch, special, args.repeats)
    e, sc = s["eager"], s["scan"]
    print(f"\nmedians of {args.repeats}, interleaved: eager forward {e['wall_s']:.2f}s (sys {e['sys_s']:.2f}s, "
          f"{e['minor_faults']:.0f} minor faults); scan forward_batch {sc['wall_s']:.2f}s (sys {sc['sys_s']:.2f}s, "
          f"{sc['minor_faults']:.0f} minor faults), of which Probe.observe {sc['observe_s']:.2f}s = "
          f"{sc['observe_s'] / sc['wall_s']:.0%}; scan/eager throughput {e['wall_s'] / sc['wall_s']:.3f}")


def report_chunking(res, runner, batch, special, args) -> None:
    res["chunking"] = c = chunking(runner, batch, special, args.micro_repeats)
    print(f"\none layer's metrics (query_metrics + query_sums, all heads) by chunk size, median of "
          f"{args.micro_repeats}, x{runner.loaded.num_layers} layers = s/batch:")
    for name, row in c.items():
        print(f"  {name:<34} chunk {row['chunk_mib']:6.1f} MiB  {row['layer_s']:6.2f}s/layer  {row['batch_s']:6.2f}s/batch"
              f"  sys {row['sys_s']:5.2f}s  minor faults {row['minor_faults']:.0f}")


def report_micro(res, runner, batch, special, args) -> None:
    res["micro"] = m = micro(runner, batch, special, args.micro_repeats)
    print(f"\nmetric pieces on one head chunk {tuple(m['chunk_shape'])} ({m['chunks_per_batch']} chunks per batch), "
          f"median of {args.micro_repeats}:")
    print(f"  {'piece':<42}{'ms/chunk':>10}{'s/batch':>9}{'alt ms':>9}{'alt s/b':>9}{'alt diff':>10}")
    for name, row in m["pieces"].items():
        alt = (f"{row['alt_ms']:>9.1f}{row['alt_s_per_batch']:>9.2f}{row['alt_max_abs_diff']:>10.1e}"
               if "alt_ms" in row else "")
        print(f"  {name:<42}{row['now_ms']:>10.1f}{row['now_s_per_batch']:>9.2f}{alt}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of eager/scan forwards")
    ap.add_argument("--micro-repeats", type=int, default=5, help="repeats of each metric piece")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=25, help="profiler rows to print")
    ap.add_argument("--parts", nargs="+", default=["share", "chunking", "micro", "profiler"],
                    choices=["share", "chunking", "micro", "profiler", "layer"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = load_runner(args.model, args.device, {"scan", "eager"})
    cpu_batch = fixed_batches(runner.tokenizer, args.length, args.batch_size, 1)[0]
    batch = {k: v.to(runner.device) for k, v in cpu_batch.items()}
    special = special_of(cpu_batch, runner.tokenizer).to(runner.device)
    print(f"torch threads {torch.get_num_threads()}, versions {versions()}, package {package_state()}, "
          f"L={args.length}, B={args.batch_size}")
    with torch.no_grad():  # warm-up of the timed paths
        if {"share", "profiler"} & set(args.parts):
            forward_batch(runner.loaded, probe_mod.Probe(runner.loaded.num_layers), batch, special)
            runner.eager(**batch)
    res = {"length": args.length, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
           "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
           "command": " ".join(["python", *sys.argv]), "package": package_state()}
    if "share" in args.parts:
        report_share(res, runner, batch, special, args)
    if "chunking" in args.parts:
        report_chunking(res, runner, batch, special, args)
    if "micro" in args.parts:
        report_micro(res, runner, batch, special, args)
    if "layer" in args.parts:
        report_layer(res, runner, batch, special, args)
    if "profiler" in args.parts:
        table = profile_table(runner, batch, special, args.rows)
        res["profiler_table"] = table
        print("\ntorch.profiler, one scan forward_batch:\n" + table)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
