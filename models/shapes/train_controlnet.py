"""Train a ControlNet for the shapes model: a scene's Canny edge map -> the same shapes in
the same places, the prompt free to colour them (needs the [convert] extra).

    python models/shapes/train_controlnet.py -o models/shapes/controlnet [--seed 0]

A diffusers `ControlNetModel` made from the shapes UNet (`ControlNetModel.from_unet`: the
UNet's encoder and middle copied, zero-initialised output convolutions, a small conditioning
encoder for the 128x128 edge map), trained as in Zhang et al. 2023 (train_controlnet.py in
diffusers): the base UNet, text encoder and VAE frozen, the ControlNet's residuals added to
the UNet's skips, the UNet's own loss (v-prediction, min-SNR-5 as the base model was
trained), 70 % of the timesteps drawn around t = 500 where the base model decides shapes.
Captions: mostly one with only the scene's colour and background ("a red on a white
background", so the shape and place must be read from the edges; 75 %), the scene's own
caption (15 %) or empty (10 %: the paper drops half the prompts, ours carry the colour).
The defaults are the shipped ControlNet's recipe (models/shapes/README.md: ControlNet).
The result is a diffusers ControlNet folder; convert it into the bundle with
`edge-convert models/shapes/checkpoint -o B --controlnet models/shapes/controlnet`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import MAX_TOKENS, NOISE_SCHEDULE, lr_at, sample_timesteps  # noqa: E402

from edge_sdk.shapes.controlled import control_caption, edge_map  # noqa: E402
from edge_sdk.shapes.scenes import caption, random_scene, render  # noqa: E402

log = logging.getLogger("train_controlnet")
COND_CHANNELS = (16, 32, 64, 128)  # the edge map's encoder: 128 px -> 16 px in 3 strides


@torch.no_grad()
def control_pool(vae, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                    list]:
    """Latents (scaled as the UNet saw them), edge maps [n, 3, 128, 128] in [0, 1], scenes.
    Each scene is drawn once (with the renderer's jitter) and its edges taken from that
    drawing."""
    lat, edges, scenes = [], [], []
    for _ in range(0, n, 64):
        batch = [random_scene(rng, allow_held_out=True) for _ in range(64)]
        seeds = rng.integers(0, 2**31, len(batch))
        imgs = [render(s, np.random.default_rng(int(k))) for s, k in zip(batch, seeds)]
        maps = [edge_map(s, np.random.default_rng(int(k))) for s, k in zip(batch, seeds)]
        x = torch.from_numpy(np.stack(imgs).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        lat.append(vae.encode(x.contiguous()).latent_dist.mean * vae.config.scaling_factor)
        edges.append(torch.from_numpy(np.stack(maps).astype(np.float32) / 255).permute(0, 3,
                                                                                      1, 2))
        scenes += batch
    return torch.cat(lat), torch.cat(edges).contiguous(), scenes


def captions(scenes: list, idx: np.ndarray, rng: np.random.Generator, p_full: float,
             p_empty: float) -> list[str]:
    out = []
    for i in idx:
        u = rng.random()
        out.append("" if u < p_empty else caption(scenes[i], rng) if u < p_empty + p_full
                   else control_caption(scenes[i]))
    return out


def train(controlnet, unet, text, tok, latents, edges, scenes, args) -> None:
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(**NOISE_SCHEDULE, num_train_timesteps=1000)
    acp = sched.alphas_cumprod.double()
    snr = (acp / (1 - acp)).float()
    params = list(controlnet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 2)
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        idx = rng.integers(0, len(scenes), args.batch)
        ids = tok(captions(scenes, idx, rng, args.p_full, args.p_empty), padding="max_length",
                  max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        index = torch.from_numpy(idx)
        x0, cond = latents[index], edges[index]
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(args.batch, gen, args.mid_timesteps)
        xt = sched.add_noise(x0, noise, t)
        with torch.no_grad():
            context = text(ids)[0]
        down, mid = controlnet(xt, t, context, controlnet_cond=cond, return_dict=False)
        pred = unet(xt, t, context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        target = sched.get_velocity(x0, noise, t)
        weight = torch.clamp(snr[t] + 1, max=5.0) / (snr[t] + 1)
        loss = (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.4f (%.0f s)", step, args.steps, loss.item(),
                     time.perf_counter() - t0)


@torch.no_grad()
def validation(controlnet, unet, text, tok, vae, n: int, steps: int = 20) -> dict:
    """The validation cases (never the held-out ones) in torch, diffusers' pipeline."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionControlNetPipeline

    from edge_sdk.shapes.controlled import ControlReport, cases, judge
    sched = EulerAncestralDiscreteScheduler(**NOISE_SCHEDULE, timestep_spacing="trailing")
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, controlnet=controlnet,
        scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    report = ControlReport()
    todo = cases(n, validation=True)
    for k in range(0, len(todo), 16):
        chunk = todo[k:k + 16]
        images = [torch.from_numpy(c.control.astype(np.float32) / 255).permute(2, 0, 1)
                  for c in chunk]
        out = pipe([c.prompt for c in chunk], image=torch.stack(images),
                   num_inference_steps=steps, guidance_scale=2.0, output_type="np",
                   generator=[torch.Generator().manual_seed(c.seed) for c in chunk]).images
        for case, img in zip(chunk, out):
            report.rows.append(judge(case, (img * 255).round().astype(np.uint8)))
    return report.summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=Path("models/shapes/checkpoint"))
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--pool", type=int, default=6400, help="scenes drawn and encoded")
    ap.add_argument("--p-full", type=float, default=0.15, help="share of full captions")
    ap.add_argument("--p-empty", type=float, default=0.1, help="share of empty captions")
    ap.add_argument("--mid-timesteps", type=float, default=0.7,
                    help="share of timesteps drawn logit-normal around t = 500, where the "
                    "base model decides shapes (train.py's --mid-timesteps); 0: uniform")
    ap.add_argument("--validate", type=int, default=64, help="validation cases at the end")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    t0 = time.perf_counter()
    f32 = dict(torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(args.base / "unet", **f32).eval()
    text = CLIPTextModel.from_pretrained(args.base / "text_encoder", **f32).eval()
    vae = AutoencoderKL.from_pretrained(args.base / "vae", **f32).eval()
    tok = CLIPTokenizer.from_pretrained(args.base / "tokenizer")
    for m in (unet, text, vae):
        m.requires_grad_(False)
    latents, edges, scenes = control_pool(vae, args.pool, np.random.default_rng(args.seed))
    pool_s = time.perf_counter() - t0
    log.info("pool of %d scenes in %.0f s", len(scenes), pool_s)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS)
    controlnet.train()
    train(controlnet, unet, text, tok, latents, edges, scenes, args)
    controlnet.eval()
    train_min = (time.perf_counter() - t0) / 60
    controlnet.to(torch.float16).save_pretrained(args.out)  # half the bytes; read as fp32
    controlnet.to(torch.float32)
    scores = validation(controlnet, unet, text, tok, vae, args.validate) if args.validate \
        else {}
    info = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    info.update(minutes=round(train_min, 1), pool_minutes=round(pool_s / 60, 1),
                torch=torch.__version__, conditioning_channels=COND_CHANNELS,
                parameters=sum(p.numel() for p in controlnet.parameters()),
                validation_torch=scores)
    (args.out / "training.json").write_text(json.dumps(info, indent=2))
    log.info("done in %.1f min (validation %s) -> %s", train_min, scores, args.out)


if __name__ == "__main__":
    main()
