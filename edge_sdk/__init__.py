"""edge_sdk: torch-free text-to-image on the device.

    from edge_sdk import Pipeline
    pipe = Pipeline.load("my-bundle")          # or Pipeline.load() for the default model
    image = pipe("a red circle on a blue background", seed=1)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import GenerationConfig
from .errors import (BackendUnavailableError, BundleError, CancelledError, EdgeSDKError,
                     InferenceError, IntegrityError, InvalidInputError, ManifestError,
                     SchedulerError)
from .manifest import Manifest
from .pipeline import Generation, Pipeline

__all__ = ["Pipeline", "Generation", "GenerationConfig", "Manifest", "EdgeSDKError",
           "BundleError", "ManifestError", "IntegrityError", "InvalidInputError",
           "SchedulerError", "BackendUnavailableError", "InferenceError", "CancelledError",
           "__version__"]
