"""The native (x86) side of the emulated-aarch64 stage: the generations tests/arm64/smoke.py
makes on arm64, made here, saved for it to compare with.

    python tests/arm64/reference.py TFLITE_BUNDLE OUT.npz W8A8_BUNDLE SDXL_BUNDLE
"""

from __future__ import annotations

import sys

import numpy as np

# one small generation: the default model's size and guidance, two steps
PROMPT, SEED, STEPS = "a red circle on a blue background", 0, 2


def generate(bundle: str | None = None, **load: object) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image [H, W, 3], final latents) of the one generation, with `bundle`."""
    from edge_sdk import GenerationConfig, Pipeline
    pipe = Pipeline.load(bundle, **load)
    result = pipe.generate(PROMPT, GenerationConfig(seed=SEED, steps=STEPS))
    return np.asarray(result.images[0]), result.latents


def edit_inputs() -> tuple[np.ndarray, np.ndarray]:
    """The source image and mask of the img2img and inpainting checks: the first inpainting
    case of the editing protocol (a scene with one object of a pair left out)."""
    from edge_sdk.shapes.editing import inpaint_cases
    case = inpaint_cases(1)[0]
    assert case.mask is not None
    return case.source, case.mask


def edit(source: np.ndarray, mask: np.ndarray | None, **load: object) -> np.ndarray:
    """img2img (strength 0.5 of 4 steps: 2 run) or, with a mask, inpainting (2 steps)."""
    from edge_sdk import Pipeline
    pipe = Pipeline.load(**load)
    if mask is None:
        return np.asarray(pipe(PROMPT, image=source, strength=0.5, steps=4, seed=SEED))
    return np.asarray(pipe(PROMPT, image=source, mask_image=mask, steps=STEPS, seed=SEED))


def decode_tiny(latents: np.ndarray) -> np.ndarray:
    """The final latents decoded by the default model's tiny decoder."""
    from edge_sdk import Pipeline
    from edge_sdk.image import to_pil
    return np.asarray(to_pil(Pipeline.load().decode_latents(latents, decoder="tiny"))[0])


def preview(latents: np.ndarray) -> np.ndarray:
    """The live preview of the final latents (the default model's preview decoder, numpy)."""
    from edge_sdk.manifest import Manifest
    from edge_sdk.models import default_bundle
    from edge_sdk.preview import preview_maker
    manifest = Manifest.load(default_bundle())
    assert manifest.vae.preview_decoder, "the default bundle lost its preview decoder"
    return np.asarray(preview_maker(manifest, "fast", None)(latents))


def few_step() -> np.ndarray:
    """The shipped few-step model, shapes-lcm, at its own defaults (4 LCM steps)."""
    from edge_sdk import Pipeline
    return np.asarray(Pipeline.load("shapes-lcm")(PROMPT, seed=SEED))


def cached() -> np.ndarray:
    """The default model with feature caching: the second of the two steps runs the UNet's
    shallow branch on the first's deep features."""
    from edge_sdk import Pipeline
    return np.asarray(Pipeline.load()(PROMPT, seed=SEED, steps=STEPS, cache_interval=2))


def lora_file(reference: str) -> str:
    """The LoRA of the load-time LoRA check, beside the reference file (written there on
    x86, where the converter's packages are)."""
    return reference.replace(".npz", "") + ".lora.safetensors"


def with_lora(path: str) -> np.ndarray:
    """The default model with a LoRA applied at load time and a weighted prompt."""
    from edge_sdk import Pipeline
    pipe = Pipeline.load(loras={path: 0.8})
    return np.asarray(pipe("a (red:1.3) circle on a [blue] background", seed=SEED,
                           steps=STEPS))


def write_lora(path: str) -> None:
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    from tests.lora_files import write_lora as write
    write(root / "models" / "shapes" / "checkpoint", Path(path), "kohya", text=True, seed=5,
          strength=0.2)


def sdxl(bundle: str) -> np.ndarray:
    """A tiny SDXL-architecture bundle (two text encoders, added conditions) in memory mode
    low, guided with no negative prompt (zeros), at a non-square size."""
    from edge_sdk import Pipeline
    return np.asarray(Pipeline.load(bundle, memory="low")(PROMPT, seed=SEED, steps=STEPS,
                                                          width=96, height=64))


def controlled() -> np.ndarray:
    """The default model steered by its ControlNet in memory mode low: the first held-out
    case of the ControlNet protocol (a scene's Canny edges, made by OpenCV on each side;
    the prompt names only a colour and a background)."""
    from edge_sdk import Pipeline
    from edge_sdk.shapes.controlled import cases
    case = cases(1)[0]
    return np.asarray(Pipeline.load(memory="low")(case.prompt, control_image=case.control,
                                                  seed=SEED, steps=STEPS))


def seen(image: np.ndarray) -> str:
    """What the shapes evaluator (OpenCV) reads in an image, as text to compare."""
    from edge_sdk.shapes.evaluator import analyse
    return repr(sorted(analyse(image).__dict__.items()))


def main() -> int:
    tflite, out, w8a8, xl = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    onnx_image, latents = generate()
    tflite_image, _ = generate(tflite, backend="tflite")
    w8a8_image, _ = generate(w8a8)
    source, mask = edit_inputs()
    write_lora(lora_file(out))
    np.savez(out, onnx=onnx_image, latents=latents, tflite=tflite_image, w8a8=w8a8_image,
             seen=np.array(seen(onnx_image)), source=source, mask=mask,
             img2img=edit(source, None), inpaint=edit(source, mask),
             tiny=decode_tiny(latents), preview=preview(latents), lcm=few_step(),
             cached=cached(), lora=with_lora(lora_file(out)), sdxl=sdxl(xl),
             controlled=controlled())
    return 0


if __name__ == "__main__":
    sys.exit(main())
