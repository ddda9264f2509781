"""The evaluator is right about programmatically drawn scenes (no model involved)."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from edge_sdk.shapes.evaluator import analyse, score
from edge_sdk.shapes.scenes import (BACKGROUNDS, OBJECT_COLOURS, POSITIONS, SHAPES, Scene,
                                    caption, evaluation_prompts, random_scene, render)


def test_every_shape_colour_position_count_is_read_back():
    rng = np.random.default_rng(0)
    wrong = []
    for shape, colour, pos, count in itertools.product(SHAPES, OBJECT_COLOURS, POSITIONS,
                                                       (1, 2, 3)):
        bg = BACKGROUNDS[(len(wrong) + hash((shape, pos)) % 7) % len(BACKGROUNDS)]
        bg = bg if bg != colour else "gray"
        size = "small" if count > 1 else ("large" if hash(colour) % 2 else "small")
        scene = Scene(shape, colour, count, size, pos, bg)
        seen = analyse(render(scene, rng))
        if not score(scene, seen)["whole"]:
            wrong.append((scene, seen))
    assert not wrong, f"{len(wrong)} of {4 * 6 * 5 * 3} misread, e.g. {wrong[:3]}"


def test_random_scenes_read_back():
    rng = np.random.default_rng(1)
    results = [score(s, analyse(render(s, rng))) for s in (random_scene(rng) for _ in range(300))]
    assert all(r["whole"] for r in results)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_softened_drawings_read_back(sigma):
    """A generator draws softer edges than the renderer: shape thresholds sit in the middle
    of the gap between classes, so a blurred drawing is still read as what was drawn."""
    rng = np.random.default_rng(7)
    wrong = []
    for shape in SHAPES:
        for _ in range(60):
            s = random_scene(rng, allow_held_out=True)
            scene = Scene(shape, s.colour, s.count, s.size, s.position, s.background)
            img = cv2.GaussianBlur(render(scene, rng), (0, 0), sigma)
            seen = analyse(img)
            if seen.shape != shape:
                wrong.append((scene.shape, scene.size, seen.shape))
    assert not wrong, f"{len(wrong)} of {4 * 60} misread: {wrong[:5]}"


def test_blank_image_has_no_objects():
    seen = analyse(np.full((128, 128, 3), 245, np.uint8))
    assert seen.count == 0 and seen.background == "white" and seen.shape is None


def test_evaluation_set_is_fixed_and_covers_held_out_pairs():
    a, b = evaluation_prompts(), evaluation_prompts()
    assert [p for _, p, _ in a] == [p for _, p, _ in b] and len(a) >= 64
    from edge_sdk.shapes.scenes import HELD_OUT_PAIRS
    held = [s for s, _, _ in a if (s.colour, s.shape) in HELD_OUT_PAIRS]
    assert len(held) >= 16
    assert {(s.colour, s.shape) for s in held} == set(HELD_OUT_PAIRS)


def test_captions_mention_their_attributes():
    rng = np.random.default_rng(3)
    for _ in range(200):
        s = random_scene(rng)
        text = caption(s, rng)
        assert s.colour in text and s.shape in text
        assert (s.background in text) == s.says_background or s.background == s.colour


def test_editing_protocols_judge_drawn_answers_right_and_wrong():
    """The recolour and inpainting judges on drawings (no model): the target scene drawn is
    a success; the source returned unchanged is a failure; the cases are fixed by seed."""
    from dataclasses import replace

    from edge_sdk.shapes import editing
    for task in editing.TASKS:
        cases = editing.cases(task, 24)
        assert [c.prompt for c in cases] == [c.prompt for c in editing.cases(task, 24)]
        assert [c.prompt for c in cases] != [c.prompt for c in editing.cases(task, 24, True)]
        for k, case in enumerate(cases):
            seed = editing.EDIT_HELD_OUT_SEED * 1000 + k
            answer = render(case.target, np.random.default_rng(seed))
            if task == "recolour":
                assert editing.judge(case, answer)["ok"], case.prompt
                assert not editing.judge(case, case.source)["ok"]
            else:
                # the whole pair drawn: the new object read in the mask, the rest identical
                got = editing.judge(case, answer)
                outside = got["psnr_outside"]  # None: identical
                assert got["new_object"] and (outside is None or outside >= 40), got
                assert not editing.judge(case, case.source)["ok"]
                other = replace(case.target, colour="red" if case.target.colour != "red"
                                else "blue")
                if other.colour != case.target.background:
                    wrong = render(other, np.random.default_rng(seed))
                    assert not editing.judge(case, wrong)["new_object"]
