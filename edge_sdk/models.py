"""The shipped models, by name, and where the default one lives when no bundle is given."""

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
# the models this package ships (models/<name>/bundle in the source tree); pyproject.toml
# installs each bundle under <prefix>/share/edge-sdk/models/<name> (data-files)
SHIPPED_MODELS = ("shapes", "shapes-lcm")
_SHARE = Path("share") / "edge-sdk" / "models"


def default_bundle() -> Path:
    """The bundle used when none is given: $EDGE_SDK_MODEL, else the shipped shapes model."""
    env = os.environ.get(ENV_VAR)
    if env:
        return resolve_model(env)
    shipped = shipped_bundle()
    if shipped is not None:
        return shipped
    raise BundleError("no model given and the default model is not installed; pass a bundle "
                      f"(`--model BUNDLE` / Pipeline.load(BUNDLE)) or set ${ENV_VAR}")


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A bundle folder, or the name of a shipped model (`shapes`, `shapes-lcm`) when no
    folder of that name exists here."""
    path = Path(model)
    if str(model) in SHIPPED_MODELS and not path.exists():
        shipped = shipped_bundle(str(model))
        if shipped is None:
            raise BundleError(f"the shipped model {str(model)!r} is not installed with this "
                              "package; reinstall edge-sdk, or pass a bundle folder")
        return shipped
    return path


def shipped_bundle(name: str = DEFAULT_MODEL) -> Path | None:
    """A shipped model's bundle (not $EDGE_SDK_MODEL), or None if not installed."""
    for candidate in _shipped_candidates(name):
        if (candidate / N.MANIFEST_FILE).is_file():
            return candidate
    return None


def _shipped_candidates(name: str) -> list[Path]:
    here = Path(__file__).resolve().parent
    roots = [Path(sys.prefix), Path(sysconfig.get_path("data")), Path(site.USER_BASE or "")]
    return ([here.parent / "models" / name / "bundle"]  # source tree / editable
            + [r / _SHARE / name for r in roots])
