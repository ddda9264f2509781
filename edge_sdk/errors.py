"""Typed errors raised by edge_sdk.

Every error names what was wrong and how to fix it. Library code raises these; only the
command-line interface prints them.
"""

from __future__ import annotations

__all__ = [
    "EdgeSDKError",
    "BundleError",
    "ManifestError",
    "IntegrityError",
    "InvalidInputError",
    "SchedulerError",
    "SafetensorsError",
    "LoraError",
    "BackendUnavailableError",
    "InferenceError",
    "ConversionError",
    "CancelledError",
    "CallbackError",
    "UnknownModelError",
    "RequestTooLargeError",
    "AuthenticationError",
    "ForbiddenError",
    "RequestTimeoutError",
    "BusyError",
    "UnavailableError",
]


class EdgeSDKError(Exception):
    """Base class of every error this package raises on purpose."""


class BundleError(EdgeSDKError):
    """A bundle folder is missing, incomplete or not a bundle."""


class ManifestError(BundleError):
    """`manifest.json` is unreadable or does not follow the bundle schema."""


class IntegrityError(BundleError):
    """A bundle file does not match the size or sha256 recorded in the manifest."""


class InvalidInputError(EdgeSDKError, ValueError):
    """A generation argument (size, steps, prompt, latents ...) is out of range."""


class SchedulerError(InvalidInputError):
    """Unknown scheduler name, or a scheduler option this runtime does not implement."""


class SafetensorsError(InvalidInputError):
    """A `.safetensors` file (a LoRA, an embedding) is unreadable, truncated or malformed."""


class LoraError(InvalidInputError):
    """A LoRA file is in an unknown convention, matches no layer, or is for another base, or
    the bundle cannot take it at load time."""


class BackendUnavailableError(EdgeSDKError):
    """The requested inference backend, provider or delegate is not installed."""


class InferenceError(EdgeSDKError):
    """The inference engine failed, or produced NaN/inf, while running a component."""


class ConversionError(EdgeSDKError):
    """`edge-convert` could not read the checkpoint or write the bundle."""


class CancelledError(EdgeSDKError):
    """The caller's progress callback asked to stop the generation."""


class CallbackError(EdgeSDKError):
    """The caller's step callback raised; the original exception is the `__cause__`."""


# -- `edge-sdk serve` (edge_sdk.serve maps each to its HTTP status) ---------------------------

class UnknownModelError(InvalidInputError):
    """A request names a model that is not among the server's bundles (HTTP 404)."""


class RequestTooLargeError(InvalidInputError):
    """A request body, or an image in it, is over the server's limit (HTTP 413)."""


class AuthenticationError(EdgeSDKError):
    """A request to the server carries no credentials, or wrong ones (HTTP 401)."""


class ForbiddenError(EdgeSDKError):
    """A request the server refuses whoever sends it: its Host header does not name this
    machine while the server listens on loopback (a web page's DNS rebinding) (HTTP 403)."""


class RequestTimeoutError(InvalidInputError):
    """A request body did not arrive in time (HTTP 408)."""


class BusyError(EdgeSDKError):
    """The server's queue is full: try again after `retry_after` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnavailableError(EdgeSDKError):
    """The server is shutting down or its worker has stopped (HTTP 503)."""
