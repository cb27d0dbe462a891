"""Errors shared across layers of the package (models and mechanisms both raise them)."""


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded; the message is one sentence meant for the user."""
