"""Train the default model's preview decoder (needs the [convert] extra).

    python models/shapes/train_preview_decoder.py --checkpoint models/shapes/checkpoint \
        -o models/shapes/preview_decoder [--cache POOLS.pt] [--seed 0]

Live previews are drawn at latent resolution from the manifest alone. A linear latent-to-RGB
map (what `edge-convert` fits for every model) suits SD's VAE, but this model's small VAE
does not keep colour linear in its latents (a green background comes out brown: 8-15 dB from
the image), so previews need a little non-linearity and context: three convolutions at
latent resolution (3x3, 3x3, 1x1; ReLU between; 2,963 weights), trained to give each latent
pixel the mean colour of the image patch the full decoder makes of it (A1111's "approx NN"
idea). Latents and teacher images are train_tiny_decoder.py's pools (the same --cache file
serves both). The result is `preview_decoder.safetensors` (a torch.nn.Sequential's state
dict) for `edge-convert ... --preview-decoder`, and `training.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_decoder import FACTOR, pool_arguments, start  # noqa: E402  (the same pools)

log = logging.getLogger("train_preview_decoder")


def make_net(latent_channels: int, channels: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(latent_channels, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(channels, 3, 1))


def patch_means(images: torch.Tensor) -> torch.Tensor:
    """Teacher images in [-1, 1] -> each latent pixel's patch mean in [0, 1]."""
    return F.avg_pool2d(images.clamp(-1, 1) / 2 + 0.5, FACTOR)


def psnr_db(net: torch.nn.Module, z: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """PSNR at latent resolution (8-bit, as previews are compared with images downscaled):
    min and median over images."""
    with torch.no_grad():
        pred = (net(z).clamp(0, 1) * 255).round()
    target = (patch_means(images) * 255).round()
    mse = ((pred - target) / 255).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    db = 10 * torch.log10(1 / mse)
    return {"min": round(float(db.min()), 2), "median": round(float(db.median()), 2)}


def train(net: torch.nn.Module, z: torch.Tensor, y: torch.Tensor,
          args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    for step in range(args.steps):
        for g in opt.param_groups:  # cosine decay
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        idx = torch.randint(0, len(z), (args.batch,), generator=gen)
        loss = F.mse_loss(net(z[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 1000 == 0 or step == args.steps - 1:
            log.info("step %d loss %.5f", step, loss.item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pool_arguments(ap)  # --cache: train_tiny_decoder.py's pools file serves both
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    from safetensors.torch import save_file

    from converters.preview_fit import PREVIEW_DECODER_FILE

    t0 = time.perf_counter()
    vae, p, z, images = start(args)
    y = patch_means(images)
    t1 = time.perf_counter()
    net = make_net(vae.config.latent_channels, args.channels)
    train(net, z, y, args)
    held_out = {k[5:]: psnr_db(net, *v) for k, v in p.items() if k.startswith("held")}
    log.info("held-out PSNR at latent resolution %s dB; training %.0f s", held_out,
             time.perf_counter() - t1)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(args.out / PREVIEW_DECODER_FILE))
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k != "cache"}
    record.update(torch=torch.__version__, parameters=sum(x.numel() for x in net.parameters()),
                  training_s=round(time.perf_counter() - t1, 1),
                  total_min=round((time.perf_counter() - t0) / 60, 1),
                  held_out_psnr_db=held_out)
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
