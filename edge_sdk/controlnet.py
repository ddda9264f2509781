"""ControlNet at generation time, as diffusers' `StableDiffusionControlNetPipeline`.

Each step, every ControlNet whose guidance window holds the step reads the noisy latents,
the timestep, the text context and its control image, and returns a residual for each skip
of the UNet's down path and one for its middle block; they are scaled (the conditioning
scale; in guess mode a ramp from 0.1 at the first skip to 1.0 at the middle, diffusers'
`logspace(-1, 0)`), summed over ControlNets and fed to the UNet. In guess mode with
classifier-free guidance the ControlNets read the conditional branch only and the
unconditional branch gets zero residuals. A ControlNet outside its window
(`control_guidance_start/end`) is not run: diffusers runs it and multiplies by 0.
A ControlNet bundle's UNet always takes the residual inputs: without a control image they
are zeros (the same image as the base model's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from .backends import Session
from .control import control_array
from .control_config import require_controlnets
from .contracts import ControlNetIO, UnetIO, residual_pairs
from .denoise import Conditioning, Feeds, Predict, unet_feeds
from .errors import InvalidInputError
from .image_input import read_image
from .manifest import Manifest

__all__ = ["ControlNet", "Control", "control_keep", "guess_scales", "residual_names",
           "zero_residuals", "with_zero_residuals", "controlled_predictor", "prepare_control"]


@dataclass(frozen=True)
class ControlNet:
    """One ControlNet at work in a generation: its role, control image [1, 3, H, W] in
    [0, 1], conditioning scale and guidance window (fractions of the steps)."""

    role: str
    image: np.ndarray
    scale: float
    start: float = 0.0
    end: float = 1.0
    global_pool: bool = False  # its residuals are spatial means: no guess-mode ramp


@dataclass(frozen=True)
class Control:
    """The ControlNets a generation runs and how."""

    nets: tuple[ControlNet, ...]
    guess_mode: bool = False


def control_keep(step: int, total: int, start: float, end: float) -> float:
    """1 where step `step` of `total` lies in the window [start, end], else 0 (diffusers'
    controlnet_keep: off when step/total < start or (step + 1)/total > end)."""
    return 1.0 - float(step / total < start or (step + 1) / total > end)


def guess_scales(count: int) -> np.ndarray:
    """Guess mode's per-residual factors: 10^-1 ... 10^0 over the down residuals and the
    middle one (torch.logspace(-1, 0, count))."""
    return (10.0 ** np.linspace(-1.0, 0.0, count)).astype(np.float32)


def residual_names(manifest: Manifest) -> list[tuple[str, str]]:
    """(ControlNet output, UNet input) name pairs, in order: the down ones, then the mid."""
    return residual_pairs(len(manifest.unet.residuals) - 1)


def zero_residuals(manifest: Manifest, batch: int, height: int, width: int
                   ) -> dict[str, np.ndarray]:
    """The UNet's residual inputs, all zeros, for latents [batch, c, height, width] (a
    stride-2 level rounds its side up, as the UNet's convolutions do)."""
    out = {}
    for (_, name), (channels, down) in zip(residual_names(manifest), manifest.unet.residuals):
        out[name] = np.zeros((batch, channels, -(-height // down), -(-width // down)),
                             np.float32)
    return out


def with_zero_residuals(manifest: Manifest, conditioning: Conditioning,
                        latent_hw: tuple[int, int]) -> Conditioning:
    """The conditioning with zero residuals in each branch (a ControlNet bundle's UNet run
    without control), or as it is for a UNet that takes none."""
    if not manifest.unet.residuals:
        return conditioning
    zeros = zero_residuals(manifest, conditioning.batch, *latent_hw)
    uncond = None if conditioning.uncond is None else {**conditioning.uncond, **zeros}
    return replace(conditioning, cond={**conditioning.cond, **zeros}, uncond=uncond)


def _run_nets(nets: Sequence[tuple[Session, ControlNet, float]], names: list[tuple[str, str]],
              sample: np.ndarray, t: float, feeds: Feeds, guess: bool) -> dict[str, np.ndarray]:
    """The residuals of every net (scaled, summed) for one UNet call's inputs."""
    total: dict[str, np.ndarray] = {}
    outputs = [out for out, _ in names]
    for session, net, scale in nets:
        # diffusers ramps in guess mode, except a global-pool ControlNet's residuals
        ramp = guess_scales(len(names)) if guess and not net.global_pool else None
        reps = sample.shape[0] // net.image.shape[0]
        inputs = {**unet_feeds(sample, t, feeds),
                  ControlNetIO.COND: np.concatenate([net.image] * reps) if reps > 1
                  else net.image}
        got = session.run(inputs, outputs)
        for k, (out, name) in enumerate(names):
            r = got[out] * np.float32(scale) if ramp is None else \
                got[out] * (ramp[k] * np.float32(scale))
            total[name] = r if name not in total else total[name] + r
    return total


def controlled_predictor(unet: Session, session: Callable[[str], Session], control: Control,
                         manifest: Manifest, conditioning: Conditioning,
                         guidance_scale: float, steps: tuple[int, int],
                         batched: bool = True) -> Predict:
    """The guided output of a UNet fed the residuals of `control`'s ControlNets; `steps`:
    the scheduler's (first, end) step indices (the guidance windows are fractions of the
    steps run)."""
    first, end = steps
    cond, uncond = conditioning.cond, conditioning.uncond
    names = residual_names(manifest)

    def predict(x: np.ndarray, t: float, step: int) -> np.ndarray:
        scaled = [(n, n.scale * control_keep(step - first, end - first, n.start, n.end))
                  for n in control.nets]
        # a ControlNet outside its window is not opened, nor run
        nets = [(session(n.role), n, k) for n, k in scaled if k != 0.0]

        def run(sample: np.ndarray, feeds: Feeds, res: dict[str, np.ndarray]) -> np.ndarray:
            return unet.run({**unet_feeds(sample, t, feeds, conditioning.channels), **res}
                            )[UnetIO.OUTPUT]

        def residuals(sample: np.ndarray, feeds: Feeds) -> dict[str, np.ndarray]:
            res = _run_nets(nets, names, sample, t, feeds, control.guess_mode)
            if len(res) < len(names):  # no net in its window: zeros
                res = zero_residuals(manifest, sample.shape[0], *sample.shape[2:])
            return res

        if uncond is None:
            return run(x, cond, residuals(x, cond))
        if batched:
            both = {k: np.concatenate([uncond[k], cond[k]]) for k in cond}
            xx = np.concatenate([x, x])
        if control.guess_mode:  # the ControlNets see the conditional branch only
            r_cond = residuals(x, cond)
            r_uncond = {k: np.zeros_like(v) for k, v in r_cond.items()}
            if batched:
                res = {k: np.concatenate([r_uncond[k], r_cond[k]]) for k in r_cond}
                out_u, out_c = np.split(run(xx, both, res), 2)
            else:
                out_u, out_c = run(x, uncond, r_uncond), run(x, cond, r_cond)
        elif batched:
            out_u, out_c = np.split(run(xx, both, residuals(xx, both)), 2)
        else:
            out_u = run(x, uncond, residuals(x, uncond))
            out_c = run(x, cond, residuals(x, cond))
        return out_u + guidance_scale * (out_c - out_u)
    return predict


def control_images(control_image: Any) -> list[Any]:
    """The control images as a list (a single one: a one-item list)."""
    return list(control_image) if isinstance(control_image, (list, tuple)) \
        else [control_image]


def control_size(control_image: Any, multiple: int) -> tuple[int, int]:
    """(width, height) of the first control image given, rounded down to `multiple`:
    diffusers' default output size when a ControlNet generation names none."""
    first = next((i for i in control_images(control_image) if i is not None), None)
    if first is None:
        raise InvalidInputError("control_image holds no image (every entry is None)")
    w, h = read_image(first, "control_image").image.size
    if w < multiple or h < multiple:
        raise InvalidInputError(f"control image {w}x{h} is smaller than {multiple} pixels a "
                                "side; give width= and height=, or a larger image")
    return w - w % multiple, h - h % multiple


def prepare_control(manifest: Manifest, control_image: Any, cfg: Any
                    ) -> tuple[Control, dict[str, Any]]:
    """The Control of a resolved config and its control images (one per ControlNet of the
    bundle, in order; a single image for a one-ControlNet bundle; None skips a ControlNet),
    each read and resized to the generation's size; and the images' sha256 for the result's
    parameters."""
    require_controlnets(manifest)
    specs = manifest.controlnets
    images = control_images(control_image)
    if len(images) != len(specs) or all(i is None for i in images):
        raise InvalidInputError(
            f"{len(images)} control image(s) for this bundle's {len(specs)} ControlNet(s) "
            f"({', '.join(s.name for s in specs)}); give one per ControlNet in bundle order "
            "(None skips one)")
    nets, shas = [], []
    for k, (spec, img) in enumerate(zip(specs, images)):
        shas.append(None)
        if img is None:
            continue
        what = "control_image" if len(specs) == 1 else f"control_image[{k}]"
        src = read_image(img, what)
        shas[-1] = src.sha256
        nets.append(ControlNet(spec.component, control_array(src.image, int(cfg.width),
                                                             int(cfg.height), what),
                               cfg.controlnet_conditioning_scale[k],
                               cfg.control_guidance_start[k], cfg.control_guidance_end[k],
                               spec.global_pool))
    # diffusers: guess mode is forced by the (first) ControlNet's global_pool_conditions
    guess = bool(cfg.guess_mode) or specs[0].global_pool
    return Control(tuple(nets), guess), {"control_image_sha256": shas if len(shas) > 1
                                         else shas[0]}
