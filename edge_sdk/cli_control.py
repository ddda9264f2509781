"""The command line's ControlNet flags: control images, their preprocessing, and
--save-control (what the ControlNet saw)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from .errors import InvalidInputError


def add_control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control-image", action="append", default=None, metavar="PATH",
                   help="ControlNet: the image it follows; repeat it once per ControlNet of "
                   "the bundle, in bundle order ('-' skips one)")
    p.add_argument("--control-preprocess", action="append", default=None, metavar="NAME",
                   help="what makes the control map from each --control-image: canny (edges), "
                   "scribble (strokes of a drawing) or none (the image is the map; default); "
                   "one for all, or one per --control-image")
    p.add_argument("--canny-low", type=int, default=100, help="Canny's low threshold (100)")
    p.add_argument("--canny-high", type=int, default=200, help="Canny's high threshold (200)")
    p.add_argument("--scribble-threshold", type=int, default=128,
                   help="gray level between a stroke and the page (128)")
    p.add_argument("--save-control", default=None, metavar="PATH.png",
                   help="write what each ControlNet saw (the map at the output size) here; "
                   "with several, PATH-0.png ...")


def control_maps(a: argparse.Namespace) -> list[Any] | None:
    """The control maps of --control-image, preprocessed (checked before the bundle
    loads)."""
    from .control import ControlOptions, preprocess
    if not a.control_image:
        if a.control_preprocess or a.save_control:
            raise InvalidInputError("--control-preprocess and --save-control are for "
                                    "--control-image PATH; add it, or drop them")
        return None
    how = a.control_preprocess or ["none"]
    if len(how) not in (1, len(a.control_image)):
        raise InvalidInputError(f"{len(how)} --control-preprocess for {len(a.control_image)} "
                                "--control-image: give one for all, or one per image")
    how = how * len(a.control_image) if len(how) == 1 else how
    return [None if path == "-" else preprocess(path, ControlOptions(
        name, a.canny_low, a.canny_high, a.scribble_threshold),
        f"--control-image {path}") for path, name in zip(a.control_image, how)]


def save_control(maps: list[Any], where: str, width: int, height: int,
                 paths: Callable[[str, int], list[Path]]) -> None:
    """Each map as the ControlNet saw it: resized to the output size as control_array
    resizes it."""
    from .image import save_png
    from .image_input import RESAMPLE
    shown = [m for m in maps if m is not None]
    for path, m in zip(paths(where, len(shown)), shown):
        save_png(m if m.size == (width, height) else m.resize((width, height), RESAMPLE),
                 path, {"control": "what the ControlNet saw"})
