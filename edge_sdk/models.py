"""Where the default model lives when no bundle is given."""

from __future__ import annotations

import os
from pathlib import Path

from . import names as N
from .errors import BundleError

ENV_VAR = "EDGE_SDK_MODEL"


def default_bundle() -> Path:
    """The bundle used when none is given: $EDGE_SDK_MODEL, else the model shipped with the
    package."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    for candidate in _shipped_candidates():
        if (candidate / N.MANIFEST_FILE).is_file():
            return candidate
    raise BundleError("no model given and no default model is installed; pass a bundle "
                      f"(`--model BUNDLE` / Pipeline.load(BUNDLE)) or set ${ENV_VAR}")


def _shipped_candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here / "default_model", here.parent / "models" / "default" / "bundle"]
