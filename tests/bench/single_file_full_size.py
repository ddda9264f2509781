"""Single-file checkpoints at full size: SD 1.5 and SD 2.x architectures with random weights,
written out in the original layout as they are published (fp16), read back with the
family detected and the shipped configs (no --config), against their diffusers folders.

Prints, per family: what was detected, the seconds to open and to load each component, and
the largest difference of any weight from the folder's (rounded to fp16 as the file is).
The tiny tests show that equal weights give an equal image; this shows the shipped configs
and the detection on the real architectures. Usage:
    python -m tests.bench.single_file_full_size [--work DIR]
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


def _compare(folder: Path, single: Path, **options: str) -> None:
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
        diff = max(float(np.abs(got[k].numpy() - want[k].numpy().astype(np.float16)
                                .astype(np.float32)).max()) for k in want)
        print(f"  {load[5:]}: {len(got)} tensors loaded in {seconds:.1f} s, max |diff| "
              f"{diff:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=None, help="a folder to keep the checkpoints in")
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
        single = write_single_file(folder, work / f"{folder.name}.safetensors", text,
                                   dtype=np.float16, extra_text_layers=extra)
        print(f"{name}: {single.stat().st_size / 2**20:.0f} MiB file")
        _compare(folder, single, **options)
        single.unlink()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
