"""Models in memory: saobp.apply / remove (bit-identical round trip, save and reload, refused architectures)
and attnprobe.scan of an nn.Module against a scan of the same model saved to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attnprobe
from attnprobe.errors import AttnprobeError
from attnprobe.models import loading
from attnprobe import saobp
from attnprobe.formulas.saobp import SaobpSettings
from attnprobe.scanning.tables import METRIC_COLUMNS

TEXTS = ["The cat sat on the mat.", "A good film, good acting.", "Why?", "Two dogs ran across the park."]


def _model(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder).eval()


def _inputs(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "albert"])
def test_apply_then_remove_gives_bit_identical_outputs(tiny_models, kind):
    model, inputs = _model(tiny_models[kind]), _inputs(tiny_models[kind])
    before_config = model.config.to_dict()
    impl = model.config._attn_implementation
    before = _out(model, inputs)
    assert saobp.apply(model, "bp-high") is model
    refined = _out(model, inputs)
    assert float((refined - before).abs().max()) > 1e-5  # SAOBP changes the attention (tiny: near uniform)
    assert model.config.saobp == SaobpSettings(gamma=0.9).to_json()
    assert saobp.remove(model) is model
    assert model.config._attn_implementation == impl
    assert model.config.to_dict() == before_config
    assert torch.equal(_out(model, inputs), before)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_apply_save_reload_gives_the_same_outputs(tiny_models, kind, tmp_path):
    from transformers import AutoModel

    model, inputs = _model(tiny_models[kind]), _inputs(tiny_models[kind])
    saobp.apply(model, "bp-low", strength=0.7, layers=[1])
    refined = _out(model, inputs)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["attn_implementation"] == "saobp"
    assert saved["saobp"] == {"gamma": 0.5, "strength": 0.7, "layers": [1], "variant": "bp-low"}
    reloaded = AutoModel.from_pretrained(tmp_path).eval()  # plain transformers, after `import attnprobe`
    assert reloaded.config._attn_implementation == "saobp"
    assert torch.equal(_out(reloaded, inputs), refined)
    # the same attention as refine's loading path with those settings
    loaded = loading.load_model(str(tiny_models[kind]), device="cpu",
                               saobp=SaobpSettings(gamma=0.5, strength=0.7, layers=(1,), variant="bp-low"))
    torch.testing.assert_close(_out(loaded.model, inputs), refined, rtol=1e-5, atol=1e-6)


def test_layer_restriction_changes_only_those_layers(tiny_bert):
    model, inputs = _model(tiny_bert), _inputs(tiny_bert)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True).hidden_states
    saobp.apply(model, "bp-high", layers="upper")
    with torch.no_grad():
        upper = model(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(upper[1], plain[1], rtol=1e-5, atol=1e-6)  # layer 0 is not refined (sdpa vs eager)
    assert float((upper[2] - plain[2]).abs().max()) > 1e-5


def test_a_second_apply_changes_settings_and_remove_goes_back_to_the_start(tiny_bert):
    model, inputs = _model(tiny_bert), _inputs(tiny_bert)
    before = _out(model, inputs)
    saobp.apply(model, "bp-low")
    saobp.apply(model, gamma=0.8)
    assert model.config.saobp["variant"] == "custom" and model.config.saobp["gamma"] == 0.8
    saobp.remove(model)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "saobp")
    assert torch.equal(_out(model, inputs), before)


def test_remove_on_a_refined_checkpoint_goes_to_plain_attention(tiny_bert, tmp_path):
    from transformers import AutoModel

    model, inputs = _model(tiny_bert), _inputs(tiny_bert)
    plain = _out(model, inputs)
    saobp.apply(model).save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    saobp.remove(reloaded)
    assert reloaded.config._attn_implementation == "sdpa" and not getattr(reloaded.config, "saobp", None)
    torch.testing.assert_close(_out(reloaded, inputs), plain, rtol=1e-5, atol=1e-6)
    with pytest.raises(AttnprobeError, match="nothing to remove"):
        saobp.remove(reloaded)


def _tiny_squeezebert(vocab_size: int = 100):
    from transformers import AutoModel, SqueezeBertConfig

    groups = dict(q_groups=1, k_groups=1, v_groups=1, post_attention_groups=1, intermediate_groups=1, output_groups=1)
    return AutoModel.from_config(SqueezeBertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64, embedding_size=32,
                                                   **groups))


def test_apply_refuses_what_it_cannot_refine(tiny_models):
    from transformers import T5Config, T5ForConditionalGeneration

    model = _model(tiny_models["bert"])
    for kwargs, match in [(dict(variant="bp-middle"), "unknown variant"), (dict(variant="baseline"), "nothing to"),
                          (dict(gamma=1.0), r"\[0, 1\)"), (dict(strength=-1.0), "strength"),
                          (dict(layers="7"), "layers"), (dict(layers="some"), "layers")]:
        with pytest.raises(AttnprobeError, match=match):
            saobp.apply(model, **kwargs)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "saobp")
    with pytest.raises(AttnprobeError, match="shares one attention module"):
        saobp.apply(_model(tiny_models["albert"]), layers="upper")
    with pytest.raises(AttnprobeError, match="without a layer index"):  # DistilBERT: no layer_idx to save
        saobp.apply(_model(tiny_models["distilbert"]), layers="upper")
    squeeze = _tiny_squeezebert()
    impl = squeeze.config._attn_implementation
    with pytest.raises(AttnprobeError, match="AttentionInterface"):
        saobp.apply(squeeze)
    assert squeeze.config._attn_implementation == impl and not hasattr(squeeze.config, "saobp")
    with pytest.raises(AttnprobeError, match="encoder-decoder"):
        saobp.apply(T5ForConditionalGeneration(T5Config(num_layers=1, num_heads=2, d_model=8, d_kv=4, d_ff=8,
                                                        vocab_size=50)))
    with pytest.raises(AttnprobeError, match="PreTrainedModel"):
        saobp.apply(torch.nn.Linear(2, 2))


# ---- attnprobe.scan of a model in memory ---------------------------------------------------------


def _numbers(df):
    return df[list(METRIC_COLUMNS)].to_numpy(float)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "albert"])
def test_scan_of_an_in_memory_model_equals_a_scan_of_it_saved(tiny_models, kind, tmp_path):
    from transformers import AutoTokenizer

    model = _model(tiny_models[kind]).train()  # scanned in eval mode, put back in training mode
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[kind])
    result = attnprobe.scan(model, texts=TEXTS, tokenizer=tokenizer, batch_size=3)
    assert model.training and model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ref = attnprobe.scan(str(tmp_path), texts=TEXTS, batch_size=3)
    assert result.meta["backend"] == "attnprobe" and result.meta["model"]["source"] == "memory"
    assert result.heads["queries"].tolist() == ref.heads["queries"].tolist()
    np.testing.assert_allclose(_numbers(result.heads), _numbers(ref.heads), rtol=1e-6, atol=1e-7, equal_nan=True)
    np.testing.assert_allclose(result.layers["gtd"], ref.layers["gtd"], rtol=1e-6, atol=1e-7)
    by_path = attnprobe.scan(model, texts=TEXTS, tokenizer=str(tiny_models[kind]), batch_size=3)
    np.testing.assert_array_equal(_numbers(by_path.heads), _numbers(result.heads))


def test_scan_of_an_in_memory_saobp_model_equals_the_refined_folder(tiny_bert, tmp_path):
    model = saobp.apply(_model(tiny_bert), "bp-high")
    result = attnprobe.scan(model, texts=TEXTS, tokenizer=tiny_bert)
    assert result.heads["bp_shift"].notna().all()
    assert model.config._attn_implementation == "saobp"
    model.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path)
    ref = attnprobe.scan(str(tmp_path), texts=TEXTS)
    np.testing.assert_allclose(_numbers(result.heads), _numbers(ref.heads), rtol=1e-6, atol=1e-7, equal_nan=True)


def test_scan_of_a_model_without_the_interface_uses_eager_outputs(tmp_path):
    from transformers import AutoTokenizer

    from tests.conftest import bundled_path

    tokenizer = AutoTokenizer.from_pretrained(bundled_path())
    with pytest.raises(AttnprobeError, match="vocabulary"):
        attnprobe.scan(_tiny_squeezebert(), texts=TEXTS, tokenizer=tokenizer)
    torch.manual_seed(0)
    model = _tiny_squeezebert(len(tokenizer)).eval()
    impl = model.config._attn_implementation
    result = attnprobe.scan(model, texts=TEXTS, tokenizer=tokenizer)
    assert result.meta["backend"] == "eager-outputs" and model.config._attn_implementation == impl
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ref = attnprobe.scan(str(tmp_path), texts=TEXTS)
    assert ref.meta["backend"] == "eager-outputs"
    np.testing.assert_allclose(_numbers(result.heads), _numbers(ref.heads), rtol=1e-6, atol=1e-7, equal_nan=True)


def test_scan_of_an_in_memory_model_refuses_bad_input(tiny_bert):
    model = _model(tiny_bert)
    with pytest.raises(AttnprobeError, match="tokenizer="):
        attnprobe.scan(model, texts=TEXTS)
    with pytest.raises(AttnprobeError, match="num_layers"):
        attnprobe.scan(model, texts=TEXTS, tokenizer=tiny_bert, num_layers=1)
    with pytest.raises(AttnprobeError, match="does not exist"):
        attnprobe.scan(model, texts=TEXTS, tokenizer="/no/such/folder")
    with pytest.raises(AttnprobeError, match="transformers tokenizer"):
        attnprobe.scan(model, texts=TEXTS, tokenizer=42)


def test_library_scan_writes_out_like_the_command(tiny_bert, tmp_path):
    import pandas as pd
    from transformers import AutoTokenizer

    from attnprobe.runtime import outputs

    result = attnprobe.scan(str(tiny_bert), texts=TEXTS, out=str(tmp_path / "run"))
    assert result.out_dir == tmp_path / "run"
    meta = json.loads((tmp_path / "run" / outputs.RUN_JSON).read_text())
    assert meta["complete"] and meta["data"] == result.meta["data"]
    np.testing.assert_array_equal(_numbers(pd.read_parquet(tmp_path / "run" / outputs.HEADS)), _numbers(result.heads))
    with pytest.raises(AttnprobeError, match="already holds a run"):  # an occupied folder is refused
        attnprobe.scan(str(tiny_bert), texts=TEXTS, out=str(tmp_path / "run"))
    again = attnprobe.scan(_model(tiny_bert), texts=TEXTS, tokenizer=AutoTokenizer.from_pretrained(tiny_bert),
                           out=str(tmp_path / "run"), overwrite=True)
    assert json.loads((tmp_path / "run" / outputs.RUN_JSON).read_text())["model"]["source"] == "memory"
    np.testing.assert_allclose(_numbers(again.heads), _numbers(result.heads), rtol=1e-6, atol=1e-7, equal_nan=True)
    assert not attnprobe.scan(str(tiny_bert), texts=TEXTS).out_dir  # without out nothing is written
    with pytest.raises(AttnprobeError):  # a failed scan leaves no half-written folder behind
        attnprobe.scan(str(tiny_bert), data=str(tmp_path / "missing.tsv"), out=str(tmp_path / "failed"))
    assert not (tmp_path / "failed").exists()
