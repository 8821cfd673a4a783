"""The formulas wing: the math of attnprobe as pure torch functions, the readable spec of every number it prints.

Owns the per-query metric functions and flags (metrics.py), the block reduction the probe runs and its scratch
buffers (blocks.py), the same reduction as one function for ``torch.compile`` (compiled.py), and the SAOBP
refinement formula with its settings (saobp.py). Imports torch and nothing else: no other wing, no
transformers, no pandas.
"""
