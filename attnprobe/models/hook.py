"""A post-import hook: run attnprobe's attention registration once transformers' modeling code loads.

It exists so that ``import attnprobe`` stays light (no torch, no transformers) while a later
``from transformers import AutoModel`` still finds the ``"saobp"`` and ``"attnprobe"`` attention
implementations. It does nothing else: it never changes what the module it watches contains.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


class RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loader of one module to call the registration after it runs."""

    def __init__(self, target: str):
        self.target = target
        self._busy = False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            importlib.import_module("attnprobe.models.loading").register_attention()

        loader.exec_module = exec_and_register
        return spec
