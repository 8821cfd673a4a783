"""Capture and scan: the streamed attention equals transformers' eager output_attentions, and the
scan tables equal an independent numpy computation from those eager attentions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnprobe import Thresholds
from attnprobe.models import checkpoints, loading
from attnprobe.capture import probe as probe_mod
from attnprobe.config import ScanConfig
from attnprobe.scanning.scanner import scan
from tests import reference

TEXTS = [
    "A short one.",
    "This is a much longer sentence, so the batch has padding in it for the shorter rows.",
    "Attention collapses onto a few tokens in the deeper layers of small models.",
    "Hi",
]


class _Recorder:
    def __init__(self):
        self.probs = []

    def observe(self, module, probs, plain=None):
        self.probs.append(probs)


def _captured_vs_eager(folder, texts=TEXTS):
    from transformers import AutoModel

    loaded = loading.load_model(str(folder))
    enc = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    rec = _Recorder()
    with torch.no_grad(), probe_mod.capturing(rec):
        loaded.model(**enc)
    eager = AutoModel.from_pretrained(folder, attn_implementation="eager", config=loaded.model.config)
    eager.eval()
    with torch.no_grad():
        out = eager(**enc, output_attentions=True)
    return loaded, enc, rec.probs, out.attentions


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "albert"])
def test_captured_attention_equals_eager_output_attentions(tiny_models, kind):
    loaded, enc, captured, eager = _captured_vs_eager(tiny_models[kind])
    assert loaded.backend == "attnprobe"
    assert len(captured) == len(eager) == loaded.num_layers == 2
    for a, b in zip(captured, eager):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-6
    keep = enc["attention_mask"].bool()
    for a in captured:  # padded keys get exactly zero mass
        assert (a.masked_select(~keep[:, None, None, :].expand_as(a)) == 0).all()


@pytest.mark.slow
def test_real_checkpoint_captured_attention_equals_eager():
    loaded, _, captured, eager = _captured_vs_eager(checkpoints.alias_path(checkpoints.ALIASES["minilm-l6"]))
    assert loaded.num_layers == 6 and loaded.num_heads == 12
    assert max((a - b).abs().max().item() for a, b in zip(captured, eager)) <= 1e-6


def _reference_heads(eager_attentions, keep, special, hops=2):
    """Token-weighted per-head means computed with the numpy loop reference, one sequence at a time."""
    L = len(eager_attentions)
    H = eager_attentions[0].shape[1]
    names = ("direct_entropy", "direct_entropy_norm", "indirect_entropy", "indirect_entropy_norm", "gtd",
             "self_mass", "local_mass", "first_mass", "special_mass")
    out = {}
    for layer in range(L):
        for head in range(H):
            sums = dict.fromkeys(names, 0.0)
            sink_num = sink_den = 0.0
            count = 0
            for b in range(keep.shape[0]):
                n = int(keep[b].sum())
                A = eager_attentions[layer][b, head, :n, :n].double().numpy()
                m = reference.head_metrics(A, hops, special[b, :n].tolist())
                for k in names:
                    sums[k] += m[k] * n
                sink_num += m["sink_mass"] * n
                sink_den += n
                count += n
            row = {k: v / count for k, v in sums.items()}
            row["sink_mass"] = sink_num / sink_den
            row["queries"] = count
            out[(layer, head)] = row
    return out


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_scan_tables_match_independent_computation(tiny_models, kind):
    loaded, enc, _, eager = _captured_vs_eager(tiny_models[kind])
    keep = enc["attention_mask"].bool()
    special = torch.isin(enc["input_ids"], torch.tensor(loaded.tokenizer.all_special_ids)) & keep
    expected = _reference_heads(eager, keep, special)
    result = scan(ScanConfig(model=str(tiny_models[kind]), text=tuple(TEXTS), batch_size=3), loaded=loaded)
    assert len(result.heads) == 2 * 4
    for row in result.heads.itertuples():
        ref = expected[(row.layer, row.head)]
        assert row.queries == ref["queries"]
        for name, value in ref.items():
            assert getattr(row, name) == pytest.approx(value, abs=2e-5), name
    assert result.heads["bp_shift"].isna().all()
    layer0 = result.heads[result.heads.layer == 0]
    assert result.layers.loc[0, "gtd"] == pytest.approx(layer0["gtd"].mean())


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "albert"])
def test_passes_after_the_first_end_at_the_last_attention(tiny_models, kind, monkeypatch):
    """The first batch runs whole (Probe.end checks its attention calls); the later ones end after the
    last layer's attention, and the sums are exactly those of whole passes."""
    from attnprobe.data import sources
    from attnprobe.scanning import passes

    loaded = loading.load_model(str(tiny_models[kind]))
    whole = []
    hook = loaded.model.register_forward_hook(lambda *_: whole.append(1))  # runs only when a pass completes
    chunk = sources.Chunk(list(TEXTS), None, None, list(range(len(TEXTS))))
    cut, _ = passes.run_batches(loaded, [chunk], batch_size=1, max_length=64, hops=2)
    assert len(whole) == 1  # of 4 batches
    assert cut.passes_cut == 3
    original = passes.forward_batch
    monkeypatch.setattr(passes, "forward_batch", lambda *a, stop_early=False, **k: original(*a, **k))
    full, _ = passes.run_batches(loaded, [chunk], batch_size=1, max_length=64, hops=2)
    hook.remove()
    assert len(whole) == 1 + 4
    for key, value in full.totals().items():
        torch.testing.assert_close(cut.totals()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    monkeypatch.undo()
    meta = scan(ScanConfig(model=str(tiny_models[kind]), text=tuple(TEXTS), batch_size=1), loaded=loaded).meta
    assert meta["forward_passes"] == {"total": 4, "ended_at_last_attention": 3}


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "albert", "bert+bp-high"])
def test_reused_attention_buffers_give_the_same_sums(tiny_models, kind):
    """The attention function's logits and probabilities in the probe's buffers (as run_batches asks) give
    exactly the sums of freshly allocated ones, as batches grow and shrink (views of one flat buffer)."""
    from attnprobe import saobp
    from attnprobe.scanning import passes

    loaded = loading.load_model(str(tiny_models[kind.split("+")[0]]))
    if kind.endswith("bp-high"):
        saobp.apply(loaded.model, "bp-high")
    enc = loaded.tokenizer(list(TEXTS), padding=True, return_tensors="pt")
    special = torch.isin(enc["input_ids"], torch.tensor(loaded.tokenizer.all_special_ids)) & enc["attention_mask"].bool()
    results = {}
    for reuse in (False, True):
        probe = probe_mod.Probe(loaded.num_layers, num_heads=loaded.num_heads, per_example=True)
        probe.reuse_buffers = reuse
        per = []
        for rows in ([1], [0, 1, 2, 3], [2, 3]):
            n = int(enc["attention_mask"][rows].sum(-1).max())
            batch = {k: enc[k][rows, :n] for k in ("input_ids", "attention_mask")}
            per.append(passes.forward_batch(loaded, probe, batch, special[rows, :n]))
        assert bool(probe._buffers) == reuse
        results[reuse] = (probe.totals(), per)
    (fresh, fresh_per), (kept, kept_per) = results[False], results[True]
    for key, value in fresh.items():
        torch.testing.assert_close(kept[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    for a, b in zip(fresh_per, kept_per):
        for key, value in a.items():
            torch.testing.assert_close(b[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    if kind.endswith("bp-high"):
        assert probe.refined_layers == set(range(loaded.num_layers))


def test_attention_buffers_are_reused_only_under_a_probe_without_autograd():
    from attnprobe.capture import attention

    probe = probe_mod.Probe(num_layers=1, num_heads=2)
    probe.reuse_buffers = True
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    module = torch.nn.Module()
    with probe_mod.capturing(probe):
        probe.begin(torch.ones(2, 5, dtype=torch.bool))
        with torch.no_grad():
            _, kept = attention.attention_forward(module, q, k, v, None)
        assert kept.data_ptr() == probe._buffers[(torch.float32, kept.device)][1].data_ptr()
        probe.abort()
        probe.begin(torch.ones(2, 5, dtype=torch.bool))
        _, fresh = attention.attention_forward(module, q, k, v, None)  # autograd on: nothing reused
        assert fresh.data_ptr() != kept.data_ptr()
        torch.testing.assert_close(fresh, kept, rtol=0, atol=0)
        probe.abort()
        probe.begin(torch.ones(2, 5, dtype=torch.bool))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            _, cast = attention.attention_forward(module, q, k, v, None)  # autocast: its own precision, no buffers
        assert cast.dtype == torch.bfloat16


def test_a_probe_that_stops_early_raises_only_after_the_last_layer():
    probe = probe_mod.Probe(num_layers=2, num_heads=1)
    probe.stop_after_last = True
    probe.begin(torch.ones(1, 3, dtype=torch.bool))
    probs = torch.full((1, 1, 3, 3), 1 / 3)
    probe.observe(None, probs)  # layer 0: no stop
    with pytest.raises(probe_mod.AttentionComplete):
        probe.observe(None, probs)
    assert probe.end() is None and probe.totals()["queries"].sum() == 2 * 3


def test_scan_batch_size_and_sorting_do_not_change_results(tiny_bert):
    a = scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS), batch_size=1))
    b = scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS), batch_size=4))
    cols = ["direct_entropy", "indirect_entropy", "gtd", "sink_mass", "special_mass"]
    np.testing.assert_allclose(a.heads[cols].to_numpy(), b.heads[cols].to_numpy(), atol=2e-5)


def test_per_example_rows_keep_input_order(tiny_bert):
    texts = ("a much longer sentence comes first in the input", "short", "mid length text here")
    res = scan(ScanConfig(model=str(tiny_bert), text=texts, per_example=True, batch_size=2))
    ex = res.examples
    assert list(dict.fromkeys(ex["example"])) == [0, 1, 2]
    assert len(ex) == 3 * 2 * 4
    one = scan(ScanConfig(model=str(tiny_bert), text=(texts[1],)))
    got = ex[ex.example == 1].sort_values(["layer", "head"])["gtd"].to_numpy()
    np.testing.assert_allclose(got, one.heads["gtd"].to_numpy(), atol=2e-5)


def test_max_length_truncates_and_counts(tiny_bert):
    long = " ".join(["word"] * 200)
    res = scan(ScanConfig(model=str(tiny_bert), text=(long, "short text"), max_length=16))
    assert res.meta["data"]["truncated"] == 1
    assert res.meta["data"]["max_length"] == 16
    assert res.heads["queries"].iloc[0] == 16 + 4  # 16 + "[CLS] short text [SEP]"


def test_texts_longer_than_the_model_are_truncated_not_fatal(tiny_bert):
    long = " ".join(["token"] * 400)  # the tiny model has 128 positions
    res = scan(ScanConfig(model=str(tiny_bert), text=(long,)))
    assert res.meta["data"]["truncated"] == 1 and res.meta["data"]["max_length"] == 128


def test_num_layers_keeps_first_layers(tiny_bert):
    res = scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS), num_layers=1))
    full = scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS)))
    assert sorted(res.heads.layer.unique()) == [0]
    np.testing.assert_allclose(res.heads["gtd"], full.heads[full.heads.layer == 0]["gtd"], atol=1e-6)


def test_eager_outputs_fallback_gives_the_same_tables(tiny_bert):
    loaded = loading.load_model(str(tiny_bert))
    streamed = scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS)), loaded=loaded)
    loaded.model.set_attn_implementation("eager")
    loaded.backend = "eager-outputs"
    fallback = scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS)), loaded=loaded)
    assert fallback.meta["backend"] == "eager-outputs"
    assert fallback.meta["forward_passes"]["ended_at_last_attention"] == 0  # its attention comes after the pass
    cols = ["direct_entropy", "indirect_entropy", "gtd", "sink_mass"]
    np.testing.assert_allclose(streamed.heads[cols].to_numpy(), fallback.heads[cols].to_numpy(), atol=1e-6)


def test_hops_three_changes_indirect_metrics_only(tiny_bert):
    two = scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS)))
    three = scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS), hops=3))
    np.testing.assert_allclose(two.heads["direct_entropy"], three.heads["direct_entropy"], atol=1e-6)
    assert not np.allclose(two.heads["gtd"], three.heads["gtd"])


def test_flags_follow_thresholds(tiny_bert):
    res = scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS), thresholds=Thresholds(diffuse=0.0)))
    assert res.heads["diffuse"].all()
    assert (res.layers["flagged_heads"] == 4).all()


def test_memory_does_not_stack_layers(tiny_bert, monkeypatch):
    """The probe keeps only (L, H) sums: observed tensors are released after each layer."""
    import weakref

    refs = []
    original = probe_mod.Probe.observe

    def spy(self, module, probs, plain=None, **kwargs):
        refs.append(weakref.ref(probs))
        return original(self, module, probs, plain, **kwargs)

    monkeypatch.setattr(probe_mod.Probe, "observe", spy)
    scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS)))
    assert refs and all(r() is None for r in refs)


def test_nonfinite_attention_is_flagged_not_averaged(tiny_bert, tmp_path):
    """Overflowing scores (as in half precision) give NaN attention: counted, flagged, left out of means."""
    from attnprobe.scanning.scanner import write_scan

    loaded = loading.load_model(str(tiny_bert))
    attn = loaded.model.encoder.layer[1].attention.self
    with torch.no_grad():
        attn.query.weight.mul_(1e25)
        attn.key.weight.mul_(1e25)
    res = scan(ScanConfig(model=str(tiny_bert), text=tuple(TEXTS)), loaded=loaded)
    layer1 = res.heads[res.heads.layer == 1]
    assert (layer1["nonfinite"] > 0).any() and layer1["nonfinite_flag"].any()
    assert res.heads[res.heads.layer == 0]["nonfinite"].eq(0).all()
    assert res.meta["nonfinite"]["rows"] > 0 and res.meta["nonfinite"]["heads"]
    finite = res.heads[["direct_entropy", "gtd"]].dropna()
    assert np.isfinite(finite.to_numpy()).all()
    write_scan(res, tmp_path)  # run.json must stay valid JSON (no NaN literals)
    import json

    meta = json.loads((tmp_path / "run.json").read_text())
    assert all(h[0] == 1 for h in meta["nonfinite"]["heads"])


def test_scan_on_the_cpu_keeps_freed_memory(tiny_bert):
    """run.json says whether the scan ran with the runtime wing's allocator setting (tests/runtime/test_memory.py checks that it
    takes effect): the scan command asks for it, a library call does not."""
    from attnprobe.runtime import memory

    texts = ("a short text", "and another one")
    asked = scan(ScanConfig(model=str(tiny_bert), text=texts, patterns=0), keep_freed_memory=True)
    assert asked.meta["device"] == "cpu"
    assert asked.meta["cpu_allocator"] == ("keeps freed memory" if memory.keep_freed_memory() else "default")
    assert scan(ScanConfig(model=str(tiny_bert), text=texts, patterns=0)).meta["cpu_allocator"] == "default"
