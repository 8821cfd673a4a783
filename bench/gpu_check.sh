#!/usr/bin/env bash
# One-call GPU check: the test suite's GPU tests, the scan benchmark on the GPU, scan throughput for 10,000
# sequences at 128 and 512 tokens in float32 and bfloat16 as a ratio to the eager forward (printed as a table
# at the end), and a bfloat16 scan through the CLI.
# Run from the repository root on a machine with a CUDA GPU and torch, transformers and attnprobe installed
# (`pip install -e '.[test]'` after installing a CUDA build of torch). Writes logs under ${OUT:-bench/results}.
# Without a GPU, `GPU_BENCH_DEVICE=cpu GPU_BENCH_SEQUENCES=4 GPU_BENCH_BATCH=2 bash bench/gpu_check.sh` runs
# only the throughput part, on the CPU with a tiny count: a check that the script itself works.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
DEVICE="${GPU_BENCH_DEVICE:-cuda}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
tests_rc=0
if [ "$DEVICE" = cuda ]; then
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" \
        2>&1 | tee "$OUT_DIR/gpu-device.txt" || exit 1
    python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT_DIR/gpu-tests.txt"
    tests_rc=${PIPESTATUS[0]}
    python bench/bench_scan.py --device cuda --lengths 128 512 --batch-size 32 --json "$OUT_DIR/gpu-bench-float32.json" \
        2>&1 | tee "$OUT_DIR/gpu-bench-float32.txt"
fi
# Scan throughput against the eager forward on this device: 10,000 sequences at 128 and 512 tokens, float32 and
# bfloat16, the two modes alternated batch by batch (one pass; the warm-up batch is not counted).
# In float32 also scan --compile on's compiled metrics (scan_compiled; bfloat16 attention takes the plain path).
for dtype in float32 bfloat16; do
    modes="eager scan"
    [ "$dtype" = float32 ] && [ "${GPU_BENCH_COMPILED:-1}" = 1 ] && modes="eager scan scan_compiled"
    python bench/bench_scan.py --device "$DEVICE" --dtype "$dtype" --lengths 128 512 \
        --batch-size "${GPU_BENCH_BATCH:-32}" --sequences "${GPU_BENCH_SEQUENCES:-10000}" --repeats 1 \
        --modes $modes --skip-memory --quiet-batches --json "$OUT_DIR/gpu-throughput-$dtype.json" \
        2>&1 | tee "$OUT_DIR/gpu-throughput-$dtype.txt"
done
python - "$OUT_DIR" <<'PY' 2>&1 | tee "$OUT_DIR/gpu-throughput.txt"
import json, sys
from pathlib import Path
print("scan throughput (seconds for all sequences; scan/eager throughput from the medians, paired median):")
for dtype in ("float32", "bfloat16"):
    path = Path(sys.argv[1]) / f"gpu-throughput-{dtype}.json"
    if not path.exists():
        print(f"  {dtype}: no result ({path} missing)")
        continue
    doc = json.loads(path.read_text())
    for res in doc["timing"]:
        m = res["modes"]
        print(f"  {doc['env']['device']} {dtype:<9} L={res['length']:<4} {m['scan']['sequences']} sequences: "
              f"scan {m['scan']['total_s']:.1f}s, eager {m['eager']['total_s']:.1f}s, scan/eager "
              f"{res['scan_over_eager']:.3f} (paired median {res['scan_over_eager_paired_median']:.3f})")
        if "scan_compiled" in m:
            print(f"  {'':<{len(doc['env']['device'])}} {dtype:<9} L={res['length']:<4} compiled metrics: "
                  f"{m['scan_compiled']['total_s']:.1f}s, scan_compiled/eager {res['scan_compiled_over_eager']:.3f} "
                  f"(paired median {res['scan_compiled_over_eager_paired_median']:.3f})")
PY
if [ "$DEVICE" = cuda ]; then
    python -m attnprobe scan minilm-l6 --device cuda --dtype bfloat16 --out "$OUT_DIR/gpu-scan-bf16" --overwrite --json \
        > "$OUT_DIR/gpu-scan-bf16.json" 2> "$OUT_DIR/gpu-scan-bf16.err"
    echo "gpu tests exit code: $tests_rc"
fi
exit "$tests_rc"
