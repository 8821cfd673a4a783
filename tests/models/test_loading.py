"""loading.py: resolving MODEL, offline loading, refusals with clear messages, backend verification."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.models import checkpoints, loading
from tests.conftest import make_tiny_model


def test_alias_resolves_to_the_bundled_checkpoint():
    path, source, _ = checkpoints.resolve_model("minilm-l6")
    assert source == "alias" and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_local_folder_loads_with_info(tiny_bert):
    loaded = loading.load_model(str(tiny_bert))
    assert loaded.info["source"] == "local"
    assert loaded.info["layers"] == 2 and loaded.info["heads"] == 4
    assert len(loaded.info["weights_sha256"]) == 64
    assert loaded.backend == "attnprobe"
    assert loaded.model.config._attn_implementation == "attnprobe"


def test_missing_path(tmp_path):
    with pytest.raises(AttnprobeError, match="does not exist"):
        checkpoints.resolve_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(AttnprobeError, match="has no config.json"):
        checkpoints.resolve_model(str(tmp_path))


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AttnprobeError, match="never downloads"):
        checkpoints.resolve_model("some-org/some-model-that-is-not-cached")


def test_pickle_only_weights_refused_unless_allowed(tiny_bert, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert, folder)
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(AttnprobeError, match="--allow-pickle"):
        loading.load_model(str(folder))
    loaded = loading.load_model(str(folder), allow_pickle=True)
    assert loaded.info["weights_format"] == "pickle"


def test_encoder_decoder_model_type_refused(tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True,
                                                    "architectures": ["T5ForConditionalGeneration"]}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(AttnprobeError, match="holds an encoder-decoder"):
        loading.load_model(str(folder))


def test_num_layers_larger_than_model(tiny_bert):
    with pytest.raises(AttnprobeError, match="more than the 2 layers"):
        loading.load_model(str(tiny_bert), num_layers=5)


def test_corrupt_weights(tiny_bert, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_bert, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(AttnprobeError, match="cannot load the weights"):
        loading.load_model(str(folder))


def test_invalid_config_json(tiny_bert, tmp_path):
    folder = tmp_path / "badcfg"
    shutil.copytree(tiny_bert, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(AttnprobeError, match="not valid JSON"):
        loading.load_model(str(folder))


def test_vocabulary_that_does_not_fit_the_tokenizer(tmp_path):
    folder = make_tiny_model("bert", tmp_path / "small-vocab")
    cfg = json.loads((folder / "config.json").read_text())
    from transformers import BertConfig, BertModel

    small = BertModel(BertConfig(**{**cfg, "vocab_size": 100}))
    small.save_pretrained(folder)
    with pytest.raises(AttnprobeError, match="do not belong to its weights"):
        loading.load_model(str(folder))


def test_registration_after_plain_import():
    """`import attnprobe` alone makes the attention implementations known to transformers."""
    import subprocess

    code = ("import attnprobe, sys; assert 'torch' not in sys.modules; "
            "from transformers import AttentionInterface; "
            "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as M; "
            "assert 'saobp' in AttentionInterface._global_mapping and 'saobp' in M._global_mapping; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_verify_backend_counts_one_call_per_layer(tiny_models):
    for kind, folder in tiny_models.items():
        loaded = loading.load_model(str(folder))
        calls, indexed = loading.verify_backend(loaded.model, loaded.tokenizer, loaded.num_layers)
        assert calls == 2 and indexed == (kind != "albert"), kind


def test_architecture_that_does_not_dispatch_falls_back_to_eager(tiny_bert, monkeypatch):
    monkeypatch.setattr(loading, "verify_backend", lambda *a, **k: (0, False))
    loaded = loading.load_model(str(tiny_bert))
    assert loaded.backend == "eager-outputs"
    from attnprobe.formulas.saobp import SaobpSettings

    with pytest.raises(AttnprobeError, match="SAOBP cannot be switched in"):
        loading.load_model(str(tiny_bert), saobp=SaobpSettings(gamma=0.9))


def test_restricted_bp_layers(tiny_models):
    """DistilBERT has no layer_idx but one module per layer: restricted layers work. ALBERT shares one."""
    from attnprobe.formulas.saobp import SaobpSettings

    loaded = loading.load_model(str(tiny_models["distilbert"]), saobp=SaobpSettings(gamma=0.9, layers=(1,)))
    assert loaded.saobp.layers == (1,)
    with pytest.raises(AttnprobeError, match="--bp-layers all"):
        loading.load_model(str(tiny_models["albert"]), saobp=SaobpSettings(gamma=0.9, layers=(1,)))
    loading.load_model(str(tiny_models["albert"]), saobp=SaobpSettings(gamma=0.9))  # every layer is fine
