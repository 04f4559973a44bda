"""Serving: predictions from the pushed SavedModel."""

from components import keras_env  # noqa: F401
