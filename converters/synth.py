"""Build Stable Diffusion-architecture checkpoints from configs, offline, from a seed
(SDXL's: converters.synth_xl).

`tiny` variants (~3 M parameters) drive the tests; `sd15` is the full SD 1.5 architecture
(860 M-parameter UNet) with random weights, for benchmarks: speed and memory are the same as
with real weights. All use the real CLIP BPE tokenizer files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .clip_vocab import EOS, write_clip_tokenizer_files

log = logging.getLogger(__name__)

XL_ARCHS = ("tiny-sdxl", "tiny-sdxl-turbo", "sdxl", "sdxl-turbo")
ARCHS = ("tiny-sd1", "tiny-sd2", "tiny-inpaint", "tiny-lcm", "sd15", "sd15-lcm") + XL_ARCHS
# the width of the guidance-scale embedding of LCM-distilled UNets (LCM-LoRA/LCM SD 1.5: 256)
_LCM_COND_DIM = {"tiny-lcm": 32, "sd15-lcm": 256}

# SD 1.5's scheduler_config.json; SD 2.x's differs only in class and prediction type.
_SD_SCHEDULER: dict[str, Any] = dict(beta_start=0.00085, beta_end=0.012,
                                     beta_schedule="scaled_linear", clip_sample=False,
                                     set_alpha_to_one=False, steps_offset=1,
                                     skip_prk_steps=True, num_train_timesteps=1000)


def _configs(arch: str) -> dict[str, Any]:
    if arch in ("sd15", "sd15-lcm"):
        return dict(
            unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                      block_out_channels=(320, 640, 1280, 1280), layers_per_block=2),
            vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                     sample_size=512, latent_channels=4,
                     down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4),
            text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                      num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"),
            pad=EOS, prediction_type="epsilon", scheduler="PNDMScheduler")
    # tiny-inpaint: tiny-sd1 with an inpainting UNet; tiny-lcm: with an LCM-distilled one
    sd2 = arch == "tiny-sd2"
    return dict(
        unet=dict(sample_size=8, cross_attention_dim=32,
                  attention_head_dim=(4, 8) if sd2 else 8, block_out_channels=(32, 64),
                  layers_per_block=2, norm_num_groups=32,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  use_linear_projection=sd2, upcast_attention=sd2),
        vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=64,
                 latent_channels=4, norm_num_groups=32,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=2, projection_dim=32,
                  hidden_act="gelu" if sd2 else "quick_gelu"),
        pad="!" if sd2 else EOS,
        prediction_type="v_prediction" if sd2 else "epsilon",
        scheduler="DDIMScheduler" if sd2 else "PNDMScheduler")


def build_checkpoint(out_dir: str | Path, arch: str = "tiny-sd1", seed: int = 0) -> Path:
    """Write a diffusers-format checkpoint folder (safetensors weights) and return it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if arch in XL_ARCHS:
        from .synth_xl import build_xl_checkpoint
        return build_xl_checkpoint(Path(out_dir), arch, seed)
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, LatentConsistencyModelPipeline,
                           LCMScheduler, PNDMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
    cfg = _configs(arch)
    out = Path(out_dir)
    torch.manual_seed(seed)
    inpaint = arch == "tiny-inpaint"  # latents + mask + masked-image latents in
    lcm = arch in _LCM_COND_DIM  # the guidance scale embedded (timestep_cond)
    unet = UNet2DConditionModel(in_channels=9 if inpaint else 4, out_channels=4,
                                time_cond_proj_dim=_LCM_COND_DIM.get(arch), **cfg["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, **cfg["vae"])
    text_cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                              bos_token_id=49406, eos_token_id=49407,
                              pad_token_id=0 if cfg["pad"] == "!" else 49407, **cfg["text"])
    text_encoder = CLIPTextModel(text_cfg)
    sched_cls = LCMScheduler if lcm else \
        DDIMScheduler if cfg["scheduler"] == "DDIMScheduler" else PNDMScheduler
    # from_config, like loading a real scheduler_config.json: unknown keys are ignored
    scheduler = sched_cls.from_config(dict(_SD_SCHEDULER, prediction_type=cfg["prediction_type"]))
    tok_dir = out / "tokenizer"
    write_clip_tokenizer_files(tok_dir, pad_token=cfg["pad"])
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    cls = StableDiffusionInpaintPipeline if inpaint else \
        LatentConsistencyModelPipeline if lcm else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    # save_pretrained rewrites the tokenizer as tokenizer.json (transformers 5); restore the
    # vocab.json + merges.txt layout real SD checkpoints have.
    for f in tok_dir.iterdir():
        f.unlink()
    write_clip_tokenizer_files(tok_dir, pad_token=cfg["pad"])
    log.info("wrote %s checkpoint to %s", arch, out)
    return out


def build_tiny_vae(out_dir: str | Path, channels: int = 64, seed: int = 0) -> Path:
    """Write a diffusers AutoencoderTiny folder with random weights: TAESD's architecture at
    the default 64 channels (for benchmarks), fewer for tests."""
    import torch
    from diffusers import AutoencoderTiny
    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=(channels,) * 4,
                          decoder_block_out_channels=(channels,) * 4)
    vae.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def build_controlnet(out_dir: str | Path, base: str | Path, seed: int = 0,
                     conditioning: tuple[int, ...] = (16, 32, 96, 256)) -> Path:
    """Write a diffusers ControlNetModel folder for the UNet of checkpoint `base`
    (ControlNetModel.from_unet: its encoder's weights), with every zero convolution and the
    control image's encoder drawn at random from `seed`: a fresh ControlNet's zero
    convolutions would make every residual 0, which no test could tell from no ControlNet."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    unet = UNet2DConditionModel.from_pretrained(Path(base) / "unet", local_files_only=True)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zero = [*net.controlnet_down_blocks, net.controlnet_mid_block,
                net.controlnet_cond_embedding.conv_out]
        for conv in zero:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / fan_in ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
    net.save_pretrained(out_dir, safe_serialization=True)
    log.info("wrote a ControlNet for %s to %s", base, out_dir)
    return Path(out_dir)
