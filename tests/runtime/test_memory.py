"""memory.keep_freed_memory: large buffers come from the heap and stay there once freed (glibc's mallinfo2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import ctypes, json, torch
    from attnprobe.runtime import memory

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        print(json.dumps(None)); raise SystemExit
    libc.mallinfo2.restype = Info
    applied = memory.keep_freed_memory()
    heap = libc.mallinfo2().arena  # bytes the heap holds from the kernel
    x = torch.empty(5 * 2**20).fill_(1.0)  # 20 MiB
    mapped = libc.mallinfo2().hblkhd  # bytes in regions mapped apart from the heap
    del x
    print(json.dumps({"applied": applied, "mapped": mapped, "heap_growth_after_free": libc.mallinfo2().arena - heap}))
""")


def _run(keep: str) -> dict | None:
    env = {**os.environ, "ATTNPROBE_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_large_buffers_come_from_the_heap_and_stay_after_free():
    kept = _run("1")
    if kept is None or not kept["applied"]:
        pytest.skip("the C library is not glibc 2.33 or later")
    assert kept["mapped"] < 20 * 2**20  # served from the heap
    assert kept["heap_growth_after_free"] >= 20 * 2**20  # and kept there for the next step
    default = _run("0")
    assert not default["applied"]
    assert default["mapped"] >= 20 * 2**20  # glibc's default: a mapping of its own, unmapped on free
    assert default["heap_growth_after_free"] < 20 * 2**20
