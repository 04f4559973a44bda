"""Memory allocator settings, applied when the command line starts, before TensorFlow is imported.

glibc's malloc raises its mmap threshold up to 32 MiB after a big block is
freed, and from then on keeps such blocks in its heaps, fragmented, one heap
per thread up to 8 x cores.  So:

* ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``: a fixed threshold, so every big
  block is mmapped and given back to the system when it is freed;
* ``mallopt(M_ARENA_MAX, 2)``: two malloc heaps, fewer to fragment.

The same as ``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_ARENA_MAX=2`` in the
environment, for this process only.  A setting the user gave (either
variable, or the same in ``GLIBC_TUNABLES``) wins and is left alone.
Arithmetic and speed are unchanged (a MobileNetV2-0.35 training step at 192
px: 444 vs 436 ms).

Not set here: ``TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1``.  With it, oneDNN's tensors
(TensorFlow's default on x86 Linux) come through malloc instead of a pool
that grows by doubling and never shrinks: with the settings above a whole
GTSRB run then peaks at 2.2 GB instead of 2.9 GB, but every big tensor is
mmapped and faulted in afresh, and training steps take 2-4 times as long
(BENCHMARKS.md, "Peak memory").  Set it yourself where memory is what is
short (a small board).  Not glibc: nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Dict

MMAP_THRESHOLD = 128 * 1024
ARENA_MAX = 2
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # <malloc.h>


def _user_set(variable: str, tunable: str) -> bool:
    return variable in os.environ or f"glibc.malloc.{tunable}" in os.environ.get("GLIBC_TUNABLES", "")


def configure() -> Dict[str, Any]:
    """Applies the settings the user did not give; returns what it applied."""
    applied: Dict[str, Any] = {}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return applied
    if not _user_set("MALLOC_MMAP_THRESHOLD_", "mmap_threshold") and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        applied["M_MMAP_THRESHOLD"] = MMAP_THRESHOLD
    if not _user_set("MALLOC_ARENA_MAX", "arena_max") and mallopt(_M_ARENA_MAX, ARENA_MAX):
        applied["M_ARENA_MAX"] = ARENA_MAX
    return applied
