"""Read back what an image shows: background, and the objects' colour, shape, count and
position (OpenCV only, so it runs wherever the runtime runs)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np

from .scenes import BACKGROUNDS, OBJECT_COLOURS, PALETTE, Scene

MIN_AREA_FRACTION = 0.004  # components smaller than this (65 px at 128x128) are noise
OBJECT_DISTANCE = 60  # a pixel this far (RGB, 0-255) from the background is an object's
# shape thresholds; where they come from: classify_shape
_STAR_SOLIDITY, _TRIANGLE_EXTENT, _SQUARE_EXTENT = 0.86, 0.71, 0.86


@dataclass(frozen=True)
class Seen:
    background: str
    colour: str | None
    shape: str | None
    count: int
    position: str | None


def _nearest(rgb: np.ndarray, names: tuple[str, ...]) -> str:
    d = [float(np.sum((rgb.astype(np.float32) - np.array(PALETTE[n], np.float32)) ** 2))
         for n in names]
    return names[int(np.argmin(d))]


def classify_shape(mask: np.ndarray) -> str:
    """circle / square / triangle / star from one object's binary mask."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    c = max(contours, key=cv2.contourArea)
    area = max(cv2.contourArea(c), 1.0)
    hull = max(cv2.contourArea(cv2.convexHull(c)), 1.0)
    solidity = area / hull
    (_, _), (w, h), _ = cv2.minAreaRect(c)
    extent = area / max(w * h, 1.0)  # filled fraction of the tightest rotated box
    # Each threshold sits midway across the gap between two classes, measured on rendered
    # scenes of both sizes blurred with sigma 0-2 px (1st/99th percentiles): solidity star
    # <= 0.80 vs triangle, square >= 0.93; extent triangle <= 0.66 vs circle >= 0.77; circle
    # <= 0.84 vs square >= 0.88. With thresholds at the edge of a class, 24 of 240 drawings
    # blurred at sigma 2 were misread, nearly all small squares read as circles.
    if solidity < _STAR_SOLIDITY:
        return "star"
    if extent < _TRIANGLE_EXTENT:
        return "triangle"
    if extent > _SQUARE_EXTENT:
        return "square"
    return "circle"


def position_of(cx: float, cy: float, size: int) -> str:
    dx, dy = cx - size / 2, cy - size / 2
    if max(abs(dx), abs(dy)) < size / 8:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def analyse(image: np.ndarray) -> Seen:
    """Analyse an RGB uint8 image [H, W, 3]."""
    img = np.asarray(image)[..., :3]
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    diff = np.sqrt(((img.astype(np.float32) - bg_rgb) ** 2).sum(-1))
    mask = (diff > OBJECT_DISTANCE).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= MIN_AREA_FRACTION * h * w]
    if not keep:
        return Seen(background, None, None, 0, None)
    colours, shapes = Counter(), Counter()
    for k in keep:
        m = labels == k
        inner = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        pixels = img[inner] if inner.sum() >= 10 else img[m]
        colours[_nearest(np.median(pixels, axis=0), OBJECT_COLOURS)] += 1
        shapes[classify_shape(m)] += 1
    areas = stats[keep, cv2.CC_STAT_AREA].astype(np.float64)
    cx, cy = (centroids[keep] * areas[:, None]).sum(0) / areas.sum()
    return Seen(background, colours.most_common(1)[0][0], shapes.most_common(1)[0][0],
                len(keep), position_of(cx, cy, w))


def score(scene: Scene, seen: Seen) -> dict[str, bool]:
    """Per-attribute correctness for the attributes the prompt states, plus `whole`."""
    out = {"colour": seen.colour == scene.colour, "shape": seen.shape == scene.shape,
           "count": seen.count == scene.count}
    if scene.says_position:
        out["position"] = seen.position == scene.position
    if scene.says_background:
        out["background"] = seen.background == scene.background
    out["whole"] = all(out.values())
    return out
