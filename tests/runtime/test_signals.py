"""SIGINT / SIGTERM during a scan: stop at the next batch, nothing claims to be complete, exit 130 / 143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_scan(tiny_bert, tmp_path, signum, code):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line number {i} of a corpus that takes a while to scan" for i in range(20000)))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnprobe", "scan", str(tiny_bert), "--data", str(corpus), "--out", str(out),
         "--batch-size", "1", "--per-example"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    time.sleep(1.5)  # well inside the scan loop
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (out / "run.json").exists()
    assert not (out / "heads.parquet").exists() and not (out / "examples.parquet").exists()
