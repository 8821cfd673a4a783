"""Diagnostics computed inside the Trainer's own evaluation forward passes: one pass over the eval set.

``training/probing_trainer.py``'s ``ProbingTrainer`` is transformers' ``Trainer`` with one addition: while
``evaluate()`` runs, every ``prediction_step`` runs its forward pass under an EvalProbe (a probe.py Probe), with the keep mask and the special-token
mask of that batch computed from its ``input_ids`` and ``attention_mask`` (the data collator pads per
batch). The loss, logits and scores the Trainer computes are untouched, so early stopping and the metrics
stay as they are; what changes is that refine no longer reads the eval set a second time for its
diagnostics.

Each process probes its own batches. The per-example sums of every batch go through the same
``accelerator.gather_for_metrics`` the Trainer uses for the logits, which drops the examples a sharded eval
loader repeats to even out the last batch, so every process ends with the sums over exactly the examples
that the Trainer's scores cover, each once. Sequences with fewer than 2 valid tokens are left out, as in
scan. The result equals a separate ``scanner.run_batches`` scan of the eval set to float tolerance (batches
are padded differently). This module does not decide when diagnostics are taken, and writes nothing.
"""

from __future__ import annotations

import torch

from attnprobe.capture.probe import COUNT_KEYS, VAR_KEYS, Probe, capturing


class EvalProbe:
    """Sums of the scan metrics over the examples of one evaluation, fed batch by batch.

    Args:
        num_layers: attention calls per forward pass.
        hops: K of the multi-hop attention.
        special_ids: the tokenizer's special token ids (``special_mass``).
        metric_dtype: dtype the metrics are computed in (as scan chooses it).
        num_heads: heads per layer, if known.
    """

    def __init__(self, num_layers: int, hops: int, special_ids: list[int],
                 metric_dtype: torch.dtype = torch.float32, num_heads: int | None = None):
        self.probe = Probe(num_layers, hops=hops, per_example=True, metric_dtype=metric_dtype,
                           num_heads=num_heads)
        self.special_ids = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.active = False
        self.batches = 0  # forward passes probed in the evaluation in progress
        self.sequences = 0  # sequences counted (after de-duplication, at least 2 tokens)
        self._sums: dict[str, torch.Tensor] | None = None

    @classmethod
    def for_model(cls, loaded, hops: int) -> EvalProbe:
        """An EvalProbe for a ``models.LoadedModel``, with the metric dtype scan would use."""
        dtype = next(loaded.model.parameters()).dtype
        return cls(loaded.num_layers, hops, list(getattr(loaded.tokenizer, "all_special_ids", []) or []),
                   metric_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                   num_heads=loaded.num_heads or None)

    def start(self) -> None:
        """Begin an evaluation: forget the sums of any earlier one."""
        self.active = True
        self.batches = 0
        self.sequences = 0
        self._sums = None

    def stop(self) -> None:
        self.active = False

    def masks(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``keep`` and ``special`` ``(B, Q)`` bool masks of a collated batch, as scan builds them."""
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        keep = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        special = torch.isin(input_ids, self.special_ids.to(input_ids.device)) & keep
        return keep, special

    def run(self, inputs: dict, forward, gather=None):
        """``forward()`` (one evaluation step on ``inputs``) under the probe; its sums added. Returns its result.

        ``gather`` combines a dict of ``(B, ...)`` tensors of every process's batch into the examples of the
        whole step, each once (the Trainer's ``accelerator.gather_for_metrics``); None for one process.
        """
        keep, special = self.masks(inputs)
        self.probe.begin(keep, special)
        try:
            with capturing(self.probe):
                result = forward()
        except BaseException:
            self.probe.abort()
            raise
        per = self.probe.end()  # {name: (B, L, H)}
        per["tokens"] = keep.sum(-1).to(torch.float64)  # (B,)
        if gather is not None:
            device = inputs["input_ids"].device
            per = {k: v.cpu() for k, v in gather({k: v.to(device) for k, v in per.items()}).items()}
        self._add(per)
        self.batches += 1
        return result

    def _add(self, per: dict[str, torch.Tensor]) -> None:
        counted = per.pop("tokens") >= 2  # (B,): scan skips sequences of fewer than 2 tokens
        self.sequences += int(counted.sum())
        # bp_shift of an unrefined layer is NaN for every example and stays NaN in the sum, as in Probe.end
        sums = {k: v[counted].sum(0) for k, v in per.items()}  # (L, H) each
        if self._sums is None:
            self._sums = sums
        else:
            for k, v in sums.items():
                self._sums[k] += v

    def take(self) -> dict[str, torch.Tensor] | None:
        """The ``(L, H)`` sums of the evaluation just run (None if none was probed); forgets them."""
        sums, self._sums = self._sums, None
        if sums is None or self.sequences == 0:
            return None
        some = next(iter(sums.values()))
        for key in (*COUNT_KEYS, *VAR_KEYS):  # the keys Probe.totals() has, 0 where no block reported them
            sums.setdefault(key, torch.zeros_like(some))
        return sums


def supported(loaded, args) -> bool:
    """Whether the evaluation pass can carry the probe: the model streams attention through attnprobe's
    function (not eager ``output_attentions``), and no ``nn.DataParallel`` runs replicas in other threads
    (the probe is a context variable of this thread)."""
    return loaded.backend == "attnprobe" and int(getattr(args, "n_gpu", 1)) <= 1


