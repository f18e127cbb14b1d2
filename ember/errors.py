"""User-facing errors: each carries a message meant for a person (the CLI prints it on one line)."""


class EmberError(Exception):
    """Base class of every error caused by the user's input rather than by a bug in ember."""


class ModelNotFoundError(EmberError):
    """The model path does not exist, cannot be read, or is not a model."""


class UnsupportedModelError(EmberError):
    """The model's architecture or a tensor type is not supported."""


class CorruptModelError(EmberError):
    """The model file is truncated or malformed."""


class InvalidRequestError(EmberError, ValueError):
    """A prompt or sampling parameter is invalid (e.g. prompt longer than the context)."""
