"""Decoder-only language models: tiny random models of 15 families scanned in batches, right- and left-padded
and without a pad token, against a one-sentence-at-a-time float64 reference under the causal definitions
(tests/tiny_decoders.py); grouped-query and multi-query attention, softcapping and sliding windows; SAOBP kept
causal; the refusals."""

from __future__ import annotations

import json

import pytest
import torch

import attnprobe
from attnprobe.errors import AttnprobeError
from tests.tiny_decoders import FAMILIES, WINDOW, make_decoder, reference_heads
from tests.tiny_encoders import SENTENCES, largest_difference

TOL = 1e-6  # float64 throughout; GPT-2 agrees to 1e-16, the other families to a few 1e-8 (docs/models.md)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {kind: make_decoder(kind, root / kind) for kind in FAMILIES}


def _scan(folder, **options):
    return attnprobe.scan(str(folder), texts=SENTENCES, batch_size=4, dtype="float64", patterns=0, **options)


def test_families_cover_the_attention_variants():
    from tests.tiny_decoders import OVERRIDES

    assert len(FAMILIES) >= 12
    assert OVERRIDES["llama"]["num_key_value_heads"] < 4  # grouped-query attention
    assert OVERRIDES["gpt_bigcode"]["multi_query"]  # one key/value head
    assert OVERRIDES["gemma2"]["attn_logit_softcapping"] and OVERRIDES["gemma2"]["query_pre_attn_scalar"]
    assert OVERRIDES["mistral"]["sliding_window"] == WINDOW < min(len(s.split()) for s in SENTENCES[:3]) + 2


@pytest.mark.parametrize("kind", FAMILIES)
def test_batched_scan_equals_one_sentence_at_a_time(decoders, kind):
    result = _scan(decoders[kind])
    reference = reference_heads(decoders[kind], SENTENCES)
    assert result.meta["model"]["causal"] is True
    assert largest_difference(result.heads, reference) < TOL
    first = reference[(0, 0)]
    assert result.meta["data"]["rows_not_scored"] == first["unscored"] == len(SENTENCES)  # each first token


def _with_tokenizer(folder, tmp_path, **changes):
    """A copy of ``folder`` whose tokenizer config is changed (padding side, no pad token)."""
    import shutil

    copy = tmp_path / f"{folder.name}-tok"
    shutil.copytree(folder, copy)
    path = copy / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        config.pop(key, None)
    path.write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_left_padding_tokenizer_and_no_pad_token_give_the_same_numbers(decoders, kind, tmp_path):
    plain = _scan(decoders[kind]).heads
    left = _scan(_with_tokenizer(decoders[kind], tmp_path, padding_side="left")).heads
    nopad = attnprobe.scan(str(_with_tokenizer(decoders[kind], tmp_path / "n", pad_token=None)),
                           texts=SENTENCES, batch_size=4, dtype="float64", patterns=0).heads
    cols = ["direct_entropy_norm", "indirect_entropy_norm", "gtd", "first_mass", "sink_mass", "queries"]
    assert (left[cols] - plain[cols]).abs().max().max() == 0
    assert (nopad[cols] - plain[cols]).abs().max().max() < 1e-12


def test_left_padded_batch_in_the_probe_equals_right_padded(decoders):
    """A batch padded on the left (as a decoder's data collator may hand it to the evaluation probe) gives the
    numbers of the right-padded batch: first_mass is on each sequence's first real token."""
    from attnprobe.capture.probe import Probe, capturing
    from attnprobe.models import loading

    loaded = loading.load_model(str(decoders["llama"]), device="cpu", dtype="float64")
    tok = loaded.tokenizer
    ids = [tok(s)["input_ids"] for s in SENTENCES[:3]]
    n = max(map(len, ids))
    totals = {}
    for side in ("right", "left"):
        input_ids = torch.zeros(len(ids), n, dtype=torch.long)
        keep = torch.zeros(len(ids), n, dtype=torch.long)
        for b, x in enumerate(ids):
            span = slice(0, len(x)) if side == "right" else slice(n - len(x), n)
            input_ids[b, span], keep[b, span] = torch.tensor(x), 1
        position_ids = (keep.cumsum(-1) - 1).clamp_min(0)
        probe = Probe(loaded.num_layers, metric_dtype=torch.float64)
        probe.begin(keep.bool())
        with torch.no_grad(), capturing(probe):
            loaded.model(input_ids=input_ids, attention_mask=keep, position_ids=position_ids)
        probe.end()
        totals[side] = probe.totals()
    for name, value in totals["right"].items():
        assert torch.allclose(totals["left"][name], value, atol=1e-9, equal_nan=True), name


def test_saobp_stays_causal_and_finite(decoders):
    """With SAOBP on, changing a later token changes no earlier position's output, and a left-padded batch
    (fully masked pad rows) gives no NaN."""
    from transformers import AutoModel

    from attnprobe import saobp

    model = AutoModel.from_pretrained(decoders["llama"], dtype=torch.float64).eval()
    saobp.apply(model, "bp-high")
    a = torch.tensor([[5, 17, 99, 230, 41, 7]])
    b = a.clone()
    b[0, 4] = 1000
    with torch.no_grad():
        ha, hb = (model(input_ids=x).last_hidden_state for x in (a, b))
    assert torch.equal(ha[0, :4], hb[0, :4]) and not torch.equal(ha[0, 4:], hb[0, 4:])
    padded = torch.tensor([[0, 0, 5, 17, 99], [5, 17, 99, 230, 41]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model(input_ids=padded, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all()


def test_saobp_scan_of_a_decoder_reports_bp_shift(decoders):
    result = attnprobe.scan(str(decoders["qwen2"]), texts=SENTENCES, patterns=0)
    assert result.heads["bp_shift"].isna().all()
    from transformers import AutoModel, AutoTokenizer

    from attnprobe import saobp

    model = saobp.apply(AutoModel.from_pretrained(decoders["qwen2"]), "bp-high")
    refined = attnprobe.scan(model, texts=SENTENCES, tokenizer=AutoTokenizer.from_pretrained(decoders["qwen2"]),
                             patterns=0)
    assert (refined.heads["bp_shift"] > 0).all()


def test_learned_sinks_are_refused():
    from attnprobe.capture.attention import attention_forward

    q = torch.zeros(1, 2, 3, 4)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="learned attention sinks"):
        attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))


def test_decoder_that_attends_ahead_is_refused(tiny_bert, tmp_path):
    """A checkpoint that calls itself a causal LM but attends to later positions is refused, not scanned."""
    import shutil

    folder = tmp_path / "fake-decoder"
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertLMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AttnprobeError, match="later positions"):
        attnprobe.scan(str(folder), texts=SENTENCES[:2], patterns=0)


def test_cli_refuses_an_encoder_decoder_and_leaves_no_folder(tmp_path):
    from typer.testing import CliRunner

    from attnprobe.cli import app

    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    (folder / "model.safetensors").write_bytes(b"")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["scan", str(folder), "--text", "a b c", "--out", str(out)])
    assert result.exit_code == 1 and "encoder-decoder" in result.output
    assert len(result.output.strip().splitlines()) <= 2 and not out.exists()


def test_callback_probes_a_decoder(decoders, tmp_path):
    """The Trainer callback on a causal-LM Trainer: rows written for every probe, numbers as a scan's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from attnprobe.hf import DIAGNOSTICS_FILE, AttentionDiagnosticsCallback

    folder = decoders["llama"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok(SENTENCES * 2, truncation=True, max_length=12, padding="max_length")["input_ids"]
    data = [{"input_ids": torch.tensor(x), "labels": torch.tensor(x)} for x in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok)
    callback = AttentionDiagnosticsCallback(texts=SENTENCES, every_n_steps=1, trainer=trainer)
    trainer.add_callback(callback)
    trainer.train()
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "out" / DIAGNOSTICS_FILE)
    assert sorted(set(rows["step"])) == [1, 2]
    after = attnprobe.scan(model, texts=SENTENCES, tokenizer=tok, patterns=0).heads
    last = rows[rows["step"] == 2].sort_values(["layer", "head"]).reset_index(drop=True)
    assert (last["gtd"] - after["gtd"]).abs().max() < 1e-5
