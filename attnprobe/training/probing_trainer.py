"""``ProbingTrainer``: transformers' ``Trainer`` whose evaluation passes also feed an EvalProbe.

The probe itself, and what it sums, is capture/evalprobe.py; this module only routes ``evaluate()`` and
``prediction_step`` through it. The loss, logits and scores the Trainer computes are untouched.
"""

from __future__ import annotations

from transformers import Trainer

from attnprobe.capture.evalprobe import EvalProbe


class ProbingTrainer(Trainer):
    """``Trainer`` whose ``evaluate()`` also feeds ``eval_probe`` from its own forward passes.

    ``predict()`` and training steps are unchanged. Without ``eval_probe`` it is a plain Trainer.
    """

    def __init__(self, *args, eval_probe: EvalProbe | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_probe = eval_probe

    def evaluate(self, *args, **kwargs):
        if self.eval_probe is None:
            return super().evaluate(*args, **kwargs)
        self.eval_probe.start()  # the sums are read by callbacks' on_evaluate, inside super().evaluate()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.eval_probe.stop()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        probe = self.eval_probe
        if probe is None or not probe.active:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        gather = self.accelerator.gather_for_metrics if self.accelerator.num_processes > 1 else None
        return probe.run(inputs, lambda: super(ProbingTrainer, self).prediction_step(
            model, inputs, prediction_loss_only, ignore_keys=ignore_keys), gather=gather)
