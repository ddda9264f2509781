"""The "shapes" yardstick: the procedural scenes the default model is trained on, their
captions, and an OpenCV evaluator that reads back what a generated image shows.

It is the one model whose output quality we can measure, so quantization, tiling and every
backend are judged on it (`edge-sdk evaluate`).
"""

from __future__ import annotations

import json

from .. import names as N
from ..errors import InvalidInputError
from ..manifest import Manifest

SHAPES_NAME = "shapes"
# the models drawn from the shapes scenes: the default one and its few-step distillation
SHAPES_NAMES = (SHAPES_NAME, "shapes-lcm")


def is_shapes_model(manifest: Manifest) -> bool:
    """Whether a bundle holds the shapes model, the one whose images the evaluator can
    judge: converted from the shipped checkpoint (the same source fingerprint as the
    shipped bundle, whatever the precision or format), or named "shapes" (or "shapes-lcm",
    its few-step distillation) at conversion (`edge-convert --name shapes`, for one
    retrained with models/shapes/train.py)."""
    if manifest.source.name in SHAPES_NAMES:
        return True
    from ..models import shipped_bundle
    for name in SHAPES_NAMES:
        shipped = shipped_bundle(name)
        if shipped is None:
            continue
        try:
            data = json.loads((shipped / N.MANIFEST_FILE).read_text())
            if data["source"]["fingerprint"] == manifest.source.fingerprint:
                return True
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return False


def require_shapes_model(manifest: Manifest, command: str) -> None:
    """Refuse to score another model with the shapes evaluator: its numbers would mean
    nothing (0 % colour on a model that draws cats)."""
    if not is_shapes_model(manifest):
        raise InvalidInputError(
            f"{command} scores images with the shapes model's evaluator (coloured shapes on "
            f"plain backgrounds); model {manifest.source.name!r} is not the shapes model, so "
            "its scores would say nothing about it. For a model retrained with "
            "models/shapes/train.py, convert it with `edge-convert --name shapes`")
