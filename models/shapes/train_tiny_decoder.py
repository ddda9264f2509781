"""Distil a tiny decoder for the default model's VAE (needs the [convert] extra).

    python models/shapes/train_tiny_decoder.py --checkpoint models/shapes/checkpoint \
        -o tiny0 --cache pools.pt [--seed 0]
    python models/shapes/train_tiny_decoder.py --checkpoint models/shapes/checkpoint \
        -o tiny1 --cache pools.pt --init tiny0 --steps 2000 --lr 5e-4 --mask-weight 8
    python models/shapes/train_tiny_decoder.py --checkpoint models/shapes/checkpoint \
        -o models/shapes/tiny_decoder --cache pools.pt --init tiny1 --steps 1500 --lr 3e-4 \
        --mask-weight 8 --crop 16 --batch 16

(the shipped one: trained from scratch, then fine-tuned with a loss on the objects'
silhouettes as the evaluator finds them, which is what tells its shapes apart, first on
8x8-latent crops, then on whole 16x16-latent images).

The student is a diffusers `AutoencoderTiny` (TAESD's architecture) whose decoder learns to
reproduce the full VAE decoder's output from the same latents: the teacher's images are the
targets, so it needs no data beyond the procedural scenes the VAE was trained on. Latents are
of two kinds, in diffusion space (times the VAE's scaling factor, unit variance: what the
denoising loop hands a decoder, so the student has `scaling_factor` 1, as TAESD has): the VAE
encoder's means of random scenes, and latents the model itself generates from random
training captions (`--bundle`, its defaults), which lie off the encoder's manifold (the full
decoder draws ringing around their objects) and are what the decoder meets in use. The
encoder half is unused (the bundle ships only the decoder): it is built at the smallest size
the class allows. The result is a diffusers folder (config.json + safetensors) for
`edge-convert ... --tiny-vae`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_sdk.shapes.evaluator import OBJECT_DISTANCE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import batch_images, edge_weight, lr_at  # noqa: E402  (the model's own recipe)

log = logging.getLogger("train_tiny_decoder")
FACTOR = 8  # the VAE's latent factor


@torch.no_grad()
def teacher_pool(vae, n: int, rng: np.random.Generator, batch: int = 64
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-space latents of `n` random scenes and the full decoder's images of them."""
    lat, img = [], []
    for _ in range(0, n, batch):
        x, _ = batch_images(rng, batch)
        z = vae.encode(x).latent_dist.mean
        lat.append(z * vae.config.scaling_factor)
        img.append(vae.decode(z).sample.clamp(-1, 1))
    return torch.cat(lat)[:n], torch.cat(img)[:n]


@torch.no_grad()
def generated_pool(vae, bundle: Path, n: int, seed: int, per_prompt: int = 4
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents the model generates (edge_sdk, the bundle's defaults) from random training
    captions, and the full decoder's images of them."""
    from edge_sdk import GenerationConfig, Pipeline
    from edge_sdk.shapes.scenes import caption, random_scene
    pipe = Pipeline.load(bundle)
    rng = np.random.default_rng(seed)
    lat = []
    for k in range(0, n, per_prompt):
        prompt = caption(random_scene(rng), rng)
        cfg = GenerationConfig(seed=seed * 1_000_000 + k, num_images=per_prompt)
        lat.append(torch.from_numpy(pipe.generate(prompt, cfg, output_type="latent").latents))
    z = torch.cat(lat)[:n]
    img = torch.cat([vae.decode(z[i:i + 64] / vae.config.scaling_factor).sample.clamp(-1, 1)
                     for i in range(0, n, 64)])
    return z, img


def pools(vae, args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Training and held-out pools of (latents, teacher images), cached in --cache."""
    key = {k: str(getattr(args, k)) for k in ("checkpoint", "seed", "pool", "generated")}
    if args.cache is not None and args.cache.exists():
        cached = torch.load(args.cache)
        if cached.pop("_made_with", key) != key:  # another checkpoint or pool: not these
            raise SystemExit(f"--cache {args.cache} holds pools made with other arguments "
                             f"than {key}; give another file or delete it")
        return cached
    out = {"train_encoded": teacher_pool(vae, args.pool, np.random.default_rng(args.seed)),
           "held_encoded": teacher_pool(vae, 256, np.random.default_rng(args.seed + 1))}
    if args.generated:
        out["train_generated"] = generated_pool(vae, args.bundle, args.generated, args.seed)
        out["held_generated"] = generated_pool(vae, args.bundle, 128, args.seed + 1)
    if args.cache is not None:
        torch.save({**out, "_made_with": key}, args.cache)
    return out


def pool_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments every trainer on these pools takes (train_preview_decoder.py too)."""
    ap.add_argument("--checkpoint", type=Path, default=Path("models/shapes/checkpoint"))
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=1536, help="encoded scenes")
    ap.add_argument("--generated", type=int, default=1024, help="generated latents")
    ap.add_argument("--bundle", type=Path, default=Path("models/shapes/bundle"),
                    help="the model's bundle, for --generated")
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep the pools in this file (built there if absent)")
    ap.add_argument("--threads", type=int, default=2)


def start(args: argparse.Namespace) -> tuple[Any, dict, torch.Tensor, torch.Tensor]:
    """Logging, seed and threads set; the full VAE, its pools, and the training latents and
    teacher images (both kinds of pool together)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(args.checkpoint / "vae").float().eval()
    p = pools(vae, args)
    return (vae, p, torch.cat([p[k][0] for k in p if k.startswith("train")]),
            torch.cat([p[k][1] for k in p if k.startswith("train")]))


def crops(z: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, size: int,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned random crops: `size` latent pixels and the matching image patch."""
    h = z.shape[-1]
    oy, ox = (int(v) for v in torch.randint(0, h - size + 1, (2,), generator=gen))
    zc = z[idx, :, oy:oy + size, ox:ox + size]
    yc = y[idx, :, oy * FACTOR:(oy + size) * FACTOR, ox * FACTOR:(ox + size) * FACTOR]
    return zc, yc


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median PSNR in dB over images in [-1, 1]."""
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).median())


def backgrounds(y: torch.Tensor) -> torch.Tensor:
    """Each teacher image's background colour in 0-255, as the evaluator finds it (the
    median of the border pixels): [n, 3, 1, 1]."""
    px = (y.clamp(-1, 1) + 1) * 127.5
    border = torch.cat([px[:, :, 0], px[:, :, -1], px[:, :, :, 0], px[:, :, :, -1]], -1)
    return border.median(-1).values[..., None, None]


def soft_mask(img: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Where the evaluator sees an object (colour distance from the background, 0-255, over
    OBJECT_DISTANCE), smoothed over +-8 so that it has a gradient at the outline."""
    dist = (((img.clamp(-1, 1) + 1) * 127.5 - bg) ** 2).sum(1).add(1e-6).sqrt()
    return torch.sigmoid((dist - OBJECT_DISTANCE) / 8.0)


def train(student, z, y, args: argparse.Namespace) -> None:
    steps, batch, lr = args.steps, args.batch, args.lr
    gen = torch.Generator().manual_seed(args.seed)
    bg = backgrounds(y) if args.mask_weight else None
    opt = torch.optim.AdamW(student.decoder.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, len(z), (batch,), generator=gen)
        zc, yc = crops(z, y, idx, args.crop, gen)
        out = student.decoder(zc)
        w = edge_weight(yc, args.edge_gain)  # outlines tell the shapes apart
        loss = (w * (args.mse * (out - yc) ** 2 + args.l1 * (out - yc).abs())).mean()
        if bg is not None:  # the objects' silhouettes, which decide their shape
            loss = loss + args.mask_weight * (soft_mask(out, bg[idx])
                                              - soft_mask(yc, bg[idx])).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log.info("step %d loss %.5f", step, loss.item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pool_arguments(ap)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--blocks", default="2,2,1,0", help="AutoencoderTiny blocks per level")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--crop", type=int, default=8, help="latent pixels a side per crop")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--edge-gain", type=float, default=4.0,
                    help="loss weight added on edges (the VAE's own: train.py --vae-edge-gain)")
    ap.add_argument("--mse", type=float, default=0.5, help="weight of the squared error")
    ap.add_argument("--l1", type=float, default=1.0, help="weight of the absolute error")
    ap.add_argument("--mask-weight", type=float, default=0.0,
                    help="weight of a loss on the objects' silhouettes as the evaluator "
                    "finds them (soft: colour distance from the background around 60)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this student (a folder this script wrote) instead of "
                    "from scratch; --channels/--blocks are then its own")
    args = ap.parse_args()
    from diffusers import AutoencoderTiny

    t0 = time.perf_counter()
    vae, p, z, y = start(args)
    log.info("teacher pools %s in %.0f s", {k: len(v[0]) for k, v in p.items()},
             time.perf_counter() - t0)
    blocks = tuple(int(b) for b in args.blocks.split(","))
    student = AutoencoderTiny.from_pretrained(args.init) if args.init else AutoencoderTiny(
        latent_channels=vae.config.latent_channels, scaling_factor=1.0,
        decoder_block_out_channels=(args.channels,) * len(blocks), num_decoder_blocks=blocks,
        encoder_block_out_channels=(8,) * len(blocks), num_encoder_blocks=(1,) * len(blocks))
    train(student, z, y, args)
    student.eval()
    with torch.no_grad():
        held_out = {k[5:]: round(psnr(student.decoder(v[0]), v[1]), 2)
                    for k, v in p.items() if k.startswith("held")}
    minutes = (time.perf_counter() - t0) / 60
    log.info("held-out PSNR vs the full decoder %s dB; %.1f min", held_out, minutes)
    args.out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(args.out)
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k != "cache"}
    record.update(torch=torch.__version__, minutes=round(minutes, 1),
                  decoder_parameters=sum(p.numel() for p in student.decoder.parameters()),
                  held_out_psnr_db=held_out)
    if args.init is not None and (args.init / "training.json").exists():  # the whole recipe
        record["init_training"] = json.loads((args.init / "training.json").read_text())
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
