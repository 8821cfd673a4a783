"""attnprobe's version, in a module of its own so that any wing can record it (run.json) without importing
the package's public face."""

__version__ = "0.1.0"
