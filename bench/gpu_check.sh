#!/usr/bin/env bash
# One-call GPU check: the test suite's GPU tests, then the scan benchmark on the GPU in float32 and bfloat16.
# Run from the repository root on a machine with a CUDA GPU and torch, transformers and attnprobe installed
# (`pip install -e '.[test]'` after installing a CUDA build of torch). Writes logs under ${OUT:-bench/results}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" \
    2>&1 | tee "$OUT_DIR/gpu-device.txt" || exit 1
python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT_DIR/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}
python bench/bench_scan.py --device cuda --lengths 128 512 --batch-size 32 --json "$OUT_DIR/gpu-bench-float32.json" \
    2>&1 | tee "$OUT_DIR/gpu-bench-float32.txt"
python -m attnprobe scan minilm-l6 --device cuda --dtype bfloat16 --out "$OUT_DIR/gpu-scan-bf16" --overwrite --json \
    > "$OUT_DIR/gpu-scan-bf16.json" 2> "$OUT_DIR/gpu-scan-bf16.err"
echo "gpu tests exit code: $tests_rc"
exit "$tests_rc"
