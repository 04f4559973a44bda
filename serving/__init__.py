"""Serving: predictions from the pushed SavedModel."""

