"""Models already in memory: switch attnprobe's attention (or SAOBP) into them, check it runs, switch back.

A loaded model from disk goes through loading.load_model; a model a user holds in a notebook or that a
Trainer is training comes here. ``probing`` switches the registered ``"attnprobe"`` attention function in
for the length of a scan (through transformers' public ``set_attn_implementation``), checks with one short
forward pass that every layer really calls it, hands out a loading.LoadedModel, and restores the previous
attention implementation and training mode afterwards. ``apply_saobp`` / ``remove_saobp`` are the glue
behind ``attnprobe.saobp.apply`` and ``attnprobe.saobp.remove`` (saobp.py itself stays pure torch). This
module does not load from disk and computes no metric.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from attnprobe.errors import AttnprobeError
from attnprobe.models import checkpoints, loading
from attnprobe.formulas.saobp import GAMMAS, SaobpSettings, parse_bp_layers

_PREVIOUS = "_attnprobe_previous_attention"  # set on a model by apply_saobp: what remove_saobp restores


class _IdsInputs:
    """Stands in for a tokenizer in loading.verify_backend where none is at hand: three ordinary token ids."""

    def __init__(self, vocab_size: int | None):
        top = max(min(int(vocab_size or 1000), 1000), 4)
        self.ids = [top - 3, top - 2, top - 1]

    def __call__(self, texts, return_tensors="pt"):
        from transformers import BatchEncoding

        ids = torch.tensor([self.ids] * len(texts))
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def check_model(model: Any) -> None:
    """Refuse what is not a transformers encoder or decoder-only model (encoder-decoders, plain modules)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise AttnprobeError(
            f"expected a transformers model (a PreTrainedModel, e.g. from AutoModel.from_pretrained), got "
            f"{type(model).__name__}; attnprobe reads Hugging Face encoders and decoder-only language models"
        )
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise AttnprobeError(f"{type(model).__name__} is an encoder-decoder ({config.model_type}); attnprobe reads "
                             "encoders (BERT, RoBERTa, ...) and decoder-only language models (GPT-2, Llama, ...)")


def num_layers_of(model) -> int:
    return int(getattr(model.config, loading.layers_attr(model.config)))


def num_heads_of(model) -> int:
    config = model.config
    return int(getattr(config, "num_attention_heads", getattr(config, "n_heads", 0)) or 0)


def _set_attention(model, name: str | None) -> None:
    with checkpoints.quiet_loading():  # a model that cannot switch only warns; the call count below tells
        model.set_attn_implementation(name)


def _tokenizer(tokenizer: Any, model) -> Any:
    """A tokenizer object as given, or one loaded from a folder or alias; checked against the vocabulary."""
    if tokenizer is None:
        raise AttnprobeError("an in-memory model needs its tokenizer: pass tokenizer= (a tokenizer object, "
                             "a folder saved with save_pretrained() or an alias)")
    if isinstance(tokenizer, str) or hasattr(tokenizer, "__fspath__"):
        spec = str(tokenizer)
        path = checkpoints.alias_path(checkpoints.ALIASES[spec]) if spec in checkpoints.ALIASES else _folder(spec)
        tokenizer = checkpoints.load_tokenizer(path)
    if not callable(tokenizer) or not hasattr(tokenizer, "all_special_ids"):
        raise AttnprobeError(f"tokenizer= must be a transformers tokenizer or a folder with one, got "
                             f"{type(tokenizer).__name__}")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise AttnprobeError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}; "
                             "pass the tokenizer the model was trained with")
    return tokenizer


def _folder(spec: str):
    from pathlib import Path

    path = Path(spec).expanduser()
    if not path.is_dir():
        raise AttnprobeError(f"tokenizer folder {spec} does not exist; pass a folder saved with save_pretrained(), "
                             "an alias or a tokenizer object")
    return path


@contextlib.contextmanager
def probing(model: Any, tokenizer: Any, name: str | None = None) -> Iterator[loading.LoadedModel]:
    """Switch attnprobe's attention function into ``model`` for a scan; restore everything after.

    The model keeps its weights, device and dtype. SAOBP settings in its config (``saobp.apply`` or a refined
    checkpoint) stay in force: the attention function applies them. A model that does not dispatch through
    transformers' AttentionInterface is read through eager ``output_attentions`` instead.

    Yields:
        loading.LoadedModel in eval mode; on exit the previous attention implementation and training mode
        are back.
    """
    loading.register_attention()
    check_model(model)
    tokenizer = _tokenizer(tokenizer, model)
    previous = model.config._attn_implementation
    was_training = model.training
    settings = SaobpSettings.from_json(getattr(model.config, "saobp", None))
    num_layers = num_layers_of(model)
    try:
        model.eval()
        backend = "attnprobe"
        if previous not in loading.ATTN_NAMES:
            _set_attention(model, "saobp" if settings else "attnprobe")
        calls, _ = loading.verify_backend(model, tokenizer, num_layers)
        if calls == 0:
            if settings:
                raise AttnprobeError(f"{type(model).__name__} carries SAOBP settings but does not run attention "
                                     "through transformers' AttentionInterface, so they cannot take effect")
            _set_attention(model, "eager")
            backend = "eager-outputs"
        from attnprobe.models import capability

        causal = loading.is_causal(model.config) or type(model).__name__.endswith(loading.CAUSAL_SUFFIXES)
        with checkpoints.quiet_loading():  # load_model's capability checks: structure, probability rows, padding
            found = capability.inspect(model, tokenizer, backend, causal=causal)
        if backend == "attnprobe" and found.num_layers != num_layers:
            raise AttnprobeError(f"the model made {found.num_layers} attention calls for {num_layers} "
                                 "layers; attnprobe cannot map them to layers")
        device = next(model.parameters()).device
        info = {"name": name or f"in-memory {type(model).__name__}", "path": None, "source": "memory",
                "architecture": type(model).__name__, "model_type": model.config.model_type,
                "layers": found.num_layers, "heads": found.num_heads, "padding": found.padding,
                "attention_read_as": "softmax of output_attentions" if found.recover else None,
                "hidden_size": getattr(model.config, "hidden_size", getattr(model.config, "dim", None)),
                "max_positions": getattr(model.config, "max_position_embeddings", None),
                "saobp": settings.to_json() if settings else None, "causal": causal}
        yield loading.LoadedModel(model=model, tokenizer=tokenizer, info=info, backend=backend,
                                 num_layers=found.num_layers, num_heads=found.num_heads, saobp=settings,
                                 device=device, padding=found.padding, recover=found.recover, causal=causal,
                                 window=capability.eager_window(model.config) if backend == "eager-outputs" else None)
    finally:
        if model.config._attn_implementation != previous:
            _set_attention(model, previous)
        model.train(was_training)


# ---- SAOBP switched into a model in memory -------------------------------------------------------


def saobp_settings(model, variant: str, gamma: float | None, strength: float, layers) -> SaobpSettings:
    """The settings ``saobp.apply`` records, checked like refine's options."""
    if variant not in GAMMAS:
        raise AttnprobeError(f"unknown variant {variant!r}; choose one of {', '.join(GAMMAS)}")
    g = GAMMAS[variant] if gamma is None else float(gamma)
    if not 0.0 <= g < 1.0:
        raise AttnprobeError(f"gamma must be in [0, 1) (got {g})")
    if strength < 0:
        raise AttnprobeError(f"strength must be 0 or more (got {strength})")
    if g == 0.0 or strength == 0.0:
        raise AttnprobeError(f"variant {variant!r} with gamma {g:g} and strength {strength:g} is plain attention: "
                             "nothing to switch in; pass bp-low, bp-high or gamma > 0 (saobp.remove() undoes apply)")
    spec = layers if isinstance(layers, str) else ",".join(str(int(x)) for x in layers)
    try:
        parsed = parse_bp_layers(spec, num_layers_of(model))
    except ValueError as exc:
        raise AttnprobeError(str(exc).replace("--bp-layers", "layers")) from None
    return SaobpSettings(gamma=g, strength=float(strength), layers=parsed,
                         variant=variant if gamma is None else "custom")


def apply_saobp(model, variant: str = "bp-high", gamma: float | None = None, strength: float = 1.0,
                layers="all"):
    """Switch SAOBP into ``model`` (see ``attnprobe.saobp.apply``); returns the model."""
    loading.register_attention()
    check_model(model)
    settings = saobp_settings(model, variant, gamma, strength, layers)
    config = model.config
    if not hasattr(model, _PREVIOUS):  # a second apply changes the settings; remove() still goes back to the first
        setattr(model, _PREVIOUS, (config._attn_implementation, getattr(config, "saobp", None),
                                   getattr(config, "attn_implementation", None)))
    previous = getattr(model, _PREVIOUS)
    _set_attention(model, "saobp")
    try:
        was_training = model.training
        model.eval()
        try:
            calls, indexed = loading.verify_backend(model, _IdsInputs(getattr(config, "vocab_size", None)),
                                                   num_layers_of(model))
        finally:
            model.train(was_training)
        if calls == 0:
            raise AttnprobeError(f"{type(model).__name__} ({config.model_type}) does not run attention through "
                                 "transformers' AttentionInterface, so SAOBP cannot be switched in; use a "
                                 "BERT-style architecture")
        if settings.layers is not None and not indexed:
            raise AttnprobeError(f"{type(model).__name__} ({config.model_type}) shares one attention module across "
                                 "its layers, so SAOBP cannot be restricted to some layers; use layers='all'")
        if settings.layers is not None and any(getattr(m, "layer_idx", None) is None and hasattr(m, "_attnprobe_layer")
                                               for m in model.modules()):
            # the layer tags verify_backend set live only in this session: a reloaded model could not tell
            raise AttnprobeError(f"{type(model).__name__} ({config.model_type}) has attention modules without a "
                                 "layer index, so a saved copy could not restrict SAOBP to some layers; use "
                                 "layers='all'")
    except BaseException:
        _restore(model, previous)
        raise
    config.saobp = settings.to_json()
    # transformers reads ``attn_implementation`` from config.json but does not write it; as a plain config
    # attribute it is saved, so save_pretrained() folders reload with SAOBP (after ``import attnprobe``)
    config.attn_implementation = "saobp"
    return model


def _restore(model, previous) -> None:
    attn, saobp, public = previous
    config = model.config
    _set_attention(model, attn)
    if saobp is None:
        if hasattr(config, "saobp"):
            del config.saobp
    else:
        config.saobp = saobp
    if public is None:
        if "attn_implementation" in config.__dict__:
            del config.attn_implementation
    else:
        config.attn_implementation = public
    if hasattr(model, _PREVIOUS):
        delattr(model, _PREVIOUS)


def remove_saobp(model):
    """Undo ``apply_saobp`` (see ``attnprobe.saobp.remove``); returns the model.

    A model that got SAOBP from its checkpoint (a refined folder) rather than from ``apply`` goes back to
    transformers' default attention (``sdpa``, or ``eager`` where that is not available).
    """
    check_model(model)
    if hasattr(model, _PREVIOUS):
        _restore(model, getattr(model, _PREVIOUS))
        return model
    if not getattr(model.config, "saobp", None) and model.config._attn_implementation != "saobp":
        raise AttnprobeError(f"{type(model).__name__} does not run SAOBP; nothing to remove")
    try:
        _set_attention(model, "sdpa")
    except (ValueError, ImportError):
        _set_attention(model, "eager")
    _restore(model, (model.config._attn_implementation, None, None))
    return model
