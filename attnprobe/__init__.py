"""attnprobe: attention diagnostics (GTD, entropies, collapse flags) and SAOBP refinement for encoders and decoders.

This module holds the version, the error type and the public API. It imports nothing heavy: the
public functions are loaded on first use, so `attnprobe --version` stays fast. Importing it also
makes sure attnprobe's attention implementations (``"attnprobe"`` and ``"saobp"``) are registered
with transformers as soon as transformers' modeling code is loaded, so a refined checkpoint reloads
with plain ``AutoModel.from_pretrained`` after ``import attnprobe``.
"""

from __future__ import annotations

import importlib
import sys

from attnprobe.errors import AttnprobeError
from attnprobe.version import __version__

# No public name here is also the name of a submodule: once a submodule is imported, Python binds its
# name on the package, so a lazy alias of the same name would flip between function and module. That is
# why the scan wing is ``attnprobe.scanning`` and ``attnprobe.scan`` is a function (``attnprobe.api.scan``).
_LAZY = {
    "scan": "attnprobe.api",
    "ScanResult": "attnprobe.scanning.scanner",
    "ScanConfig": "attnprobe.config",
    "RefineConfig": "attnprobe.config",
    "Thresholds": "attnprobe.config",
    "load_model": "attnprobe.models.loading",
    "write_report": "attnprobe.report.writer",
    "saobp_probs": "attnprobe.formulas.saobp",
}

__all__ = ["AttnprobeError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnprobe' has no attribute {name!r}")


def _install_registration_hook() -> None:
    """Register attnprobe's attention functions now if transformers is loaded, else right after it is."""
    target = "transformers.modeling_utils"
    if target in sys.modules:
        importlib.import_module("attnprobe.models.loading").register_attention()
        return
    from attnprobe.models.hook import RegisterAfterImport

    if not any(isinstance(f, RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterAfterImport(target))


_install_registration_hook()
