"""All transformers glue: offline loading, attention registration, backend verification.

Finding the files (aliases, folders, the hub cache, weights, tokenizers) is checkpoints.py; what the
loaded model's attention looks like (shape, probabilities, padding) is capability.py.

Loading never touches the network (``local_files_only`` everywhere, the HF offline switches set),
refuses pickle weights unless asked, and never sets ``trust_remote_code`` unless asked. The attention
function itself lives in saobp.py (pure torch); this module registers it, with its mask function,
under the names ``"attnprobe"`` and ``"saobp"``, and checks that a loaded model really calls it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from attnprobe.capture import probe as _probe  # noqa: E402
from attnprobe.capture.attention import attention_forward  # noqa: E402
from attnprobe.errors import AttnprobeError  # noqa: E402
from attnprobe.formulas.saobp import SaobpSettings  # noqa: E402
from attnprobe.models import capability  # noqa: E402
from attnprobe.models.checkpoints import (  # noqa: E402
    check_weights, first_line_of, load_tokenizer, quiet_loading, resolve_model, resolve_tokenizer, weights_sha256)

ATTN_NAMES = ("attnprobe", "saobp")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # architectures of decoder-only language models


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
    recover: str | None = None  # "softmax": output_attentions are pre-softmax scores (capability.py)
    causal: bool = False  # a decoder: query i sees keys k <= i (and what a sliding window allows)
    window: int | None = None  # eager-outputs only: a local-attention window that caps the scanned length


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


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttnprobeError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


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
    if raw.get("is_encoder_decoder") or any(a.endswith("ForConditionalGeneration") for a in archs) and \
            not _is_decoder_type(model_type):
        raise AttnprobeError(
            f"{path} holds an encoder-decoder ({model_type}, {', '.join(archs) or 'no architectures'}); attnprobe "
            "reads encoders (BERT, RoBERTa, ...) and decoder-only language models (GPT-2, Llama, Qwen, ...)"
        )
    try:
        with quiet_loading():
            return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise AttnprobeError(f"cannot read the config of {path}: {exc}") from None


def is_causal(config) -> bool:
    """Whether a config describes a decoder-only language model (causal attention): a decoder flag, a causal-LM
    architecture, or a model type transformers knows as a causal LM and not as a masked LM."""
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any(a.endswith(CAUSAL_SUFFIXES) for a in archs) \
        or _is_decoder_type(getattr(config, "model_type", None))


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
        task: ``base`` (AutoModel), ``sequence-classification``, ``masked-lm`` (AutoModelForMaskedLM),
            ``question-answering`` or ``multiple-choice`` (whose load-time checks run its ``base_model``).
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
    elif task == "question-answering":
        from transformers import AutoModelForQuestionAnswering as auto
    elif task == "multiple-choice":
        from transformers import AutoModelForMultipleChoice as auto
    elif task == "causal-lm":
        from transformers import AutoModelForCausalLM as auto
    else:
        auto = AutoModel
    torch_device = pick_device(device)
    torch_dtype = DTYPES[dtype]
    tok = load_tokenizer(resolve_tokenizer(tokenizer) if tokenizer else path, trust_remote_code,
                         vocab=getattr(config, "vocab_size", None), given=tokenizer)
    load = dict(config=config, dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True)
    try:
        with quiet_loading():
            model = auto.from_pretrained(path, attn_implementation="saobp" if settings else "attnprobe", **load)
    except AttnprobeError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        if "attn_implementation" in str(exc) or "attention" in str(exc).lower() or str(exc).strip("'\"") in ATTN_NAMES:
            model = None
        else:
            raise AttnprobeError(f"cannot load the weights in {path}: {first_line_of(exc)}") from None
    except Exception as exc:
        raise AttnprobeError(
            f"cannot load the weights in {path} (corrupt or truncated?): {first_line_of(exc)}; re-save or re-download the checkpoint"
        ) from None
    backend = "attnprobe"
    if model is None:  # the architecture does not accept a custom attention implementation
        if settings:
            raise AttnprobeError(f"{spec} ({config.model_type}) cannot switch its attention implementation, so it cannot run SAOBP")
        try:
            with quiet_loading():
                model = auto.from_pretrained(path, attn_implementation="eager", **load)
        except Exception as exc:
            raise AttnprobeError(f"cannot load the weights in {path}: {first_line_of(exc)}") from None
        backend = "eager-outputs"
    model.to(torch_device).eval()
    num_layers_eff = int(getattr(model.config, layers_key))
    if backend == "attnprobe":
        # a multiple-choice head wants (B, C, L) ids: the checks run its encoder on plain text
        calls, indexed = verify_backend(model.base_model if task == "multiple-choice" else model, tok, num_layers_eff)
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
    causal = is_causal(model.config)
    with quiet_loading():
        found = capability.inspect(model.base_model if task == "multiple-choice" else model, tok, backend,
                                   causal=causal)
    if backend == "attnprobe" and found.num_layers != num_layers_eff:
        raise AttnprobeError(f"the model made {found.num_layers} attention calls for {num_layers_eff} layers; "
                             "attnprobe cannot map them to layers")
    num_layers_eff, num_heads = found.num_layers, found.num_heads
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
        "padding": found.padding,
        "attention_read_as": "softmax of output_attentions" if found.recover else None,
        "hidden_size": getattr(model.config, "hidden_size", getattr(model.config, "dim", None)),
        "max_positions": getattr(model.config, "max_position_embeddings", None),
        "saobp": settings.to_json() if settings else None,
        "causal": causal,
    }
    return LoadedModel(model=model, tokenizer=tok, info=info, backend=backend, num_layers=num_layers_eff,
                       num_heads=num_heads, saobp=settings, device=torch_device, padding=found.padding,
                       recover=found.recover, causal=causal,
                       window=capability.eager_window(model.config) if backend == "eager-outputs" else None)


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
            f"{capability.arch_name(model)} fails on a plain-text check sentence ({first_line_of(exc)[:160]}); attnprobe "
            "feeds token ids and an attention mask only (models that need more inputs, such as layout boxes, "
            "are not supported)"
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
