"""A real decoder's scan against its eager forward pass, and what its attention shows by layer.

Loads a decoder (default the ``smollm2-135m`` alias: SmolLM2-135M-Instruct, Llama architecture, 30 layers, 9 query
heads over 3 key/value heads) twice from the same folder: with attnprobe's attention function (the scan) and with
transformers' eager attention (the reference forward). Reads the sentences of a GLUE .tsv (SST-2 dev by default),
tokenizes, sorts by length and pads them as a scan does, and runs every batch in both modes, alternating which goes
first, under ``torch.no_grad()``. The scan mode is ``scanning.passes.forward_batch`` under a Probe (its passes end
at the last attention after the first, as in a scan). Prints the ratio of the median seconds per batch and the
quartiles of the per-batch ratios, then runs ``attnprobe.scan`` over the whole file and prints the per-layer
means (direct entropy, GTD, first-position mass, sink mass, flagged heads). Measures; changes nothing.

    python bench/bench_decoder.py --data ../shared/data/glue/SST-2/dev.tsv --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attnprobe  # noqa: E402
from attnprobe.capture.probe import Probe  # noqa: E402
from attnprobe.data import sources  # noqa: E402
from attnprobe.data.batching import effective_max_length, encode_chunk, make_batches  # noqa: E402
from attnprobe.models import checkpoints, loading  # noqa: E402
from attnprobe.scanning.passes import forward_batch  # noqa: E402
from attnprobe.scanning.scanner import versions  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/glue/SST-2/dev.tsv"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", dest="json_out", default=str(ROOT / "bench/results/decoder_smollm2_sst2.json"))
    p.add_argument("--saobp-rows", type=int, default=200,
                   help="rows scanned with plain and with bp-high attention switched in (no training)")
    p.add_argument("--only-saobp", action="store_true", help="skip the timing and the whole-file scan")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.only_saobp:
        loaded = loading.load_model(args.model, device="cpu")
        saobp_switch_in(loaded, args)
        return

    started = time.time()
    loaded = loading.load_model(args.model, device="cpu")
    path, _, _ = checkpoints.resolve_model(args.model)
    from transformers import AutoModel

    with checkpoints.quiet_loading():
        eager = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True).eval()
    load_s = time.time() - started
    source = sources.open_source(args.data)
    texts = [t for chunk in source.chunks() for t in chunk.texts]
    max_length = effective_max_length(loaded, None)
    enc = encode_chunk(loaded.tokenizer, texts, None, list(range(len(texts))), max_length)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    batches = list(make_batches(enc, args.batch_size, pad, checkpoints_special(loaded.tokenizer), loaded.device))
    times = {"eager": [], "scan": []}
    probe = Probe(loaded.num_layers, num_heads=loaded.num_heads)
    probe.reuse_buffers = True
    with torch.no_grad():
        for i, (batch, special, _) in enumerate(batches):
            order = ("eager", "scan") if i % 2 == 0 else ("scan", "eager")
            for mode in order:
                t0 = time.perf_counter()
                if mode == "eager":
                    eager(**batch)
                else:
                    forward_batch(loaded, probe, batch, special, stop_early=probe.passes > 0)
                times[mode].append(time.perf_counter() - t0)
    ratios = sorted(s / e for s, e in zip(times["scan"], times["eager"]))
    q = statistics.quantiles(ratios, n=4)
    tokens = sum(len(x) for x in enc.ids)
    summary = {
        "model": args.model, "data": args.data, "sentences": len(enc.ids), "tokens": tokens,
        "batches": len(batches), "batch_size": args.batch_size, "threads": args.threads,
        "eager_median_s": statistics.median(times["eager"]), "scan_median_s": statistics.median(times["scan"]),
        "eager_total_s": sum(times["eager"]), "scan_total_s": sum(times["scan"]),
        "ratio_of_medians": statistics.median(times["scan"]) / statistics.median(times["eager"]),
        "ratio_of_totals": sum(times["scan"]) / sum(times["eager"]),
        "per_batch_ratio_quartiles": q, "load_s": round(load_s, 1),
    }
    print(f"{args.model} on {len(enc.ids)} sentences ({tokens} tokens, {len(batches)} batches of {args.batch_size}), "
          f"{args.threads} thread(s)")
    print(f"  seconds per batch, median: eager {summary['eager_median_s']:.3f}, scan {summary['scan_median_s']:.3f}; "
          f"scan/eager {summary['ratio_of_medians']:.2f} (totals {summary['ratio_of_totals']:.2f}; "
          f"per-batch quartiles {q[0]:.2f}-{q[2]:.2f})", flush=True)

    t0 = time.time()
    result = attnprobe.scan(loaded.model, data=args.data, tokenizer=loaded.tokenizer, batch_size=args.batch_size)
    summary["scan_command_s"] = round(time.time() - t0, 1)
    layers = result.layers
    flagged = result.heads.groupby("layer")[["entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse"]].sum()
    print(f"  attnprobe.scan of the file: {summary['scan_command_s']} s; per layer:")
    print("  layer  dir_ent_norm  gtd    first_mass  sink_mass  flagged  (collapse, low_gtd, sink)")
    rows = []
    for r in layers.itertuples():
        f = flagged.loc[r.layer]
        rows.append({"layer": int(r.layer), "direct_entropy_norm": r.direct_entropy_norm, "gtd": r.gtd,
                     "first_mass": r.first_mass, "sink_mass": r.sink_mass, "flagged_heads": int(r.flagged_heads),
                     "entropy_collapse": int(f["entropy_collapse"]), "low_gtd": int(f["low_gtd"]), "sink": int(f["sink"])})
        print(f"  {r.layer:5d}  {r.direct_entropy_norm:12.3f}  {r.gtd:.3f}  {r.first_mass:10.3f}  {r.sink_mass:9.3f}  "
              f"{int(r.flagged_heads):7d}  ({int(f['entropy_collapse'])}, {int(f['low_gtd'])}, {int(f['sink'])})")
    summary["layers"] = rows
    summary["rows_not_scored"] = result.meta["data"]["rows_not_scored"]
    summary["versions"] = versions()
    summary["machine"] = platform.machine()
    summary["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(args.json_out).write_text(json.dumps(summary, indent=2, default=float))
    print(f"  wrote {args.json_out}")


def saobp_switch_in(loaded, args) -> None:
    """First-position and sink mass per layer of the first rows, plain and with bp-high switched in untrained."""
    from attnprobe import saobp

    plain = attnprobe.scan(loaded.model, data=args.data, tokenizer=loaded.tokenizer, limit=args.saobp_rows,
                           batch_size=args.batch_size, patterns=0).layers
    saobp.apply(loaded.model, "bp-high")
    refined = attnprobe.scan(loaded.model, data=args.data, tokenizer=loaded.tokenizer, limit=args.saobp_rows,
                             batch_size=args.batch_size, patterns=0).layers
    saobp.remove(loaded.model)
    print(f"  first {args.saobp_rows} rows, plain -> bp-high switched in (untrained): per layer")
    print("  layer  first_mass        sink_mass         dir_ent_norm      bp_shift")
    rows = []
    for a, b in zip(plain.itertuples(), refined.itertuples()):
        rows.append({"layer": int(a.layer), "first_mass": [a.first_mass, b.first_mass],
                     "sink_mass": [a.sink_mass, b.sink_mass],
                     "direct_entropy_norm": [a.direct_entropy_norm, b.direct_entropy_norm], "bp_shift": b.bp_shift})
        print(f"  {a.layer:5d}  {a.first_mass:.3f} -> {b.first_mass:.3f}    {a.sink_mass:.3f} -> {b.sink_mass:.3f}    "
              f"{a.direct_entropy_norm:.3f} -> {b.direct_entropy_norm:.3f}    {b.bp_shift:.3f}")
    mean = lambda df, c: float(df[c].mean())  # noqa: E731
    print(f"  mean over layers: first_mass {mean(plain, 'first_mass'):.3f} -> {mean(refined, 'first_mass'):.3f}, "
          f"sink_mass {mean(plain, 'sink_mass'):.3f} -> {mean(refined, 'sink_mass'):.3f}")
    out = Path(args.json_out).with_name(Path(args.json_out).stem + "_saobp.json")
    out.write_text(json.dumps({"model": args.model, "data": args.data, "rows": args.saobp_rows, "layers": rows,
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1,
                              default=float))
    print(f"  wrote {out}")


def checkpoints_special(tokenizer) -> list[int]:
    return sorted(set(getattr(tokenizer, "all_special_ids", []) or []))


if __name__ == "__main__":
    main()
