"""The attention function attnprobe registers with transformers: eager attention, optional SAOBP, and the probe.

It has transformers' ``eager_attention_forward`` contract (the calling module first; returns
``(attn_output (B, Q, H, D), probs (B, H, Q, K))``) and hands every call's probabilities to the probe active in
the current context (probe.py). The SAOBP formula is formulas/saobp.py; registering this function, with its
mask function, under the names ``"attnprobe"`` and ``"saobp"`` is models/registry.py's. Pure torch: it never
imports transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from attnprobe.capture import probe as _probe
from attnprobe.formulas.saobp import SaobpSettings, saobp_probs


def _layer_of(module: nn.Module) -> int | None:
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        idx = getattr(module, "_attnprobe_layer", None)
    return idx


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: key or value ``(B, G, K, D)`` -> ``(B, G * groups, K, D)``, query head h reading
    key/value head ``h // groups`` (transformers' ``repeat_kv``)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _own_mask(module: nn.Module, q_len: int, k_len: int, sliding_window: int | None,
              device: torch.device) -> torch.Tensor | None:
    """The mask a causal or sliding-window module needs when the caller passes none: ``(1, 1, Q, K)`` bool,
    True where a query may attend (queries are the last ``Q`` of ``K`` positions)."""
    causal = bool(getattr(module, "is_causal", False))
    if not causal and not sliding_window:
        return None
    q = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    allowed = k <= q if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if sliding_window:
        allowed = allowed & ((q - k).abs() < sliding_window)
    return allowed[None, None]


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with optional SAOBP refinement, handing its probabilities to the active probe.

    Same contract as transformers' ``eager_attention_forward``: ``query`` ``(B, H, Q, D)``, ``key`` and
    ``value`` ``(B, G, K, D)`` with ``H`` a multiple of ``G`` (grouped-query and multi-query attention: the
    heads are the query heads), ``attention_mask`` an additive bias or bool mask ``(B, 1, Q, K)`` or None.
    Returns ``(attn_output (B, Q, H, D), probs (B, H, Q, K))``. ``scaling`` multiplies the logits (OPT passes
    1.0, Gemma its ``query_pre_attn_scalar``); ``softcap`` caps them as ``softcap * tanh(S / softcap)`` (Gemma 2)
    before the mask. A causal module (``module.is_causal``) or a ``sliding_window`` with no mask from the caller
    gets its mask here. SAOBP applies when the module's config carries ``saobp`` settings for this layer.
    Learned attention sinks (``s_aux``: rows that do not sum to 1 over the keys) are refused.
    """
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("this model adds learned attention sinks (s_aux), so its attention rows do not sum to 1 "
                         "over the keys; attnprobe does not read such attention")
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    groups = query.shape[1] // key.shape[1]
    if groups * key.shape[1] != query.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads cannot share {key.shape[1]} key/value heads")
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    active = _probe.active_probe()
    # Under a scan's probe without autograd, the (B, H, Q, K) logits and probabilities go into two buffers the
    # probe keeps from layer to layer: the same operations, without taking fresh pages for every layer.
    # Not under autocast: an operation with out= is not autocast, so it would run at another precision.
    reuse = (isinstance(active, _probe.Probe) and active.reuse_buffers and not torch.is_grad_enabled()
             and not torch.is_autocast_enabled(query.device.type))
    if reuse and query.dtype == key.dtype:
        shape = (*query.shape[:-1], key.shape[-2])
        scores_out, probs_out = active.attention_buffers(shape, query.dtype, query.device)
        scores = torch.matmul(query, key.transpose(2, 3), out=scores_out).mul_(scaling)
        if softcap is not None:
            scores.div_(softcap).tanh_().mul_(softcap)
    else:
        reuse = False
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Q, K)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        attention_mask = _own_mask(module, scores.shape[-2], scores.shape[-1], sliding_window, scores.device)
    allowed = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            if isinstance(active, _probe.Probe) and getattr(module, "is_causal", False):
                allowed = attention_mask[:, 0]
            attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
                ~attention_mask, torch.finfo(scores.dtype).min
            )
        elif isinstance(active, _probe.Probe) and getattr(module, "is_causal", False):
            allowed = attention_mask[:, 0] > torch.finfo(attention_mask.dtype).min / 2  # (B, Q, K)
        if reuse and attention_mask.dtype == scores.dtype and \
                torch.broadcast_shapes(attention_mask.shape, scores.shape) == scores.shape:
            scores.add_(attention_mask)
        else:
            scores = scores + attention_mask
            reuse = False
    probs = torch.softmax(scores, dim=-1, out=probs_out) if reuse else nn.functional.softmax(scores, dim=-1)
    settings = getattr(getattr(module, "config", None), "saobp", None)
    plain = None
    if settings:
        if isinstance(settings, dict):
            settings = SaobpSettings.from_json(settings)
        if settings.applies_to(_layer_of(module)):
            plain = probs
            # a mask of -inf would leave a fully masked row NaN, and W @ log1p(-gamma * A) would spread it
            finite = scores
            if attention_mask is not None and bool(torch.isinf(attention_mask).any()):
                finite = scores.clamp_min(torch.finfo(scores.dtype).min)
            probs = saobp_probs(finite, settings.gamma, settings.strength, probs=plain)
    # Unrefined attention under attnprobe's probe: its logits give the direct entropy without a log over
    # (Q, K). Otherwise one layer's (B, H, Q, K) logits are freed before the probe's temporaries.
    logits = scores.detach() if plain is None and isinstance(active, _probe.Probe) else None
    del scores
    if isinstance(active, _probe.Probe):
        active.observe(module, probs.detach(), None if plain is None else plain.detach(), scores=logits,
                       allowed=allowed)
    elif active is not None:
        active.observe(module, probs.detach(), None if plain is None else plain.detach())
    del logits
    attn_output = torch.matmul(nn.functional.dropout(probs, p=dropout, training=module.training), value)
    return attn_output.transpose(1, 2).contiguous(), probs
