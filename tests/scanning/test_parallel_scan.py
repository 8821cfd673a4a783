"""Several processes (torchrun, gloo on CPU), out-of-memory batch splitting, and the GPU path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from attnprobe.models import checkpoints, loading
from attnprobe.config import ScanConfig
from attnprobe.scanning.scanner import scan


def _texts(n=37):
    return [f"sentence number {i} with some words " + "and more " * (i % 7) for i in range(n)]


def test_scan_on_two_processes_equals_one(tiny_bert, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(_texts()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["scan", str(tiny_bert), "--data", str(corpus), "--per-example", "--batch-size", "4"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "attnprobe", *base, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "attnprobe", *base, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # only the main process prints and writes
    for name in ("heads", "layers", "examples"):
        a = pd.read_parquet(tmp_path / "one" / f"{name}.parquet")
        b = pd.read_parquet(tmp_path / "two" / f"{name}.parquet")
        assert a.shape == b.shape and list(a.columns) == list(b.columns)
        num = a.select_dtypes("number").columns
        np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), atol=1e-6, equal_nan=True)
    ex = pd.read_parquet(tmp_path / "two" / "examples.parquet")
    assert list(dict.fromkeys(ex["example"])) == list(range(37))  # gathered in input order
    meta = json.loads((tmp_path / "two" / "run.json").read_text())
    assert meta["processes"] == 2 and meta["data"]["sequences_scanned"] == 37


def test_out_of_memory_halves_the_batch_and_says_so_once(tiny_bert, monkeypatch):
    from attnprobe.scanning import passes

    loaded = loading.load_model(str(tiny_bert))
    expected = scan(ScanConfig(model=str(tiny_bert), text=tuple(_texts(9)), batch_size=8), loaded=loaded)
    real = passes.forward_batch

    def limited(loaded, probe, batch, special, model=None, stop_early=False):
        B, Q = batch["input_ids"].shape
        if B <= 2:
            return real(loaded, probe, batch, special, model=model, stop_early=stop_early)
        probe.begin(batch["attention_mask"].bool(), special)
        probe.observe(None, torch.softmax(torch.rand(B, 4, Q, Q), -1))  # one layer done, then the failure
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(passes, "forward_batch", limited)
    notices = []
    got = scan(ScanConfig(model=str(tiny_bert), text=tuple(_texts(9)), batch_size=8), loaded=loaded,
               on_notice=notices.append)
    assert len(notices) == 1 and "out of memory" in notices[0]
    assert got.meta["notices"] and got.meta["data"]["sequences_scanned"] == 9
    cols = ["queries", "direct_entropy", "gtd", "sink_mass"]
    np.testing.assert_allclose(got.heads[cols].to_numpy(float), expected.heads[cols].to_numpy(float), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_scan_matches_cpu(tiny_bert, dtype):
    cpu = scan(ScanConfig(model=str(tiny_bert), text=tuple(_texts(12)), device="cpu"))
    gpu = scan(ScanConfig(model=str(tiny_bert), text=tuple(_texts(12)), device="cuda", dtype=dtype))
    assert gpu.meta["metric_dtype"] == "float32" and gpu.meta["device"].startswith("cuda")
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(gpu.heads["gtd"], cpu.heads["gtd"], atol=tol)
    np.testing.assert_allclose(gpu.heads["direct_entropy"], cpu.heads["direct_entropy"], atol=tol * 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_real_checkpoint_matches_eager():
    from transformers import AutoModel

    loaded = loading.load_model("minilm-l6", device="cuda")
    enc = loaded.tokenizer(_texts(8), padding=True, return_tensors="pt").to("cuda")
    eager = AutoModel.from_pretrained(checkpoints.alias_path(checkpoints.ALIASES["minilm-l6"]), attn_implementation="eager").cuda()
    with torch.no_grad():
        ref = eager(**enc, output_attentions=True).attentions
    got = scan(ScanConfig(model="minilm-l6", text=tuple(_texts(8)), device="cuda"), loaded=loaded)
    assert len(ref) == 6 and len(got.heads) == 72
