"""The latent-to-RGB map a bundle's live previews use: a linear map (with bias) from one
latent pixel to the mean colour of the image patch the VAE decoder makes of it, fitted by
least squares on images the VAE itself encodes and decodes (smooth random colour fields, so
every hue and brightness is covered), at conversion, from a fixed seed; and the reader of a
preview decoder trained for a model (`--preview-decoder FILE`), which draws better previews
where the VAE's latent space is far from linear in colour."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConversionError
from edge_sdk.manifest import PreviewLayer, preview_chain_problem

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


# a torch.nn.Sequential of Conv2d layers (ReLU between) saved with safetensors: "0.weight",
# "0.bias", "2.weight", ...: the layers in index order
_KEY = re.compile(r"^(\d+)\.(weight|bias)$")
PREVIEW_DECODER_FILE = "preview_decoder.safetensors"  # in a folder given as --preview-decoder


def read_preview_decoder(path: str | Path, latent_channels: int | None = None
                         ) -> tuple[PreviewLayer, ...]:
    """The layers of a preview decoder file (see models/shapes/train_preview_decoder.py), or
    of the `preview_decoder.safetensors` in a folder: Conv2d weights [out, in, k, k] (odd k,
    zero padding k // 2) and biases in float32/float16, named as a torch.nn.Sequential's
    state dict, diffusion-space latents in, RGB in [0, 1] out. A ConversionError names what
    is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / PREVIEW_DECODER_FILE
    where = f"--preview-decoder {path}"
    tensors = _tensors(path, where)
    layers: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ConversionError(f"{where}: unexpected tensor {key!r}; a preview decoder "
                                  "holds only N.weight and N.bias (a Sequential of Conv2d)")
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    out = [_layer(i, layers[i].get("weight"), layers[i].get("bias"), where)
           for i in sorted(layers)]
    shapes = [x.shape for x in out]
    problem = preview_chain_problem(shapes, latent_channels if latent_channels is not None
                                    else (shapes[0][1] if shapes else 0))
    if problem:
        raise ConversionError(f"{where}: {problem}"
                              + ("; give the preview decoder trained for this model's VAE"
                                 if latent_channels is not None else ""))
    return tuple(out)


def _tensors(path: Path, where: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    # numpy has no bfloat16/float8: safetensors raises TypeError/AttributeError for them
    except (OSError, SafetensorError, ValueError, TypeError, AttributeError) as exc:
        raise ConversionError(f"{where}: not a readable .safetensors file of float32/float16 "
                              f"tensors ({type(exc).__name__}: {exc}); give the file a "
                              "preview-decoder training script wrote (bfloat16: save it as "
                              "float32)") from exc


def _layer(i: int, w: Any, b: Any, where: str) -> PreviewLayer:
    import numpy as np
    for t in (w, b):  # bfloat16 reads as such only where ml_dtypes is loaded
        if t is not None and t.dtype not in (np.float16, np.float32, np.float64):
            raise ConversionError(f"{where}: layer {i} is {t.dtype}; save the preview decoder "
                                  "in float32 or float16")
    ok = w is not None and b is not None and w.ndim == 4 and w.size > 0 \
        and b.shape == (w.shape[0],) and bool(np.isfinite(w).all() and np.isfinite(b).all())
    if not ok:
        raise ConversionError(f"{where}: layer {i} needs a finite, non-empty 4-d float weight "
                              "and a float bias of its output channels")
    return PreviewLayer(tuple(int(d) for d in w.shape),
                        tuple(round(float(v), 7) for v in w.ravel()),
                        tuple(round(float(v), 7) for v in b.ravel()))
