"""SAOBP for a model you hold: ``saobp.apply(model, variant="bp-high")`` and ``saobp.remove(model)``.

The public face of the refinement: the formula is formulas/saobp.py (``saobp_probs`` and ``SaobpSettings`` are
re-exported here), switching it into a loaded model is models/inmemory.py.

    >>> from attnprobe import saobp
    >>> callable(saobp.apply) and callable(saobp.remove)
    True
"""

from __future__ import annotations

from typing import Any

from attnprobe.formulas.saobp import GAMMAS, SaobpSettings, saobp_probs

__all__ = ["GAMMAS", "SaobpSettings", "apply", "remove", "saobp_probs"]


def apply(model: Any, variant: str = "bp-high", gamma: float | None = None, strength: float = 1.0,
          layers: str | list[int] | tuple[int, ...] = "all") -> Any:
    """Switch SAOBP into a loaded transformers encoder; return the same model.

    The settings go into ``model.config.saobp`` (and ``attn_implementation = "saobp"``), so a folder written
    by ``model.save_pretrained`` reloads with the same attention once ``import attnprobe`` has run. The
    checks are refine's: the model must dispatch attention through transformers' AttentionInterface, and
    ``layers`` other than ``"all"`` need attention modules that know their layer (not ALBERT's shared one).

    Args:
        model: a transformers ``PreTrainedModel`` (an encoder, with or without a task head).
        variant: ``bp-low`` (gamma 0.5) or ``bp-high`` (gamma 0.9).
        gamma: overrides the variant's gamma, in (0, 1).
        strength: weight of the message term.
        layers: ``all``, ``lower``, ``upper``, ``"0,2"`` or a list of 0-based layers.

    """
    from attnprobe.models import inmemory  # on call: ``from attnprobe import saobp`` stays light

    return inmemory.apply_saobp(model, variant=variant, gamma=gamma, strength=strength, layers=layers)


def remove(model: Any) -> Any:
    """Undo ``apply``: the attention implementation and config the model had before; return the model."""
    from attnprobe.models import inmemory  # on call: ``from attnprobe import saobp`` stays light

    return inmemory.remove_saobp(model)
