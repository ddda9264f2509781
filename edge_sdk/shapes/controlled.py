"""The ControlNet protocol of the default model: the edge map of a one-object scene and a
prompt that names only a colour and a background; the generated image must show the
scene's shape at the scene's place (read from the control) in the prompt's colour.

The prompt says nothing about shape or position ("a purple on a white background"), so
whatever the evaluator reads there came from the edge map; its colour differs from the
drawn scene's (the prompt recolours it; an edge map has no colour anyway). Cases come from
their own seeds; held-out cases are never used to choose anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..control import canny
from .evaluator import analyse
from .scenes import OBJECT_COLOURS, Scene, random_scene, render

CONTROL_HELD_OUT_SEED = 2026
CONTROL_VALIDATION_SEED = 9
DEFAULT_CASES = 64
_COUNT = {1: "a", 2: "two", 3: "three"}


@dataclass(frozen=True)
class ControlCase:
    """One case: the edge map (RGB uint8, white edges on black), its prompt and seed, and
    the scene the result must show (shape and position from the edges, colour from the
    prompt)."""

    control: np.ndarray
    prompt: str
    seed: int
    target: Scene


def control_caption(scene: Scene) -> str:
    """Colour and background only: "a red on a white background", "two blue on a gray
    background" (the shape word left out, so the shape must come from the control)."""
    count = _COUNT[scene.count]
    if count == "a" and scene.colour[0] in "aeiou":
        count = "an"
    a_bg = "an" if scene.background[0] in "aeiou" else "a"
    return f"{count} {scene.colour} on {a_bg} {scene.background} background"


def edge_map(scene: Scene, rng: np.random.Generator | None) -> np.ndarray:
    """The scene drawn (with the renderer's jitter from `rng`) and its Canny edges."""
    return np.asarray(canny(render(scene, rng)))


def cases(n: int = DEFAULT_CASES, validation: bool = False) -> list[ControlCase]:
    """n one-object scenes (every shape, place and size, held-out colour-shape pairs
    allowed: the shape is not the prompt's), each with a new colour for the prompt."""
    seed = CONTROL_VALIDATION_SEED if validation else CONTROL_HELD_OUT_SEED
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        scene = replace(random_scene(rng, allow_held_out=True), count=1, says_size=False,
                        says_position=True, says_background=True)
        colours = [c for c in OBJECT_COLOURS if c not in (scene.colour, scene.background)]
        target = replace(scene, colour=str(rng.choice(colours)))
        control = edge_map(scene, np.random.default_rng(seed * 1000 + k))
        out.append(ControlCase(control, control_caption(target), 7000 + k, target))
    return out


def judge(case: ControlCase, image: np.ndarray) -> dict[str, Any]:
    """What the evaluator reads, against the control's shape and place and the prompt's
    colour; `follows` = shape and position both right (count one, too)."""
    seen = analyse(image)
    t = case.target
    shape, position = seen.shape == t.shape, seen.position == t.position
    return {"seen": [seen.colour, seen.shape, seen.count, seen.position, seen.background],
            "shape": shape, "position": position, "count": seen.count == 1,
            "follows": bool(shape and position and seen.count == 1),
            "colour": seen.colour == t.colour, "background": seen.background == t.background}


@dataclass
class ControlReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def rate(self, key: str) -> float:
        vals = [bool(r[key]) for r in self.rows]
        return 100.0 * sum(vals) / len(vals) if vals else float("nan")

    def summary(self) -> dict[str, Any]:
        keys = ("follows", "shape", "position", "count", "colour", "background")
        return {"cases": len(self.rows), **{k: round(self.rate(k), 1) for k in keys},
                "seconds": round(self.seconds, 1)}


def run(generate: Callable[[ControlCase], Image.Image], n: int = DEFAULT_CASES,
        validation: bool = False, progress: Callable[[int, int], None] | None = None
        ) -> tuple[ControlReport, list[Image.Image]]:
    """`generate(case) -> image` for each case of the set, judged."""
    todo = cases(n, validation)
    report, images = ControlReport(), []
    t0 = time.perf_counter()
    for k, case in enumerate(todo):
        image = generate(case).convert("RGB")
        report.rows.append({"prompt": case.prompt, "seed": case.seed,
                            **judge(case, np.asarray(image))})
        images.append(image)
        if progress:
            progress(k, len(todo))
    report.seconds = time.perf_counter() - t0
    return report, images
