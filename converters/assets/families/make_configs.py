"""Writes the shipped single-file family configs (sd1/, sd2/, sdxl/) as diffusers would save
them.

The values are those of the published Stable Diffusion 1.5, 2.1 and SDXL base 1.0 configs
(unet/, vae/, text_encoder/, text_encoder_2/ and scheduler/ of
runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and
stabilityai/stable-diffusion-xl-base-1.0); every other field is diffusers' and transformers'
default,
written out so a later default change cannot alter a conversion. The variants (inpainting,
epsilon or v-prediction) are edits made at conversion time (converters.single_file).
Run from the repository root: `python converters/assets/families/make_configs.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig

HERE = Path(__file__).resolve().parent
_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  skip_prk_steps=True, num_train_timesteps=1000)
_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, in_channels=4,
             out_channels=4)
FAMILIES = {
    "sd1": dict(
        unet=dict(_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        vae=dict(_VAE, sample_size=512),
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                  num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"),
        scheduler=("PNDMScheduler", dict(_SCHEDULER, prediction_type="epsilon"))),
    "sd2": dict(
        # OpenCLIP ViT-H/14 has 24 layers; SD 2.x uses the penultimate one's output, so the
        # text encoder keeps 23 (the file's 24th block is left out, as diffusers does)
        unet=dict(_UNET, sample_size=96, cross_attention_dim=1024,
                  attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                  upcast_attention=True),
        vae=dict(_VAE, sample_size=768),
        text=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                  num_hidden_layers=23, projection_dim=512, hidden_act="gelu"),
        scheduler=("DDIMScheduler", dict(_SCHEDULER, prediction_type="v_prediction"))),
    "sdxl": dict(
        unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2, in_channels=4,
                  out_channels=4, sample_size=128, cross_attention_dim=2048,
                  attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                    "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        vae=dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                  num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"),
        # OpenCLIP ViT-bigG/14, with its text projection (the UNet takes the pooled output)
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                    num_hidden_layers=32, projection_dim=1280, hidden_act="gelu"),
        scheduler=("EulerDiscreteScheduler", dict(
            _SCHEDULER, prediction_type="epsilon", timestep_spacing="leading",
            interpolation_type="linear", use_karras_sigmas=False, sample_max_value=1.0))),
}


def write(name: str, spec: dict) -> None:
    out = HERE / name
    with torch.device("meta"):
        UNet2DConditionModel(**spec["unet"]).save_config(out / "unet")
        AutoencoderKL(**spec["vae"]).save_config(out / "vae")
    # the published text_encoder/config.json's keys (transformers' defaults for the rest)
    cfg = dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=49408,
               max_position_embeddings=77, layer_norm_eps=1e-5, attention_dropout=0.0,
               dropout=0.0, initializer_factor=1.0, initializer_range=0.02, bos_token_id=0,
               eos_token_id=2, pad_token_id=1)
    for folder, key, arch in (("text_encoder", "text", "CLIPTextModel"),
                              ("text_encoder_2", "text_2", "CLIPTextModelWithProjection")):
        if key not in spec:
            continue
        cfg = dict(cfg, architectures=[arch], **spec[key])
        CLIPTextConfig(**cfg)  # refuses a key transformers does not know
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / "config.json").write_text(json.dumps(cfg, indent=2,
                                                             sort_keys=True) + "\n")
    cls, kwargs = spec["scheduler"]  # as published: keys the class may not take included
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": cls, **kwargs}, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    for family, spec in FAMILIES.items():
        write(family, spec)
