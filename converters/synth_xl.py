"""SDXL-architecture checkpoints from configs, offline, from a seed: `tiny-sdxl` (a few M
parameters, two text encoders and added conditions, for tests), `sdxl` (the full SDXL base
architecture, a 2.6 B-parameter UNet, random weights, for benchmarks) and their `-turbo`
variants (SDXL-Turbo: 512 px native, Euler ancestral with trailing spacing, 1 step)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .clip_vocab import EOS, write_clip_tokenizer_files

log = logging.getLogger(__name__)

# SDXL base's scheduler_config.json (EulerDiscreteScheduler); Turbo's is Euler ancestral
# with trailing spacing
_SCHEDULER: dict[str, Any] = dict(beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", num_train_timesteps=1000,
                                  prediction_type="epsilon", steps_offset=1,
                                  timestep_spacing="leading", interpolation_type="linear",
                                  use_karras_sigmas=False, sample_max_value=1.0,
                                  set_alpha_to_one=False, skip_prk_steps=True,
                                  clip_sample=False)
_XL_VAE_SCALING = 0.13025  # SDXL's VAE scaling_factor


def _configs(arch: str) -> dict[str, Any]:
    turbo = arch.endswith("-turbo")
    if arch.startswith("tiny"):
        return dict(
            unet=dict(sample_size=16 if turbo else 32, block_out_channels=(32, 64),
                      layers_per_block=2, attention_head_dim=(2, 4),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2), cross_attention_dim=64,
                      use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                      norm_num_groups=32),
            vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                     sample_size=128, latent_channels=4, norm_num_groups=32),
            text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                      num_hidden_layers=3, projection_dim=32, hidden_act="quick_gelu"),
            text_2=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                        num_hidden_layers=3, projection_dim=32, hidden_act="gelu"))
    return dict(
        unet=dict(sample_size=64 if turbo else 128, block_out_channels=(320, 640, 1280),
                  layers_per_block=2, attention_head_dim=(5, 10, 20),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                    "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 sample_size=512 if turbo else 1024, latent_channels=4),
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                  num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                    num_hidden_layers=32, projection_dim=1280, hidden_act="gelu"))


def build_xl_checkpoint(out: Path, arch: str, seed: int = 0) -> Path:
    """Write an SDXL-architecture diffusers folder. The full-size ones are stored in fp16
    (as SDXL is published; the converter loads them as fp32): 7 GB on disk instead of 14."""
    import torch
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)
    cfg, turbo = _configs(arch), arch.endswith("-turbo")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, scaling_factor=_XL_VAE_SCALING,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, force_upcast=True,
                        **cfg["vae"])

    def text_config(key: str, pad_id: int) -> Any:
        return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                              bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id,
                              **cfg[key])
    text_encoder = CLIPTextModel(text_config("text", 49407))
    text_encoder_2 = CLIPTextModelWithProjection(text_config("text_2", 0))
    sched_cls = EulerAncestralDiscreteScheduler if turbo else EulerDiscreteScheduler
    scheduler = sched_cls.from_config(
        dict(_SCHEDULER, timestep_spacing="trailing" if turbo else "leading"))
    tok_dirs = {"tokenizer": EOS, "tokenizer_2": "!"}  # SDXL's pads: CLIP-L's, OpenCLIP's
    toks = {}
    for name, pad in tok_dirs.items():
        write_clip_tokenizer_files(out / name, pad_token=pad)
        toks[name] = CLIPTokenizer.from_pretrained(out / name)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder,
                                     text_encoder_2=text_encoder_2, unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                     **toks)
    if not arch.startswith("tiny"):
        pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    for name, pad in tok_dirs.items():  # vocab.json + merges.txt, as real checkpoints ship
        for f in (out / name).iterdir():
            f.unlink()
        write_clip_tokenizer_files(out / name, pad_token=pad)
    log.info("wrote %s checkpoint to %s", arch, out)
    return out
