"""edge_sdk: torch-free text-to-image on the device.

    from edge_sdk import Pipeline
    pipe = Pipeline.load("my-bundle")          # or Pipeline.load() for the default model
    image = pipe("a red circle on a blue background", seed=1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .config import GenerationConfig
from .errors import (BackendUnavailableError, BundleError, CallbackError, CancelledError,
                     EdgeSDKError, InferenceError, IntegrityError, InvalidInputError,
                     LoraError, ManifestError, SafetensorsError, SchedulerError)
from .manifest import Manifest

if TYPE_CHECKING:  # type checkers and IDEs see the real classes
    from .pipeline import Generation, Pipeline
    from .preview import Preview

# Pipeline pulls in onnxruntime and Pillow: load it on first use, so that importing the
# package (its errors, manifest, config) stays cheap for apps that only handle bundles.
_LAZY = {"Pipeline", "Generation", "Preview"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'edge_sdk' has no attribute {name!r}")

__all__ = ["Pipeline", "Generation", "Preview", "GenerationConfig", "Manifest", "EdgeSDKError",
           "BundleError", "ManifestError", "IntegrityError", "InvalidInputError",
           "SchedulerError", "BackendUnavailableError", "InferenceError", "CancelledError",
           "CallbackError", "LoraError", "SafetensorsError",
           "__version__"]
