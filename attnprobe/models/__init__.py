"""The models wing: finding, loading and checking models, and switching attnprobe's attention into them.

Owns checkpoint folders, aliases, weights and tokenizers (checkpoints.py), offline loading and the
registration of the attention function with transformers (loading.py), what a loaded model's
attention looks like: shape, probability rows, padding (capability.py), models already in memory and SAOBP
switched in or out (inmemory.py), and the import hook that registers the attention functions once transformers
loads (hook.py). Imports transformers, the capture and formulas wings, ``attnprobe.config`` and
``attnprobe.errors``. This ``__init__`` imports nothing, so ``import attnprobe`` stays light.
"""
