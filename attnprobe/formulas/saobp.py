"""SAOBP (Self-Attention One-step Belief Propagation): the refined attention probabilities, as pure torch.

The refinement is this project's reconstruction from the published description of Lee et al. (2025),
"Mitigating Attention Localization in Small Scale: Self-Attention Refinement via One-step Belief
Propagation": attention read as a factor graph over tokens with a repulsive Potts pairwise prior and
one message-passing step. See docs/method.md; the paper's own formulas were not available to us.

    Â = softmax(S + strength * (W @ log1p(-gamma * A))),  A = softmax(S),  gamma = 1 - exp(J)

with ``W`` = ``A`` without its diagonal, rows renormalized. This module is pure torch: the attention function
that uses it is capture/attention.py, switching it into a model is models/inmemory.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


GAMMAS = {"baseline": 0.0, "bp-low": 0.5, "bp-high": 0.9}


@dataclass(frozen=True)
class SaobpSettings:
    """SAOBP settings of one model, stored in its config.json under ``"saobp"``.

    Attributes:
        gamma: ``1 - exp(J)`` in [0, 1); 0 is plain attention.
        strength: weight of the message term.
        layers: ``None`` for every layer, else the 0-based layers that are refined.
        variant: the name it came from (``baseline``, ``bp-low``, ``bp-high`` or ``custom``).
    """

    gamma: float = 0.9
    strength: float = 1.0
    layers: tuple[int, ...] | None = None
    variant: str = "bp-high"

    def applies_to(self, layer: int | None) -> bool:
        if self.gamma == 0.0 or self.strength == 0.0:
            return False
        if self.layers is None:
            return True
        if layer is None:
            raise RuntimeError(
                "SAOBP is restricted to some layers but this attention module has no layer index; "
                "use bp_layers='all' for this architecture"
            )
        return layer in self.layers

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else "all"
        return d

    @classmethod
    def from_json(cls, d: dict | None) -> SaobpSettings | None:
        if not d:
            return None
        layers = d.get("layers", "all")
        return cls(
            gamma=float(d.get("gamma", 0.9)),
            strength=float(d.get("strength", 1.0)),
            layers=None if layers in ("all", None) else tuple(int(x) for x in layers),
            variant=str(d.get("variant", "custom")),
        )


def parse_bp_layers(spec: str, num_layers: int) -> tuple[int, ...] | None:
    """``all`` -> None; ``lower``/``upper`` -> first/second half; ``0,2,3`` -> those layers.

    >>> parse_bp_layers("upper", 6)
    (3, 4, 5)
    >>> parse_bp_layers("all", 6) is None
    True
    """
    spec = spec.strip().lower()
    if spec == "all":
        return None
    half = num_layers // 2
    if spec == "lower":
        return tuple(range(max(half, 1)))
    if spec == "upper":
        return tuple(range(half, num_layers))
    try:
        layers = tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"--bp-layers {spec!r}: expected all, lower, upper or a list like 0,1,3") from None
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad or not layers:
        raise ValueError(f"--bp-layers {spec!r}: layers must be in 0..{num_layers - 1}")
    return layers


def message_weights(probs: torch.Tensor) -> torch.Tensor:
    """``W``: ``probs`` with the diagonal zeroed and rows renormalized; all-zero rows stay 0. (..., Q, K)."""
    eye = torch.eye(probs.shape[-1], dtype=torch.bool, device=probs.device)
    w = probs.masked_fill(eye, 0.0)
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), 0.0)


def saobp_probs_readable(scores: torch.Tensor, gamma: float, strength: float = 1.0,
                         probs: torch.Tensor | None = None) -> torch.Tensor:
    """``saobp_probs`` written out term by term, differentiated by autograd: the specification that the fused
    ``saobp_probs`` is tested against (values and gradients). Same arguments and result."""
    if probs is None:
        probs = torch.softmax(scores, dim=-1)
    if gamma == 0.0 or strength == 0.0:
        return probs
    messages = message_weights(probs) @ torch.log1p(-gamma * probs)  # (B, H, Q, K)
    return torch.softmax(scores + strength * messages, dim=-1)


class _Messages(torch.autograd.Function):
    """The refined logits ``Z = S + strength * (W @ L)``, ``L = log1p(-gamma * A)``, from ``S`` and ``A`` with a
    hand-written backward that keeps only ``A``, ``W`` and ``L`` and makes fewer passes over ``(B, H, Q, K)``
    memory than autograd's graph of the readable form (``saobp_probs_readable``). The sum with ``S`` is the
    matrix product's own accumulation (``baddbmm``), not another pass.

    Backward, with ``dZ`` the incoming gradient: ``dS = dZ``; with ``G = strength * dZ`` and
    ``r_i = 1 / sum_{j != i} A_ij`` (0 for a row without off-diagonal mass): ``dW = G @ L^T``,
    ``dL = W^T @ G``, and the gradient of ``A`` is ``r_i * (dW_ij - sum_j' dW_ij' W_ij')`` off the diagonal
    (the renormalization; 0 on it) plus ``-gamma * dL / (1 - gamma * A)`` (the messages).
    """

    @staticmethod
    def forward(ctx, scores, probs, gamma: float, strength: float):
        weights = probs.clone()  # (B, H, Q, Q)
        weights.diagonal(dim1=-2, dim2=-1).zero_()  # A without its diagonal
        total = weights.sum(-1, keepdim=True)  # (B, H, Q, 1): the off-diagonal mass, summed directly
        inverse = torch.where(total > 0, total.clamp_min(torch.finfo(total.dtype).tiny).reciprocal(), 0.0)
        weights.mul_(inverse)  # W, rows renormalized; a row with no off-diagonal mass stays 0
        logs = torch.mul(probs, -gamma).log1p_()  # (B, H, K, K): log of the messages 1 - gamma * A
        ctx.save_for_backward(probs, weights, logs, inverse)
        ctx.gamma, ctx.strength = gamma, strength
        *lead, q, k = scores.shape
        z = torch.baddbmm(scores.reshape(-1, q, k), weights.reshape(-1, q, q), logs.reshape(-1, k, k),
                          alpha=strength)
        return z.view(*lead, q, k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        probs, weights, logs, inverse = (t.to(grad.dtype) for t in ctx.saved_tensors)
        gamma, strength = ctx.gamma, ctx.strength
        g = grad if strength == 1.0 else grad * strength  # G, the gradient of W @ L
        grad_probs = torch.matmul(g, logs.transpose(-1, -2))  # dW, (B, H, Q, Q)
        grad_logs = torch.matmul(weights.transpose(-1, -2), g)  # dL, (B, H, K, K)
        # renormalization: W_ij = A_ij * r_i off the diagonal; W_ii = 0 carries no gradient
        centred = (grad_probs * weights).sum(-1, keepdim=True)  # (B, H, Q, 1); linalg.vecdot is slower on CPU
        grad_probs.sub_(centred).mul_(inverse)
        grad_probs.diagonal(dim1=-2, dim2=-1).zero_()
        # messages: dL/dA = -gamma / (1 - gamma * A)
        grad_probs.addcdiv_(grad_logs, torch.rsub(probs, 1.0, alpha=gamma), value=-gamma)
        return grad, grad_probs, None, None


def saobp_probs(scores: torch.Tensor, gamma: float, strength: float = 1.0,
                probs: torch.Tensor | None = None) -> torch.Tensor:
    """Refined attention ``Â = softmax(S + strength * (W @ log1p(-gamma * A)))``.

    The refined logits have a fused forward and a hand-written backward (``_Messages``);
    ``saobp_probs_readable`` is the same formula term by term and the specification it is tested against.

    Args:
        scores: ``(B, H, Q, K)`` attention logits including the additive padding bias (``Q == K``).
        gamma: ``1 - exp(J)`` in [0, 1).
        strength: weight of the message term.
        probs: ``softmax(scores)`` if already computed (gradients flow through it and through ``scores``).

    Returns:
        ``(B, H, Q, K)`` refined probabilities; padded keys stay exactly 0.

    >>> S = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=torch.float64))
    >>> [round(x, 6) for x in saobp_probs(S, 0.9)[0].tolist()]
    [0.789299, 0.102782, 0.107919]
    """
    if probs is None:
        probs = torch.softmax(scores, dim=-1)
    if gamma == 0.0 or strength == 0.0:
        return probs
    return _Messages.apply(scores, probs, float(gamma), float(strength)).softmax(dim=-1)


