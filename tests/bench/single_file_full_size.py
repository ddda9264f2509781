"""Single-file checkpoints at full size: SD 1.5 and SD 2.x architectures with random weights,
written out in the original layout as they are published (fp16), read back with the
family detected and the shipped configs (no --config), against their diffusers folders.

Prints, per family: what was detected, the seconds to open and to load each component, and
the largest difference of any weight from the folder's (rounded as the file is).
The tiny tests show that equal weights give an equal image; this shows the shipped configs
and the detection on the real architectures. With --convert, the SD 1.5 file is also
converted (fp32 ONNX, family detected, shipped configs and tokenizer) beside its folder, and
one 256x256 image from each is compared (max abs difference in /255). Usage:
    python -m tests.bench.single_file_full_size [--work DIR] [--convert]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.single_files import write_single_file


def _sd2_folder(out: Path) -> Path:
    """An SD 2.x (v-prediction) diffusers folder with random weights from the shipped
    configs."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from converters.clip_vocab import write_clip_tokenizer_files
    from converters.single_file import family_configs
    cfg = family_configs("sd2", "v_prediction")
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(cfg["unet"]).save_pretrained(out / "unet")
    AutoencoderKL.from_config(cfg["vae"]).save_pretrained(out / "vae")
    CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"])).save_pretrained(
        out / "text_encoder")
    write_clip_tokenizer_files(out / "tokenizer", "!")
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg["scheduler"]))
    (out / "model_index.json").write_text(json.dumps({"_class_name":
                                                      "StableDiffusionPipeline"}))
    return out


def _compare(folder: Path, single: Path, dtype: type, **options: str) -> None:
    from converters.checkpoint import open_checkpoint
    t0 = time.perf_counter()
    ckpt = open_checkpoint(single, **options)
    print(f"  opened in {time.perf_counter() - t0:.1f} s: family {ckpt.family}, "
          f"{ckpt.prediction_type}, text encoder {ckpt.layout.text}")
    ref = open_checkpoint(folder)
    for load in ("load_unet", "load_vae", "load_text_encoder"):
        t0 = time.perf_counter()
        got = getattr(ckpt, load)().state_dict()
        seconds = time.perf_counter() - t0
        want = getattr(ref, load)().state_dict()
        assert set(got) == set(want), set(got) ^ set(want)
        diff = max(float(np.abs(got[k].numpy() - want[k].numpy().astype(dtype)
                                .astype(np.float32)).max()) for k in want)
        print(f"  {load[5:]}: {len(got)} tensors loaded in {seconds:.1f} s, max |diff| "
              f"{diff:.3g}")


def _convert_both(folder: Path, single: Path, work: Path) -> None:
    """The single file and its folder converted, one small generation from each."""
    from converters.convert import convert
    from edge_sdk import GenerationConfig, Pipeline
    images = []
    for name, source in (("single", single), ("folder", folder)):
        t0 = time.perf_counter()
        out = work / f"bundle-{name}"
        convert(source, out, overwrite=True, vae_encoder=False, vae_stages=False,
                feature_cache=False)
        seconds = time.perf_counter() - t0
        pipe = Pipeline.load(out)
        result = pipe.generate("a lighthouse at dusk", GenerationConfig(
            steps=2, width=256, height=256, seed=0, scheduler="ddim"))
        images.append(pipe.decode_latents(result.latents))
        print(f"  {name}: converted in {seconds:.0f} s")
        shutil.rmtree(out)
    print(f"  image from the single file vs the folder's: max |diff| "
          f"{np.abs(images[0] - images[1]).max() * 255:.2f}/255")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=None, help="a folder to keep the checkpoints in")
    ap.add_argument("--convert", action="store_true",
                    help="also convert the SD 1.5 file and its folder and compare an image")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="single-file-bench-"))
    from converters.synth import build_checkpoint
    sd15 = work / "sd15"
    if not sd15.is_dir():
        build_checkpoint(sd15, "sd15", seed=0)
    sd2 = work / "sd2"
    if not sd2.is_dir():
        _sd2_folder(sd2)
    # an SD 2.x file holds OpenCLIP's 24 text blocks; the model uses 23
    for name, folder, text, extra, options in (
            ("SD 1.5", sd15, "clip", 0, {}),
            ("SD 2.x v", sd2, "open_clip", 1, {"prediction_type": "v_prediction"})):
        # fp16 as published; fp32 when the image is compared (the same weights as the folder)
        half = not (args.convert and text == "clip")
        single = write_single_file(folder, work / f"{folder.name}.safetensors", text,
                                   dtype=np.float16 if half else None,
                                   extra_text_layers=extra)
        print(f"{name}: {single.stat().st_size / 2**20:.0f} MiB file")
        _compare(folder, single, np.float16 if half else np.float32, **options)
        if args.convert and text == "clip":
            _convert_both(folder, single, work)
        single.unlink()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
