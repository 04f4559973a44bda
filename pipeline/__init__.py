"""Pipeline definition, settings and runners."""

from components import keras_env  # noqa: F401
