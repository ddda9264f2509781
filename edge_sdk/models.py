"""Where the default model lives when no bundle is given."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path

from . import names as N
from .errors import BundleError

ENV_VAR = "EDGE_SDK_MODEL"
DEFAULT_MODEL = "shapes"
# pyproject.toml installs models/shapes/bundle here (data-files), for any install command
_SHARE = Path("share") / "edge-sdk" / "models" / DEFAULT_MODEL


def default_bundle() -> Path:
    """The bundle used when none is given: $EDGE_SDK_MODEL, else the shipped shapes model."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    shipped = shipped_bundle()
    if shipped is not None:
        return shipped
    raise BundleError("no model given and the default model is not installed; pass a bundle "
                      f"(`--model BUNDLE` / Pipeline.load(BUNDLE)) or set ${ENV_VAR}")


def shipped_bundle() -> Path | None:
    """The shipped shapes model's bundle (not $EDGE_SDK_MODEL), or None if not installed."""
    for candidate in _shipped_candidates():
        if (candidate / N.MANIFEST_FILE).is_file():
            return candidate
    return None


def _shipped_candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    roots = [Path(sys.prefix), Path(sysconfig.get_path("data")), Path(site.USER_BASE or "")]
    return ([here.parent / "models" / DEFAULT_MODEL / "bundle"]  # source tree / editable
            + [r / _SHARE for r in roots])
