"""The capture wing: getting each layer's attention out of a forward pass and reduced as it streams past.

Owns the probe (probe.py), the attention function transformers calls, which hands the probabilities to it
(attention.py), the probe that rides the Trainer's own evaluation passes (evalprobe.py) and the keeper and
picker of full attention patterns for drawing (patterns.py). Imports torch and the formulas wing; never
transformers (registering the attention function is the models wing's), pandas or a later wing.
"""
