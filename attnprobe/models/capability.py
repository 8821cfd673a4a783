"""What a loaded model's attention looks like: its shape, whether it is probabilities, and padding.

attnprobe scans any model whose attention is, per layer, a square ``(B, H, n, n)`` tensor of probability
rows. This module decides that by running the model on two short sentences at load time (``inspect``),
and it validates every tensor the ``output_attentions`` fallback hands over during a scan
(``checked_probs``). It refuses with one line in the user's terms, never a raw exception. It does not
compute metrics (metrics.py, probe.py) nor load checkpoints (models.py).

Three facts are measured, not looked up by model type:

- the structure: one 4-D tensor per layer, queries = keys = input length, the same heads in every
  layer; the head count comes from the tensor (ConvBERT's ``head_ratio`` makes it smaller than
  ``num_attention_heads``);
- probabilities: rows sum to 1 over the valid keys, no negative weights. An architecture that returns
  its pre-softmax scores instead (SqueezeBERT) is read through ``softmax`` only when the outputs of the
  model's own ``nn.Softmax`` modules equal that softmax in the check, which shows that those are the
  probabilities it uses; otherwise it is refused;
- padding invariance: a sentence's attention alone and right-padded in a batch. A model that fails it
  (a trigram input embedding that reads the pad token, convolutions along the sequence) is scanned
  without padding (``padding = "none"``: batches of sequences of one length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnprobe.errors import AttnprobeError
from attnprobe.capture import probe as _probe

CHECK_TEXTS = ("attention check", "a longer sentence to see whether padding changes what the model attends to")


def tolerance(dtype: torch.dtype) -> float:
    """Allowed deviation of a row sum from 1 (and of a padded from an unpadded weight) for a dtype."""
    return {torch.float64: 1e-6, torch.float32: 1e-4}.get(dtype, 2e-2)


def arch_name(model) -> str:
    """``LongformerModel`` -> ``Longformer``: the architecture as users know it."""
    name = type(model).__name__
    for suffix in ("ForSequenceClassification", "ForMaskedLM", "Model"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class Capability:
    """What inspect() found: how many layers and heads, how to read them, whether padding is safe."""

    num_layers: int
    num_heads: int
    padding: str = "right"  # "right": batches are right-padded; "none": batches of equal length only
    recover: str | None = None  # "softmax": the model returns pre-softmax scores (see module docstring)
    padding_gap: float = 0.0  # largest change of an attention weight caused by padding, in the check


class _Recorder:
    """Stand-in probe that keeps a copy of every attention tensor the attention function hands over."""

    def __init__(self):
        self.probs: list[torch.Tensor] = []

    def observe(self, module, probs, plain=None):
        self.probs.append(probs.detach().clone())


def _forward(model, batch: dict[str, torch.Tensor], backend: str) -> Any:
    """Attention of every layer for ``batch``: a list of tensors (attnprobe) or what the model returns."""
    arch = arch_name(model)
    try:
        with torch.no_grad():
            if backend == "attnprobe":
                recorder = _Recorder()
                with _probe.capturing(recorder):
                    model(**batch)
                return recorder.probs
            out = model(**batch, output_attentions=True)
    except AttnprobeError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise AttnprobeError(
            f"{arch} fails on a plain-text check sentence ({first}); attnprobe feeds token ids and an attention "
            "mask only (models that need more inputs, such as layout boxes, are not supported)"
        ) from None
    return getattr(out, "attentions", None)


def check_structure(attentions: Any, arch: str, batch_size: int, length: int,
                    num_heads: int | None = None) -> tuple[int, int]:
    """Refuse anything but one ``(B, H, n, n)`` tensor per layer; return ``(layers, heads)``."""
    if attentions is None or not isinstance(attentions, (tuple, list)) or len(attentions) == 0:
        raise AttnprobeError(
            f"{arch} returns no attention weights; attnprobe needs the n x n attention of every layer"
        )
    for layer, a in enumerate(attentions):
        if not torch.is_tensor(a):
            raise AttnprobeError(f"{arch} returns its attention as {type(a).__name__}, not as tensors; attnprobe cannot read it")
        shape = tuple(a.shape)
        if a.dim() != 4:
            raise AttnprobeError(
                f"{arch}'s attention of layer {layer} is {a.dim()}-D {shape}, not (batch, heads, n, n); "
                "attnprobe needs full n x n attention per head"
            )
        B, H, Q, K = shape
        if B != batch_size:
            raise AttnprobeError(f"{arch}'s attention of layer {layer} has {B} sequences for a batch of {batch_size}")
        if Q != length or K != length:
            kind = "banded" if Q == length else "pooled (the sequence is shortened inside the model)"
            raise AttnprobeError(
                f"{arch}'s attention is {kind}, not n x n (layer {layer}: {Q} queries x {K} keys for "
                f"{length} tokens); attnprobe needs full attention"
            )
        if num_heads is not None and H != num_heads:
            raise AttnprobeError(
                f"{arch}'s attention of layer {layer} has {H} heads, not {num_heads} as the other layers; "
                "attnprobe needs the same heads in every layer"
            )
        num_heads = H
    return len(attentions), int(num_heads)


def probability_problem(probs: torch.Tensor, keep: torch.Tensor) -> str | None:
    """Why ``probs`` ``(B, H, Q, K)`` are not attention probabilities over ``keep`` ``(B, K)``, or None.

    Checked on valid query rows with finite values only (non-finite rows are counted by the probe):
    no weight below 0, rows summing to 1 over the valid keys, no weight on padded keys.
    """
    tol = tolerance(probs.dtype)
    keep = keep.to(probs.device).bool()
    query = keep[:, None, :, None]  # (B, 1, Q, 1)
    finite = torch.isfinite(probs).all(-1, keepdim=True) & query  # (B, H, Q, 1) rows to check
    if not bool(finite.any()):
        return None
    x = torch.where(finite, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    low = float(x.min())
    if low < -tol:
        return f"negative weights (as low as {low:.3g})"
    key = keep[:, None, None, :]  # (B, 1, 1, K)
    sums = (x * key).sum(-1, keepdim=True)  # (B, H, Q, 1)
    err = torch.where(finite, (sums - 1).abs(), torch.zeros((), dtype=probs.dtype, device=probs.device))
    if float(err.max()) > tol:
        valid = sums[finite]
        return f"rows that sum to {float(valid.min()):.3g}..{float(valid.max()):.3g}, not 1"
    leak = float((x * ~key).abs().sum(-1).max())
    if leak > tol:
        return f"weight on padding tokens (up to {leak:.3g} per row)"
    return None


def _softmax_outputs(model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of the model's own ``nn.Softmax`` modules, in call order, during one forward pass."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
             for m in model.modules() if isinstance(m, torch.nn.Softmax)]
    try:
        with torch.no_grad():
            model(**batch, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _softmax_is_what_it_uses(model, batch, attentions) -> bool:
    """True when the model's softmax modules output exactly ``softmax(returned scores)``, layer by layer."""
    used = _softmax_outputs(model, batch)
    if len(used) != len(attentions):
        return False
    tol = tolerance(attentions[0].dtype)
    for u, a in zip(used, attentions):
        if u.shape != a.shape or float((u - torch.softmax(a, dim=-1)).abs().max()) > tol:
            return False
    return True


def readable(attentions: list[torch.Tensor], recover: str | None) -> list[torch.Tensor]:
    return [torch.softmax(a, dim=-1) for a in attentions] if recover == "softmax" else list(attentions)


def _encode(tokenizer, texts, device) -> dict[str, torch.Tensor]:
    """The texts as one right-padded batch, padded here (as the scan pads), whatever side the tokenizer pads on
    and whether or not it has a pad token."""
    enc = tokenizer(list(texts))
    n = max(len(x) for x in enc["input_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {"input_ids": torch.full((len(texts), n), pad, dtype=torch.long),
           "attention_mask": torch.zeros((len(texts), n), dtype=torch.long)}
    if "token_type_ids" in enc:
        out["token_type_ids"] = torch.zeros((len(texts), n), dtype=torch.long)
    for b, ids in enumerate(enc["input_ids"]):
        out["input_ids"][b, :len(ids)] = torch.tensor(ids)
        out["attention_mask"][b, :len(ids)] = 1
        if "token_type_ids" in enc:
            out["token_type_ids"][b, :len(ids)] = torch.tensor(enc["token_type_ids"][b])
    return {k: v.to(device) for k, v in out.items()}


def ahead_weight(probs: torch.Tensor) -> float:
    """The largest weight a query puts on a later position, ``probs`` ``(B, H, n, n)``: 0 for causal attention."""
    n = probs.shape[-1]
    ahead = torch.ones(n, n, dtype=torch.bool, device=probs.device).triu(1)
    return float(probs.masked_select(ahead).abs().max()) if n > 1 else 0.0


def config_problem(config) -> str | None:
    """Attention that short check sentences cannot reveal, read from the config: BigBird's block-sparse
    attention is full below about 8 blocks and sparse (with random blocks) above, so it is refused."""
    if getattr(config, "attention_type", None) == "block_sparse":
        return ("BigBird's block-sparse attention is not n x n on longer sequences; attnprobe needs full "
                "attention (a checkpoint saved with attention_type 'original_full' scans)")
    return None


def eager_window(config) -> int | None:
    """The local-attention window of a decoder read through ``output_attentions`` (GPT-Neo's ``window_size``,
    a ``sliding_window``), or None. Its masks are not handed over, so sequences are kept within the window,
    where local attention equals causal attention."""
    window = getattr(config, "window_size", None) or getattr(config, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def inspect(model, tokenizer, backend: str, causal: bool = False) -> Capability:
    """Run the load-time checks (structure, probabilities, padding invariance); refuse what fails.

    Three tiny forward passes: the short check sentence alone, the long one alone, both in one
    right-padded batch. A ``causal`` model (a decoder) must also put no weight on later positions.
    """
    arch = arch_name(model)
    if (problem := config_problem(model.config)) is not None:
        raise AttnprobeError(problem)
    device = next(model.parameters()).device
    alone = [_encode(tokenizer, [t], device) for t in CHECK_TEXTS]
    outs = []
    for batch in alone:
        att = _forward(model, batch, backend)
        n = batch["input_ids"].shape[1]
        layers, heads = check_structure(att, arch, 1, n)
        outs.append(list(att))
    recover = None
    keep = alone[0]["attention_mask"]
    problem = probability_problem(outs[0][0], keep)
    if problem is None:
        problem = next((p for a in outs[0][1:] if (p := probability_problem(a, keep))), None)
    if problem is not None:
        if backend == "eager-outputs" and _softmax_is_what_it_uses(model, alone[0], outs[0]):
            recover = "softmax"
        else:
            raise AttnprobeError(
                f"{arch}'s output_attentions are not probabilities ({problem}); attnprobe cannot tell "
                "what attention the model uses, so it refuses rather than report wrong numbers"
            )
    for att, batch in zip(outs, alone):
        for layer, probs in enumerate(readable(att, recover)):
            if (problem := probability_problem(probs, batch["attention_mask"])) is not None:
                raise AttnprobeError(f"{arch}'s attention of layer {layer} is not probabilities ({problem}); attnprobe refuses it")
            if causal and (ahead := ahead_weight(probs)) > tolerance(probs.dtype):
                raise AttnprobeError(f"{arch} is a decoder but its layer {layer} puts weight {ahead:.3g} on later "
                                     "positions; attnprobe cannot tell which keys its queries see, so it refuses it")
    both = _encode(tokenizer, CHECK_TEXTS, device)
    if both["attention_mask"].all():
        raise AttnprobeError(f"the tokenizer gives both check sentences {both['input_ids'].shape[1]} tokens; "
                             "it does not split text into words")
    padded = _forward(model, both, backend)
    check_structure(padded, arch, 2, both["input_ids"].shape[1], heads)
    n = alone[0]["input_ids"].shape[1]
    gap = 0.0
    for single, batched in zip(readable(outs[0], recover), readable(padded, recover)):
        gap = max(gap, float((batched[0, :, :n, :n] - single[0]).abs().max()))
    tol = tolerance(outs[0][0].dtype)
    return Capability(num_layers=layers, num_heads=heads, padding="none" if gap > tol else "right",
                      recover=recover, padding_gap=gap)


def checked_probs(attentions: Any, keep: torch.Tensor, arch: str, num_layers: int, num_heads: int,
                  recover: str | None) -> list[torch.Tensor]:
    """Validate one batch's ``output_attentions`` and return them as probabilities (one tensor per layer).

    Raises AttnprobeError (one line) for a wrong shape, a changed head count, or rows that are not
    probability distributions over the valid keys.
    """
    B, n = keep.shape
    layers, _ = check_structure(attentions, arch, B, n, num_heads)
    if layers != num_layers:
        raise AttnprobeError(f"{arch} returned {layers} attention layers for a batch, {num_layers} at load time")
    out = readable(attentions, recover)
    for layer, probs in enumerate(out):
        if (problem := probability_problem(probs, keep)) is not None:
            raise AttnprobeError(
                f"{arch}'s attention of layer {layer} is not probabilities in this batch ({problem}); "
                "attnprobe stopped rather than report wrong numbers"
            )
    return out
