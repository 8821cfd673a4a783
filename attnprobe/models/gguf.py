"""Checkpoints that a Python package ships as one GGUF file, turned once into an ordinary save_pretrained folder.

transformers reads GGUF through the ``gguf`` package and dequantizes every tensor to float, which takes most of
a minute for a 135M-parameter model. So the first use of such an alias writes the dequantized model (safetensors),
its config and its tokenizer into a cache folder (``$ATTNPROBE_CACHE``, default ``~/.cache/attnprobe``), and every
later load reads that folder like any other checkpoint. The package that ships the file is never imported: its
folder is found with importlib, as for the other aliases. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from attnprobe.errors import AttnprobeError


def cache_root() -> Path:
    return Path(os.environ.get("ATTNPROBE_CACHE") or Path.home() / ".cache" / "attnprobe").expanduser()


def converted_folder(name: str, source: Path) -> Path:
    """Where the converted checkpoint of alias ``name`` lives: keyed by the GGUF file's size and mtime."""
    stat = source.stat()
    return cache_root() / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"


def convert(name: str, source: Path, quiet) -> Path:
    """The save_pretrained folder of ``source`` (a GGUF file), converting it on first use.

    ``quiet`` is a context manager that silences transformers' loading chatter.
    """
    target = converted_folder(name, source)
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise AttnprobeError(f"model alias {name!r} is a GGUF file; reading it needs the gguf package: "
                             "pip install 'attnprobe[gguf]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
            # the GGUF-loaded model counts as quantized and refuses save_pretrained; its weights are already
            # float, so they go into a plain model of the same config
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(loaded.state_dict())
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
        os.replace(work, target)
    except OSError as exc:
        if (target / "config.json").is_file():  # another process converted it first
            return target
        raise AttnprobeError(f"cannot write the converted model alias {name!r} to {target}: {exc}; "
                             "set ATTNPROBE_CACHE to a writable folder") from None
    except Exception as exc:
        raise AttnprobeError(f"cannot read the GGUF file of model alias {name!r} ({source}): "
                             f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
