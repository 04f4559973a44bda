"""What a measurement ran on, for benchmark tables and comparison reports.

Every figure this project publishes names its machine and how busy it was:
the machines are shared, and a load average of 4 on 2 cores halves any speed.
"""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """E.g. ``2 CPU cores (AMD EPYC, AVX-512), no GPU, x86_64`` (GPUs as TensorFlow sees them).

    The CPU model and its widest vector unit are named because TensorFlow's
    oneDNN kernels pick their code path from them: the same seed and data
    give bit-identical training on one kind of CPU and a different model on
    another (GTSRB: 0.9240 on the machine of 2026-11-25, 0.9185 on an AVX-512
    EPYC, with epoch-by-epoch identical runs on each).
    """
    try:
        import tensorflow as tf
        gpus = tf.config.list_physical_devices("GPU")
    except Exception:  # noqa: BLE001 - no TensorFlow, or no driver: no GPU to name
        gpus = []
    cpu = _cpu()
    return (f"{os.cpu_count()} CPU cores{f' ({cpu})' if cpu else ''}, "
            f"{'%d GPU' % len(gpus) if gpus else 'no GPU'}, {platform.machine()}")


def _cpu() -> str:
    """``MODEL, ISA`` from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            info = f.read()
    except OSError:
        return ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "AVX" if "avx" in flags else ""
    return ", ".join(part for part in (model, isa) if part)


def load_average() -> str:
    """The 1- and 5-minute load averages, ``"3.2/3.4"`` (empty where the OS has none)."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return ""
    return f"{one:.1f}/{five:.1f}"
