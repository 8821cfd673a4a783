"""The one error type attnprobe raises for a problem with the user's input or environment.

Every wing may import it; it imports nothing. The CLI prints its message on one or two lines and exits 1.
"""

from __future__ import annotations


class AttnprobeError(Exception):
    """A problem with the user's input or environment, reported as a short message (exit code 1)."""
