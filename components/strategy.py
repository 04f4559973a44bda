"""Picks the distribution strategy for the hardware the Trainer finds itself on.

The same ``run_fn`` runs on a laptop, a GPU box and Vertex AI Training with a
TPU or several GPUs; the strategy is chosen from what is attached, never from
code edits: TPUStrategy when a TPU is configured, MirroredStrategy across
several GPUs, the one GPU, else the CPU.
"""

from __future__ import annotations

import logging
from typing import Tuple

import tensorflow as tf
import tf_keras

log = logging.getLogger(__name__)



def create_strategy(tpu: str = "") -> Tuple[tf.distribute.Strategy, str]:
    """Returns the strategy and a short description for logs and reports."""
    if tpu:
        # "local" on a TPU VM (Vertex AI TPU training), a TPU name or grpc:// address otherwise.
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
        return strategy, f"TPUStrategy ({strategy.num_replicas_in_sync} cores)"
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
        return strategy, f"MirroredStrategy ({len(gpus)} GPUs)"
    if len(gpus) == 1:
        return tf.distribute.OneDeviceStrategy(gpus[0].name), f"OneDeviceStrategy ({gpus[0].name})"
    return tf.distribute.get_strategy(), "default strategy (CPU)"


def configure_precision(strategy: tf.distribute.Strategy, mixed_precision: bool) -> str:
    """Turns on mixed precision where it pays: float16 on GPU, bfloat16 on TPU.

    On CPU float16 is slower than float32, so it stays off there.  The model's
    output layer is float32 regardless (see ``components.model``).
    """
    policy = "float32"
    if mixed_precision:
        if isinstance(strategy, tf.distribute.TPUStrategy):
            policy = "mixed_bfloat16"
        elif tf.config.list_logical_devices("GPU"):
            policy = "mixed_float16"
    tf_keras.mixed_precision.set_global_policy(policy)
    log.debug("Keras precision policy: %s", policy)
    return policy
