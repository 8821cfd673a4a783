"""The scanning wing: the scan job, a corpus streamed through a model under a probe and reduced to tables.

Owns the forward passes and the batch loop that scan, refine and the Trainer callback share (passes.py), the
scan itself and its run folder (scanner.py), the Parquet tables of heads, layers and examples (tables.py) and
the kept attention patterns with their table (patterns.py). Imports the runtime, formulas, capture, models and
data wings and ``attnprobe.config``; never the training or report wings. (It is not called ``scan``: that
name on the package is the function ``attnprobe.scan``.)
"""
