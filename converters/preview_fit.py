"""The latent-to-RGB map a bundle's live previews use: a linear map (with bias) from one
latent pixel to the mean colour of the image patch the VAE decoder makes of it, fitted by
least squares on images the VAE itself encodes and decodes (smooth random colour fields, so
every hue and brightness is covered), at conversion, from a fixed seed."""

from __future__ import annotations

from typing import Any

FIT_IMAGES = 16
FIT_SIZE = 128  # pixels a side of each fitting image
FIELD_CELLS = 4  # colour fields: a FIELD_CELLS x FIELD_CELLS grid, bilinearly blended


def fit_latent_rgb(vae: Any, scaling: float, shift: float | None, factor: int,
                   seed: int = 0) -> tuple[tuple[float, ...], ...]:
    """(latent_channels + 1) rows of 3 (R, G, B) weights, the last row the bias: RGB in
    [0, 1] of a diffusion-space latent pixel z is [z, 1] @ W."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    cells = torch.rand(FIT_IMAGES, 3, FIELD_CELLS, FIELD_CELLS, generator=g)
    images = F.interpolate(cells, size=(FIT_SIZE, FIT_SIZE), mode="bilinear",
                           align_corners=True) * 2 - 1
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean
        decoded = vae.decode(z).sample.clamp(-1, 1) / 2 + 0.5
        if shift is not None:
            z = z - shift
        z = z * scaling  # diffusion space: what the denoising loop holds
    target = F.avg_pool2d(decoded, factor)  # [n, 3, h, w]: each latent pixel's patch
    a = torch.cat([z, torch.ones_like(z[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1,
                                                                                 z.shape[1] + 1)
    b = target.permute(0, 2, 3, 1).reshape(-1, 3)
    w = torch.linalg.lstsq(a.double(), b.double()).solution
    return tuple(tuple(round(float(v), 6) for v in row) for row in w)
