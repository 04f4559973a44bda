"""Strategy and precision selection on the machine the tests run on."""

import pytest
import tensorflow as tf
import tf_keras

from visiontune.components import strategy


def test_cpu_gets_the_default_strategy_and_float32():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a GPU is visible: this is the CPU path (the GPU path is in the GPU benchmarks)")
    chosen, description = strategy.create_strategy("")
    assert "CPU" in description and chosen.num_replicas_in_sync == 1
    # Mixed precision asked for, but float16 is slower on CPU: it stays float32.
    assert strategy.configure_precision(chosen, mixed_precision=True) == "float32"
    assert tf_keras.mixed_precision.global_policy().name == "float32"
