"""What a measurement ran on, for benchmark tables and comparison reports.

Every figure this project publishes names its machine and how busy it was:
the machines are shared, and a load average of 4 on 2 cores halves any speed.
"""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """E.g. ``2 CPU cores, no GPU, x86_64`` (GPUs as TensorFlow sees them)."""
    try:
        import tensorflow as tf
        gpus = tf.config.list_physical_devices("GPU")
    except Exception:  # noqa: BLE001 - no TensorFlow, or no driver: no GPU to name
        gpus = []
    return f"{os.cpu_count()} CPU cores, {'%d GPU' % len(gpus) if gpus else 'no GPU'}, {platform.machine()}"


def load_average() -> str:
    """The 1- and 5-minute load averages, ``"3.2/3.4"`` (empty where the OS has none)."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return ""
    return f"{one:.1f}/{five:.1f}"
