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


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with optional SAOBP refinement, handing its probabilities to the active probe.

    Same contract as transformers' ``eager_attention_forward``: ``query`` ``(B, H, Q, D)``, ``key`` and
    ``value`` ``(B, H, K, D)``, ``attention_mask`` an additive bias ``(B, 1, Q, K)`` or None. Returns
    ``(attn_output (B, Q, H, D), probs (B, H, Q, K))``. SAOBP applies when the module's config carries
    ``saobp`` settings for this layer.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
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
    else:
        reuse = False
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Q, K)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
                ~attention_mask, torch.finfo(scores.dtype).min
            )
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
            probs = saobp_probs(scores, settings.gamma, settings.strength, probs=plain)
    # Unrefined attention under attnprobe's probe: its logits give the direct entropy without a log over
    # (Q, K). Otherwise one layer's (B, H, Q, K) logits are freed before the probe's temporaries.
    logits = scores.detach() if plain is None and isinstance(active, _probe.Probe) else None
    del scores
    if logits is not None:
        active.observe(module, probs.detach(), None, scores=logits)
    elif active is not None:
        active.observe(module, probs.detach(), None if plain is None else plain.detach())
    del logits
    attn_output = torch.matmul(nn.functional.dropout(probs, p=dropout, training=module.training), value)
    return attn_output.transpose(1, 2).contiguous(), probs
