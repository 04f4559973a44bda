"""Module code that the TFX components run: Transform, Trainer, Evaluator settings."""

