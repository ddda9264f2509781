"""The editing protocols of the default model: img2img recolouring and inpainting one more
object, on rendered scenes, read back by the evaluator (protocols in the README).

Cases come from their own seeds (held-out and validation sets, as for text-to-image); the
held-out cases are never used to choose anything (strengths are chosen on validation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .evaluator import analyse, classify_shape, _nearest
from .scenes import (HELD_OUT_PAIRS, OBJECT_COLOURS, PALETTE, Scene, caption, object_centres,
                     random_scene, render)

EDIT_HELD_OUT_SEED = 2025
EDIT_VALIDATION_SEED = 8
RECOLOUR_STRENGTH = 0.7  # chosen on the validation cases (README: editing protocols)
INPAINT_STRENGTH = 1.0  # diffusers' default
MASK_HALF = 17  # the inpainting mask: a box of 2 x MASK_HALF px around the empty slot
PSNR_BAR = 30.0  # dB outside the mask: "the rest unchanged"
TASKS = ("recolour", "inpaint")
DEFAULT_CASES = 64


@dataclass(frozen=True)
class EditCase:
    """One case: the source image, its prompt, the mask (inpainting) and what must be read."""

    task: str
    source: np.ndarray  # RGB uint8 [128, 128, 3]
    prompt: str
    seed: int
    target: Scene  # the scene the prompt describes
    region: np.ndarray  # bool [128, 128]: the old object (recolour) or the mask (inpaint)
    mask: np.ndarray | None = None  # uint8 mask image (white = repaint)


def recolour_cases(n: int, seed: int = EDIT_HELD_OUT_SEED) -> list[EditCase]:
    """A one-object scene and a prompt naming another colour for the same shape and place."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        scene = replace(random_scene(rng), count=1, says_size=False, says_position=True,
                        says_background=True)
        colours = [c for c in OBJECT_COLOURS if c not in (scene.colour, scene.background)
                   and (c, scene.shape) not in HELD_OUT_PAIRS]
        target = replace(scene, colour=str(rng.choice(colours)))
        source = render(scene, np.random.default_rng(seed * 1000 + k))
        diff = np.abs(source.astype(np.int16) - PALETTE[scene.background]).sum(-1) > 60
        region = cv2.erode(diff.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        out.append(EditCase("recolour", source, caption(target, rng), 5000 + k, target,
                            region))
    return out


def inpaint_cases(n: int, seed: int = EDIT_HELD_OUT_SEED) -> list[EditCase]:
    """A two-object scene drawn with one object left out, a mask over its empty slot, and
    the caption of the whole scene ("two small red circles at the top ..."): the model's
    captions describe one kind of object, so "one more object" is the second of a pair."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for k in range(n):
        scene = replace(random_scene(rng), count=2, size="small", says_size=False,
                        says_position=True, says_background=True)
        draw_rng, slot = np.random.default_rng(seed * 1000 + k), int(rng.integers(2))
        source = render(scene, draw_rng, skip=slot)
        cx, cy = _slot_centre(scene, seed * 1000 + k, slot)
        mask = np.zeros(source.shape[:2], np.uint8)
        y0, x0 = max(0, round(cy) - MASK_HALF), max(0, round(cx) - MASK_HALF)
        mask[y0:round(cy) + MASK_HALF, x0:round(cx) + MASK_HALF] = 255
        out.append(EditCase("inpaint", source, caption(scene, rng), 6000 + k, scene,
                            mask > 0, mask))
    return out


def _slot_centre(scene: Scene, draw_seed: int, slot: int) -> tuple[float, float]:
    """Where render(scene, default_rng(draw_seed)) puts object `slot` (the same draws)."""
    rng = np.random.default_rng(draw_seed)
    rng.uniform(0.9, 1.1), rng.uniform(-8, 8)  # render draws the radius and angle first
    return object_centres(scene, rng)[slot]


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR in dB of two uint8 images over the pixels `where` (inf: identical)."""
    d = (a.astype(np.float64) - b.astype(np.float64))[where]
    mse = float((d ** 2).mean()) if d.size else 0.0
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def judge(case: EditCase, result: np.ndarray) -> dict[str, Any]:
    """What the evaluator reads in a result, and whether the case succeeded."""
    if case.task == "recolour":
        pixels = result[case.region]
        colour = _nearest(np.median(pixels, axis=0), OBJECT_COLOURS) if len(pixels) else None
        return {"colour": colour, "ok": colour == case.target.colour}
    found = _object_in(result, case.region)
    outside = psnr(result, case.source, ~case.region)
    new_ok = found == (case.target.colour, case.target.shape)
    return {"found": found, "psnr_outside": round(outside, 2) if outside < float("inf")
            else None, "new_object": new_ok,
            "ok": bool(new_ok and outside >= PSNR_BAR)}


def _object_in(image: np.ndarray, region: np.ndarray) -> tuple[str, str] | None:
    """(colour, shape) of the largest object whose centre lies inside `region`."""
    seen = analyse(image)
    if seen.count == 0:
        return None
    bg = np.array(PALETTE[seen.background], np.float32)
    mask = (np.sqrt(((image.astype(np.float32) - bg) ** 2).sum(-1)) > 60).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    inside = [k for k in range(1, n) if region[int(centroids[k][1]), int(centroids[k][0])]
              and stats[k, cv2.CC_STAT_AREA] >= 40]
    if not inside:
        return None
    k = max(inside, key=lambda j: stats[j, cv2.CC_STAT_AREA])
    m = labels == k
    inner = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    pixels = image[inner] if inner.sum() >= 10 else image[m]
    return _nearest(np.median(pixels, axis=0), OBJECT_COLOURS), classify_shape(m)


@dataclass
class EditReport:
    task: str
    strength: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def rate(self, key: str = "ok") -> float:
        vals = [bool(r[key]) for r in self.rows]
        return 100.0 * sum(vals) / len(vals) if vals else float("nan")

    def summary(self) -> dict[str, Any]:
        out = {"task": self.task, "cases": len(self.rows), "strength": self.strength,
               "success": round(self.rate(), 1), "seconds": round(self.seconds, 1)}
        if self.task == "inpaint":
            # None: identical outside the mask (pasted back), infinitely many dB
            p = np.array([np.inf if r["psnr_outside"] is None else r["psnr_outside"]
                          for r in self.rows], np.float64)
            out.update(new_object=round(self.rate("new_object"), 1),
                       psnr_outside_median=_db(float(np.median(p))) if len(p) else None,
                       psnr_outside_min=_db(float(p.min())) if len(p) else None,
                       psnr_outside_at_least_bar=round(100.0 * float((p >= PSNR_BAR).mean()),
                                                       1) if len(p) else None)
        return out


def _db(value: float) -> float | str:
    return "identical" if value == float("inf") else round(value, 2)


Generate = Callable[[EditCase, float], Image.Image]


def cases(task: str, n: int = DEFAULT_CASES, validation: bool = False) -> list[EditCase]:
    """The task's first n held-out (or validation) cases."""
    seed = EDIT_VALIDATION_SEED if validation else EDIT_HELD_OUT_SEED
    return (recolour_cases if task == "recolour" else inpaint_cases)(n, seed)


def run(task: str, generate: Generate, n: int = DEFAULT_CASES, validation: bool = False,
        strength: float | None = None, progress: Callable[[int, int], None] | None = None
        ) -> tuple[EditReport, list[Image.Image]]:
    """`generate(case, strength) -> image` for each case of the task's set."""
    todo = cases(task, n, validation)
    s = strength if strength is not None else \
        RECOLOUR_STRENGTH if task == "recolour" else INPAINT_STRENGTH
    report, images = EditReport(task, s), []
    t0 = time.perf_counter()
    for k, case in enumerate(todo):
        image = generate(case, s).convert("RGB")
        report.rows.append({"prompt": case.prompt, "seed": case.seed,
                            **judge(case, np.asarray(image))})
        images.append(image)
        if progress:
            progress(k, len(todo))
    report.seconds = time.perf_counter() - t0
    return report, images


def contact_sheet(cases: list[EditCase], images: list[Image.Image], report: EditReport,
                  path: Any, columns: int = 8) -> None:
    """Source (mask outlined) beside result for each case; a red frame marks a failure.
    Saved with an adaptive 256-colour palette (a quarter of the bytes; it is a sheet)."""
    w, h, pad = 128, 128, 4
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (2 * w + 3 * pad), rows * (h + pad) + pad), (60,) * 3)
    draw = ImageDraw.Draw(sheet)
    for k, (case, img, row) in enumerate(zip(cases, images, report.rows)):
        x, y = pad + (k % columns) * (2 * w + 3 * pad), pad + (k // columns) * (h + pad)
        sheet.paste(Image.fromarray(case.source), (x, y))
        if case.mask is not None:
            ys, xs = np.nonzero(case.mask)
            draw.rectangle([x + xs.min(), y + ys.min(), x + xs.max(), y + ys.max()],
                           outline=(255, 255, 255))
        sheet.paste(img, (x + w + pad, y))
        if not row["ok"]:
            draw.rectangle([x + w + pad - 2, y - 2, x + 2 * w + pad + 1, y + h + 1],
                           outline=(255, 0, 0), width=2)
    sheet.quantize(256).save(path, optimize=True)
