"""Keep freed CPU memory for reuse by the next training step or scan batch (glibc's malloc on Linux).

A training step allocates and frees the same large activation and gradient buffers every step (SAOBP adds
several per layer), and a scan batch its ``(B, H, L, L)`` attention buffers. With glibc's default thresholds,
buffers above the mmap threshold (128 KiB at first, raised by glibc as it sees larger ones freed, to at most
32 MiB) are mapped and unmapped each time, and free space at the top of the heap beyond twice that threshold
is handed back to the kernel (after a backward pass, for instance), so the next step or batch takes those pages
again as fresh, zeroed page faults. ``keep_freed_memory`` raises both thresholds so that freed memory stays in
the process for the next one, as PyTorch's GPU caching allocator does on CUDA. The process then holds its
peak footprint until it exits.

``attnprobe refine`` calls it for training on the CPU and the ``attnprobe scan`` command for a scan on the CPU;
``ATTNPROBE_KEEP_FREED_MEMORY=0`` turns it off. run.json records ``label(...)`` as ``cpu_allocator``.
Elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest value glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # never hand the top of the heap back during the run

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds once per process; True if they are in effect.

    False where the C library is not glibc, or where ``ATTNPROBE_KEEP_FREED_MEMORY`` is ``0``.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("ATTNPROBE_KEEP_FREED_MEMORY", "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library the interpreter runs on
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc (musl's mallopt does nothing)
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def label(kept: bool) -> str:
    """run.json's ``cpu_allocator``: ``keeps freed memory`` or ``default``."""
    return "keeps freed memory" if kept else "default"
