"""Procedural captioned scenes: 1-3 shapes of one colour and size, at a position, on a
coloured background. Generated from a seed; nothing is stored."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

SIZE = 128  # native resolution of the default model
SHAPES = ("circle", "square", "triangle", "star")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 220, 40), "orange": (250, 140, 20), "purple": (140, 50, 180),
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
}
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
BACKGROUNDS = tuple(PALETTE)
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
# colour-shape pairs never shown together in training: the evaluator's generalisation test
HELD_OUT_PAIRS = frozenset({("green", "star"), ("purple", "triangle"), ("yellow", "square"),
                            ("orange", "circle")})

_CENTRES = {"left": (32, 64), "right": (96, 64), "top": (64, 32), "bottom": (64, 96),
            "center": (64, 64)}
_RADIUS = {"small": 12.5, "large": 23.0}
_COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POS_PHRASES = {"left": ("on the left", "at the left"), "right": ("on the right", "at the right"),
                "top": ("at the top", "on the top"), "bottom": ("at the bottom",
                                                             "on the bottom"),
                "center": ("in the center", "in the middle")}


@dataclass(frozen=True)
class Scene:
    """What an image shows, and which attributes its caption states."""

    shape: str
    colour: str
    count: int
    size: str
    position: str
    background: str
    says_size: bool = True
    says_position: bool = True
    says_background: bool = True


def random_scene(rng: np.random.Generator, allow_held_out: bool = False,
                 shape_p: tuple[float, ...] | None = None) -> Scene:
    """`shape_p`: probabilities of SHAPES (default uniform); training can favour the shapes
    a model finds hard."""
    while True:
        shape = str(rng.choice(SHAPES) if shape_p is None else rng.choice(SHAPES, p=shape_p))
        colour = str(rng.choice(OBJECT_COLOURS))
        if allow_held_out or (colour, shape) not in HELD_OUT_PAIRS:
            break
    count = int(rng.choice([1, 1, 2, 3]))
    size = "small" if count > 1 else str(rng.choice(SIZES))
    background = str(rng.choice([b for b in BACKGROUNDS if b != colour]))
    return Scene(shape, colour, count, size, str(rng.choice(POSITIONS)), background,
                 says_size=bool(rng.random() < 0.6), says_position=bool(rng.random() < 0.85),
                 says_background=bool(rng.random() < 0.8))


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """An English caption with some variety of phrasing."""
    s = scene
    noun = s.shape + ("s" if s.count > 1 else "")
    count = str(rng.choice(_COUNT_WORDS[s.count]))
    size = (str(rng.choice(_SIZE_WORDS[s.size])) + " ") if s.says_size else ""
    if count == "a" and not size and s.colour[0] in "aeiou":
        count = "an"
    obj = f"{count} {size}{s.colour} {noun}"
    pos = (" " + str(rng.choice(_POS_PHRASES[s.position]))) if s.says_position else ""
    if not s.says_background:
        return obj + pos
    bg = s.background
    a_bg = "an" if bg[0] in "aeiou" else "a"
    form = int(rng.integers(4))
    if form == 0:
        return f"{obj}{pos} on {a_bg} {bg} background"
    if form == 1:
        return f"{obj}{pos}, {bg} background"
    if form == 2:
        return f"{obj} on {a_bg} {bg} background{(',' + pos) if pos else ''}"
    return f"{a_bg} {bg} background with {obj}{pos}"


def object_centres(scene: Scene,
                   rng: np.random.Generator | None = None) -> list[tuple[float, float]]:
    cx, cy = _CENTRES[scene.position]
    if rng is not None:
        cx, cy = cx + rng.uniform(-5, 5), cy + rng.uniform(-5, 5)
    spacing = 34.0  # wide enough that small stars never touch
    offsets = [(k - (scene.count - 1) / 2) * spacing for k in range(scene.count)]
    vertical = scene.position in ("left", "right")
    return [(cx, cy + o) if vertical else (cx + o, cy) for o in offsets]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray | None:
    if shape == "circle":
        return None
    if shape == "square":
        n, radii, start = 4, [r * 1.1], math.pi / 4
    elif shape == "triangle":
        n, radii, start = 3, [r * 1.3], -math.pi / 2
    else:
        n, radii, start = 10, [r * 1.3, r * 0.55], -math.pi / 2
    pts = []
    for k in range(n):
        a = start + angle + 2 * math.pi * k / n
        rad = radii[k % len(radii)]
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return np.array(pts)


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = SIZE,
           skip: int | None = None) -> np.ndarray:
    """The scene as an RGB uint8 image [size, size, 3] (anti-aliased by 4x supersampling);
    `skip`: leave object k out (its place empty, the others where the scene has them)."""
    ss = 4
    scale = size / SIZE * ss
    img = np.empty((size * ss, size * ss, 3), np.uint8)
    img[:] = PALETTE[scene.background]
    colour = PALETTE[scene.colour]
    r = _RADIUS[scene.size] * (rng.uniform(0.9, 1.1) if rng is not None else 1.0)
    angle = math.radians(rng.uniform(-8, 8)) if rng is not None else 0.0
    for k, (cx, cy) in enumerate(object_centres(scene, rng)):
        if k == skip:
            continue
        poly = _polygon(scene.shape, cx * scale, cy * scale, r * scale, angle)
        if poly is None:
            cv2.circle(img, (round(cx * scale), round(cy * scale)), round(r * scale), colour, -1,
                       cv2.LINE_AA)
        else:
            cv2.fillPoly(img, [np.round(poly).astype(np.int32)], colour, cv2.LINE_AA)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


HELD_OUT_SEED = 2024
VALIDATION_SEED = 7  # a second prompt set, for choosing defaults without touching held-out


def evaluation_prompts(n: int = 80, seed: int = HELD_OUT_SEED) -> list[tuple[Scene, str, int]]:
    """The fixed held-out set: (scene, prompt, seed) triples, a quarter of them with
    colour-shape pairs never seen in training. Every attribute is stated in the prompt."""
    rng = np.random.default_rng(seed)
    held = sorted(HELD_OUT_PAIRS)
    out = []
    for k in range(n):
        scene = random_scene(rng)
        if k % 4 == 3:
            colour, shape = held[(k // 4) % len(held)]
            scene = replace(scene, colour=colour, shape=shape,
                            background=scene.background if scene.background != colour else
                            "gray")
        scene = replace(scene, says_size=False, says_position=True, says_background=True)
        out.append((scene, caption(scene, rng), 1000 + k))
    return out
