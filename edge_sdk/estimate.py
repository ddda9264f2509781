"""How much memory a generation needs in each memory mode, and whether this machine has it.

The peak resident set of a generation is modelled as
    baseline + weights copied into private memory (fast mode) + a session overhead + the
    activation peak,
and the activation peak as the larger of the UNet's (self-attention scores: batch x heads x
tokens^2 floats at the level with the most tokens, held in a few copies by onnxruntime)
and the VAE decoder's (its full-resolution maps, untiled; next to nothing when decoded in
tiles with the maps kept in files) -- their sum in fast mode, whose memory arena keeps the
UNet's peak reserved. The constants were fitted to peak RSS measured on the
default model (tests/bench/memory_plan.py prints the comparison; `tests/test_memory.py`
checks it at three sizes) and are stated per mode below. The estimate exists to choose a
mode for a budget and to refuse, before any work, a request that cannot fit.
"""

from __future__ import annotations

from pathlib import Path

from . import names
from .config import GenerationConfig, classifier_free
from .errors import InvalidInputError
from .manifest import Manifest
from .osmem import cgroup_headroom, own_private_bytes

MIB = 2**20
# The interpreter with numpy, onnxruntime, tokenizers and Pillow imported (measured: 43 MiB
# RSS after loading the default model in low mode, which opens no session at load).
BASELINE_BYTES = 43 * MIB
# Measured on the default model (4 heads; 256, 512 and 1024 px; guidance on):
# score-sized buffers onnxruntime holds at the attention peak (fast: every optimization and
# the memory arena; balanced and low: basic optimizations, no arena) ...
ATTENTION_COPIES = {"fast": 4.24, "balanced": 2.07, "low": 2.05}
# ... bytes per output pixel and per full-resolution decoder channel of an untiled decode
# (688 B/px over 16 channels), and of a tiled one whose maps are kept in files ...
VAE_UNTILED_BYTES = 43.0
VAE_TILED_BYTES = 0.4
# ... and the rest: sessions opened and their scratch (low opens one per stage).
MODE_OVERHEAD = {"fast": 70 * MIB, "balanced": 91 * MIB, "low": 79 * MIB}
# ... feature maps of the UNet's first level alive at once (batch x channels x latent
# pixels floats each): small on the default model (64 channels), what dominates a wide UNet
# between its attention peaks (SD 1.5: 320 channels, low mode's peak private memory
# measured 238 MiB at 512 px, estimated 238)
UNET_LIVE_MAPS = 10
UNKNOWN_BASE_CHANNELS = 320
# Bundles that did not record their attention levels: SD's worst, 8 heads at full latent
# resolution.
UNKNOWN_LEVELS = ((1, 8),)
UNKNOWN_DECODER_CHANNELS = 128
# ControlNet residual sets alive at once: a ControlNet's outputs, their scaled copies, the
# sum over ControlNets, and in guess mode the zeros and the guidance batch's concatenation
RESIDUAL_COPIES = 5


def _latent_size(manifest: Manifest, cfg: GenerationConfig) -> tuple[int, int]:
    f = manifest.vae.scale_factor
    return int(cfg.height or 0) // f, int(cfg.width or 0) // f


def attention_bytes(manifest: Manifest, cfg: GenerationConfig, batch: int) -> int:
    """One set of self-attention scores at the level with the most: batch x heads x
    tokens^2 float32, over the graph's query slices."""
    h, w = _latent_size(manifest, cfg)
    levels = manifest.unet.attention_levels or UNKNOWN_LEVELS
    worst = max(heads * ((h // d) * (w // d)) ** 2 for d, heads in levels)
    return batch * worst * 4 // manifest.unet.attention_chunks


def _residual_bytes(manifest: Manifest, batch: int, h: int, w: int) -> int:
    """ControlNet residuals (every skip of the UNet's down path, at its level's size): up to
    RESIDUAL_COPIES sets alive at once."""
    per_item = sum(c * -(-h // d) * -(-w // d) for c, d in manifest.unet.residuals)
    return RESIDUAL_COPIES * batch * per_item * 4


def estimate_peak_bytes(manifest: Manifest, cfg: GenerationConfig, mode: str = "fast") -> int:
    """Peak RSS of one generation of the resolved `cfg` in memory mode `mode` (bytes)."""
    images = int(cfg.num_images)
    batched = mode != "low"  # low runs the guidance halves as two batch-1 passes
    cfg_on = classifier_free(manifest, float(cfg.guidance_scale or 0))
    batch = images * (2 if cfg_on and batched else 1)
    h, w = _latent_size(manifest, cfg)
    maps = batch * (manifest.unet.base_channels or UNKNOWN_BASE_CHANNELS) * h * w * 4
    controlled = cfg.controlnet_conditioning_scale is not None  # (resolved with control)
    unet = ATTENTION_COPIES[mode] * attention_bytes(manifest, cfg, batch) \
        + UNET_LIVE_MAPS * maps + (_residual_bytes(manifest, batch, h, w) if controlled else 0)
    channels = manifest.vae.decoder_channels or UNKNOWN_DECODER_CHANNELS
    pixels = int(cfg.height or 0) * int(cfg.width or 0)  # decoded one at a time

    def vae_bytes(stages: tuple) -> float:  # a VAE half, untiled or in tiles
        tiled = mode != "fast" and bool(stages)
        return (VAE_TILED_BYTES if tiled else VAE_UNTILED_BYTES) * channels * pixels
    vae = vae_bytes(manifest.vae.decoder_stages)
    if cfg.strength is not None:  # img2img / inpainting: the encoder's full-resolution
        # maps are the decoder's mirror (its first level has the decoder's last channels)
        vae = max(vae, vae_bytes(manifest.vae.encoder_stages))
    # fast copies the weights it runs into private memory; the other modes map them, and
    # mapped pages are page cache the kernel evicts under pressure (an SD 1.5 int8 bundle
    # with 784 MB of UNet weights ran under a 300 MiB cap), so they are not counted
    roles = manifest.main_roles + ((names.UNET_SHALLOW,) if int(cfg.cache_interval or 1)
                                   > 1 else ())  # feature caching: the shallow branch
    if controlled:
        roles += tuple(c.component for c in manifest.controlnets)
    weights = sum(manifest.components[r].bytes for r in roles) if mode == "fast" else 0
    # the cached deep features: one map per image and guidance half (batched or in two
    # caches alike), of the first level's channels, or the second level's (SD: twice as
    # many) where the cache sits at the last up block's entrance
    branches = images * (2 if cfg_on else 1)
    cached = 2 * branches * maps // batch if int(cfg.cache_interval or 1) > 1 else 0
    # fast's memory arena keeps the UNet's peak reserved while the decoder runs
    act = unet + cached + vae if mode == "fast" else max(unet + cached, vae)
    return int(BASELINE_BYTES + weights + MODE_OVERHEAD[mode] + act)


def available_bytes() -> int | None:
    """The memory a generation of this process can use: MemAvailable (Linux), or less where
    its memory cgroup's limit is nearer (a container's `-m`), plus the private memory this
    process holds already (both count it as used, and the estimate is of the whole process:
    a generation queued behind a running one runs after it); None where neither can be
    read."""
    have = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = cgroup_headroom()
    if room is not None:
        have = room if have is None else min(have, room)
    return None if have is None else have + own_private_bytes()


def check_fits(manifest: Manifest, cfg: GenerationConfig, mode: str = "fast") -> None:
    """Raise InvalidInputError when the estimate exceeds the memory available now."""
    have = available_bytes()
    if have is None:
        return
    need = estimate_peak_bytes(manifest, cfg, mode)
    if need > have:
        raise InvalidInputError(
            f"{cfg.width}x{cfg.height} x {cfg.num_images} image(s) needs about "
            f"{need / 2**20:,.0f} MiB of working memory in memory mode {mode!r}, "
            f"{have / 2**20:,.0f} MiB is available (a container's memory limit included); "
            "choose a smaller size, fewer images per call or a lower memory mode")
