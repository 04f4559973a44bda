"""Memory allocator settings, applied when the command line starts, before TensorFlow is imported.

Measured with ``benchmarks/memory.py`` (BENCHMARKS.md, "Peak memory"): without
them a GTSRB run keeps memory it no longer uses.

* ``TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1``: with oneDNN (TensorFlow's default on
  x86 Linux) tensors of 4 KiB and more otherwise come from a pool that grows
  by doubling and never shrinks; through malloc they are given back.
* ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``: a fixed threshold (glibc otherwise
  raises it up to 32 MiB after a big block is freed, and then keeps such
  blocks in its heaps, fragmented), so every big tensor is mmapped and
  returned to the system when freed.
* ``mallopt(M_ARENA_MAX, 2)``: fewer per-thread heaps to fragment.

A setting the user gave in the environment (``TF_ONEDNN_USE_SYSTEM_ALLOCATOR``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_ARENA_MAX`` or the same in
``GLIBC_TUNABLES``) wins and is left alone.  Not glibc: only the environment
variable is set.
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
    if "TF_ONEDNN_USE_SYSTEM_ALLOCATOR" not in os.environ:
        os.environ["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] = applied["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] = "1"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return applied
    if not _user_set("MALLOC_MMAP_THRESHOLD_", "mmap_threshold") and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        applied["M_MMAP_THRESHOLD"] = MMAP_THRESHOLD
    if not _user_set("MALLOC_ARENA_MAX", "arena_max") and mallopt(_M_ARENA_MAX, ARENA_MAX):
        applied["M_ARENA_MAX"] = ARENA_MAX
    return applied
