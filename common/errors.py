"""User-facing errors. Every message is one line a person can act on; the CLI and server print it as is."""

from __future__ import annotations


class DsocrError(Exception):
    """Base class: an error caused by input, configuration or environment, not a bug.

    `param` names the request field or option at fault, when there is one (the server's error `param`).
    """

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ConfigError(DsocrError):
    """config.json is missing, unreadable or lacks a required key."""


class ImageError(DsocrError):
    """An image could not be read: missing file, not an image, truncated, too large."""


class ModelNotFoundError(DsocrError):
    """No usable model: missing directory, no weights, offline without a cache."""


class CheckpointError(DsocrError):
    """A checkpoint does not match the model: missing, unexpected or mis-shaped tensors."""


class BackendUnavailableError(DsocrError):
    """The requested backend or device cannot run here (framework not installed, no CUDA, ...)."""


class InputError(DsocrError):
    """A bad request: prompt, mode, sampling parameters or other user input."""
