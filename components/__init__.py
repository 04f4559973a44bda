"""Module code that the TFX components run: Transform, Trainer, Evaluator settings."""

from components import keras_env  # noqa: F401
