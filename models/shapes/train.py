"""Train the default "shapes" text-to-image model from scratch (needs the [convert] extra).

    python models/shapes/train.py -o models/shapes/checkpoint [--seed 0]

A real Stable Diffusion-architecture model, built with the diffusers/transformers classes:
AutoencoderKL (factor-8 latents, 4 channels), UNet2DConditionModel with cross-attention,
CLIPTextModel with a CLIP BPE tokenizer (the real CLIP merges, restricted to the caption
vocabulary). Data are procedural scenes generated on the fly from the seed
(edge_sdk.shapes.scenes). The result is a diffusers-format checkpoint: convert it with
`edge-convert` like any SD checkpoint. The defaults are the shipped model's recipe: 52.5 minutes
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_sdk.shapes.evaluator import analyse, score
from edge_sdk.shapes.scenes import PALETTE, SIZE, caption, object_centres, random_scene, render

log = logging.getLogger("train")
MAX_TOKENS = 32
# The guidance the shipped bundle defaults to (edge-convert --default-guidance 2); on the
# validation set 1.5-2.5 score alike (shape 75-77 %); DPM++ 2M at 5 fell to 60 % (see
# build_pipeline).
DEFAULT_GUIDANCE = 2.0
# Zero terminal SNR + v-prediction (Lin et al. 2023). With SD's plain schedule the last
# training step still leaks the image's low frequencies (sqrt(alpha_bar) = 0.07); on 16x16
# latents that is enough to read an object's position from the noise, so the model learned
# position from the noise instead of from the caption, and placed objects at random.
NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="v_prediction", rescale_betas_zero_snr=True)


def build_tokenizer(folder: Path, seed: int):
    from transformers import CLIPTokenizer

    from converters.clip_vocab import subset_clip_vocab, write_clip_tokenizer_files
    rng = np.random.default_rng(seed)
    words: set[str] = set()
    for _ in range(20000):
        words.update(re.findall(r"[a-z]+|[^\sa-z]", caption(random_scene(rng, True), rng)))
    write_clip_tokenizer_files(folder, max_length=MAX_TOKENS,
                               vocab_and_merges=subset_clip_vocab(words))
    return CLIPTokenizer.from_pretrained(folder)


def make_models(vocab_size: int, bos: int, eos: int, attn16: bool = False,
                text_time: bool = False, layers: int = 1):
    """`attn16`: cross-attention at 16x16 latents too (a small object is 2-3 latent pixels
    wide there). `text_time`: the caption, attention-pooled, is added to the timestep
    embedding, so every ResBlock, also at 16x16, sees what to draw."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(16, 32, 64, 64), norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=SIZE)
    first = "CrossAttn" if attn16 else ""
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=layers,
        block_out_channels=(64, 128, 128), norm_num_groups=32, cross_attention_dim=64,
        attention_head_dim=4,
        down_block_types=(f"{first}DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", f"{first}UpBlock2D"),
        **(dict(addition_embed_type="text", addition_embed_type_num_heads=4)
           if text_time else {}))
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        hidden_act="quick_gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
    return vae, unet, text


def batch_images(rng: np.random.Generator, n: int, crop: int = SIZE, around_objects: bool = False,
                 shape_p: tuple[float, ...] | None = None) -> tuple[torch.Tensor, list]:
    scenes = [random_scene(rng, shape_p=shape_p) for _ in range(n)]
    imgs = np.stack([render(s, rng) for s in scenes]).astype(np.float32) / 127.5 - 1
    if crop < SIZE and around_objects:  # each crop around one of its objects
        out = np.empty((n, crop, crop, 3), np.float32)
        for i, s in enumerate(scenes):
            cx, cy = object_centres(s)[int(rng.integers(s.count))]
            x, y = (int(np.clip(c - crop / 2 + rng.uniform(-crop / 4, crop / 4), 0,
                                SIZE - crop)) for c in (cx, cy))
            out[i] = imgs[i, y:y + crop, x:x + crop]
        imgs = out
    elif crop < SIZE:  # the VAE is convolutional: train it on crops, 4x cheaper than 128 px
        y, x = rng.integers(0, SIZE - crop + 1, 2)
        imgs = imgs[:, y:y + crop, x:x + crop]
    return torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).contiguous(), scenes


def edge_weight(x: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """1 on flat areas, 1 + gain near edges: shapes are told apart by their outlines, which
    a plain pixel loss on mostly flat images neglects (the decoder then draws blobs)."""
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True)
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True)
    edge = F.pad(gx, (0, 1, 0, 0)) + F.pad(gy, (0, 0, 0, 1))
    edge = F.max_pool2d((edge > 0.05).float(), 3, stride=1, padding=1)
    return 1.0 + gain * edge


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))


def train_vae(vae, steps: int, batch: int, rng: np.random.Generator,
              edge_gain: float = 0.0, device: str = "cpu") -> None:
    """`edge_gain > 0`: half of each batch cropped around an object, and the loss on edge
    pixels counted again, `edge_gain` times, on top of the plain per-pixel loss (shapes are
    told apart by their outlines, which a plain loss on mostly flat images neglects; the
    plain term keeps flat areas, hence colours and backgrounds, as faithful as without)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1e-3, 100)
        if edge_gain > 0:
            x = torch.cat([batch_images(rng, batch // 2, crop=64, around_objects=True)[0],
                           batch_images(rng, batch - batch // 2, crop=64)[0]])
        else:
            x, _ = batch_images(rng, batch, crop=64)
        x = x.to(device)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        kl = post.kl().mean() / (x[0].numel())
        err = recon - x
        per_pixel = err**2 + 0.5 * err.abs()
        loss = per_pixel.mean() + 1e-4 * kl
        if edge_gain > 0:
            edge = edge_weight(x, 1.0) - 1.0  # 1 near edges, 0 elsewhere
            loss = loss + edge_gain * (edge * per_pixel).sum() / (edge.sum() * 3 + 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("vae step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(),
                     time.perf_counter() - t0)


@torch.no_grad()
def vae_recon_scores(vae, rng: np.random.Generator, n: int = 200,
                     device: str = "cpu") -> dict[str, float]:
    """The ceiling the VAE sets: how often each attribute survives encode + decode."""
    x, scenes = batch_images(rng, n)
    y = vae.decode(vae.encode(x.to(device)).latent_dist.mean).sample.cpu()
    y = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    rows = [score(s, analyse(img)) for img, s in zip(y, scenes)]
    return {k: round(100.0 * float(np.mean([r[k] for r in rows if k in r])), 1)
            for k in ("colour", "shape", "count", "position", "background", "whole")}


def object_mask(x: torch.Tensor, scenes: list) -> torch.Tensor:
    """[n, 1, h/8, w/8] uint8: 1 on latent pixels that an object touches (or borders)."""
    bg = torch.tensor([PALETTE[s.background] for s in scenes], dtype=torch.float32)
    bg = (bg / 127.5 - 1)[:, :, None, None]
    on = ((x - bg).abs().amax(1, keepdim=True) > 0.1).float()
    m = F.max_pool2d(F.max_pool2d(on, 8), 3, stride=1, padding=1)
    return m.to(torch.uint8)


@torch.no_grad()
def encode_pool(vae, n: int, rng: np.random.Generator, device: str = "cpu",
                shape_p: tuple[float, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list, float]:
    """Latents (scaled to unit variance), object masks at latent resolution, scenes, scale."""
    lat, masks, scenes = [], [], []
    for _ in range(0, n, 64):
        x, s = batch_images(rng, 64, shape_p=shape_p)
        lat.append(vae.encode(x.to(device)).latent_dist.mean)
        masks.append(object_mask(x, s))
        scenes += s
    z = torch.cat(lat)
    scaling = float(1.0 / z.std())  # SD's recipe for scaling_factor: unit-variance latents
    return z * scaling, torch.cat(masks).to(device), scenes, scaling


def sample_timesteps(n: int, gen: torch.Generator, mid: float = 0.0,
                     centre: int = 500) -> torch.Tensor:
    """Training timesteps in [0, 1000): a fraction `mid` from a logit-normal(0, 1) centred on
    t = `centre` (SD3's timestep sampling has 500), the rest uniform. Shapes are decided at
    mid noise (a square's one-step x0 prediction stays a square at t = 200 and turns into a
    blob by t = 400-500), while t > 800 (SNR < 0.02) is one task, the layout from the caption
    alone, which uniform sampling gives a fifth of all steps."""
    uniform = torch.randint(0, 1000, (n,), generator=gen)
    if mid <= 0:
        return uniform
    shift = math.log(centre / (1000 - centre))
    normal = (torch.sigmoid(torch.randn(n, generator=gen) + shift) * 1000).long().clamp(0, 999)
    pick = torch.rand(n, generator=gen) < mid
    return torch.where(pick, normal, uniform)


def train_unet(unet, text, tok, latents, scenes, steps: int, batch: int, seed: int,
               device: str = "cpu", masks: torch.Tensor | None = None,
               object_gain: float = 0.0, lr: float = 5e-4, warmup: int = 300,
               mid_timesteps: float = 0.0, mid_centre: int = 500, uniform_steps: int = 0,
               late_steps: int = 0, late_centre: int = 400):
    """`object_gain > 0`: the error on latent pixels an object touches counts 1 + gain
    times (shapes live in a few latent pixels; the flat background is most of the loss).
    `mid_timesteps`: see sample_timesteps; the first `uniform_steps` steps draw timesteps
    uniformly all the same (the layout first, then the shapes), and the last `late_steps`
    centre the logit-normal draws on `late_centre` instead of `mid_centre` (the shapes
    last, once the layout is learned)."""
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(**NOISE_SCHEDULE, num_train_timesteps=1000)
    acp = sched.alphas_cumprod.double()
    snr = (acp / (1 - acp)).float().to(device)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    rng = np.random.default_rng(seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        idx = rng.integers(0, len(scenes), batch)
        texts = [caption(scenes[i], rng) if rng.random() > 0.1 else "" for i in idx]
        ids = tok(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        index = torch.from_numpy(idx).to(device)
        x0 = latents[index]
        # drawn on the CPU generator whatever the device: the same noise on every device
        noise = torch.randn(x0.shape, generator=gen).to(device)
        mid = mid_timesteps if step >= uniform_steps else 0.0
        centre = late_centre if step >= steps - late_steps else mid_centre
        t = sample_timesteps(batch, gen, mid, centre).to(device)
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t, text(ids)[0]).sample
        target = sched.get_velocity(x0, noise, t)
        # min-SNR-5 (Hang et al. 2023) in its "+1" form for v: weight 1 at zero SNR, where
        # the model must draw the layout from the caption alone
        weight = torch.clamp(snr[t] + 1, max=5.0) / (snr[t] + 1)
        err = (pred - target) ** 2
        if object_gain > 0:
            w = 1.0 + object_gain * masks[index].float()
            err = err * w / w.mean(dim=(1, 2, 3), keepdim=True)
        loss = (weight * err.mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                pe, pl = list(ema.parameters()), [q.detach() for q in live.parameters()]
                torch._foreach_mul_(pe, decay)
                torch._foreach_add_(pe, pl, alpha=1 - decay)
        if step % 200 == 0 or step == steps - 1:
            log.info("unet step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(),
                     time.perf_counter() - t0)
    return ema_unet, ema_text


def build_pipeline(vae, unet, text, tok):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    # The sampler the checkpoint names, so its bundle's default. Chosen on the validation set
    # (320 prompts, run 6): Euler ancestral at guidance 2 draws the shape asked for 76.9 % of
    # the time, where DPM-Solver++ 2M did 73.8 % at guidance 2 and 69.4 % at 3: the fresh
    # noise of each step corrects squares and triangles that a deterministic sampler rounds.
    sched = EulerAncestralDiscreteScheduler(**NOISE_SCHEDULE, timestep_spacing="trailing")
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def validation_scores(pipe, device: str, steps: int = 20,
                      guidance: float = DEFAULT_GUIDANCE) -> dict:
    """The validation prompt set (never the held-out one), generated in torch: for comparing
    training recipes. The seeds drive torch's noise, not the runtime's, so the figures are
    close to, not equal to, `edge-sdk evaluate --validation` on the converted bundle."""
    from edge_sdk.shapes.benchmark import Report
    from edge_sdk.shapes.scenes import VALIDATION_SEED, evaluation_prompts
    cases = evaluation_prompts(seed=VALIDATION_SEED)
    report = Report()
    for k in range(0, len(cases), 16):
        chunk = cases[k:k + 16]
        gens = [torch.Generator().manual_seed(seed) for _, _, seed in chunk]
        out = pipe([p for _, p, _ in chunk], num_inference_steps=steps,
                   guidance_scale=guidance, generator=gens, output_type="np").images
        for (scene, prompt, seed), img in zip(chunk, out):
            report.add(scene, prompt, seed, (img * 255).round().astype(np.uint8))
    return report.summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="models/shapes/checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-edge-gain", type=float, default=2.0,
                    help="> 0: object-centred crops and edge-weighted VAE loss")
    ap.add_argument("--unet-steps", type=int, default=6500)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--object-gain", type=float, default=0.0,
                    help="> 0: UNet loss on object latent pixels weighted 1 + gain")
    ap.add_argument("--mid-timesteps", type=float, default=0.7,
                    help="fraction of UNet timesteps drawn logit-normal around --mid-centre")
    ap.add_argument("--mid-centre", type=int, default=500,
                    help="the timestep those logit-normal draws centre on (1-999)")
    ap.add_argument("--uniform-steps", type=int, default=0,
                    help="the first N UNet steps draw timesteps uniformly (the layout first), "
                    "whatever --mid-timesteps")
    ap.add_argument("--late-steps", type=int, default=0,
                    help="the last N UNet steps centre the logit-normal draws on --late-centre")
    ap.add_argument("--late-centre", type=int, default=400,
                    help="their centre (1-999): lower means less noise, where shapes are decided")
    ap.add_argument("--lr", type=float, default=5e-4, help="UNet + text encoder peak LR")
    ap.add_argument("--shape-p", type=lambda s: tuple(float(v) for v in s.split(",")),
                    default=(0.15, 0.35, 0.3, 0.2),
                    help="UNet training pool's shape probabilities, in the order "
                         "circle,square,triangle,star (squares and triangles are the hard ones)")
    ap.add_argument("--attn16", action="store_true", help="cross-attention at 16x16 latents")
    ap.add_argument("--text-time", action=argparse.BooleanOptionalAction, default=True,
                    help="pooled caption added to the timestep embedding")
    ap.add_argument("--layers", type=int, default=1, help="UNet layers per block")
    ap.add_argument("--pool", type=int, default=12000, help="scenes encoded for UNet training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device (recipes are timed on cpu)")
    ap.add_argument("--vae-only", action="store_true",
                    help="stop after the VAE phase, saving it and the encoded pool")
    ap.add_argument("--vae-from", help="a --vae-only output's vae_pool.pt: skip the VAE phase")
    ap.add_argument("--validate", action="store_true",
                    help="score the validation prompt set at the end (not counted in minutes)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, dev = Path(args.output), args.device
    t_start = time.perf_counter()
    tok = build_tokenizer(out / "tokenizer", args.seed)
    vae, unet, text = make_models(len(tok), tok.bos_token_id, tok.eos_token_id,
                                  args.attn16, args.text_time, args.layers)
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in
              (("vae", vae), ("unet", unet), ("text_encoder", text))}
    log.info("parameters: %s", counts)
    rng = np.random.default_rng(args.seed)
    vae, unet, text = vae.to(dev), unet.to(dev), text.to(dev)
    if args.vae_from:  # for comparing UNet recipes on one VAE; not a from-scratch run
        state = torch.load(args.vae_from, weights_only=False)
        vae.load_state_dict(state["vae"])
        latents, masks, scenes, scaling, recon = (
            state[k] for k in ("latents", "masks", "scenes", "scaling", "recon"))
        latents, masks = latents.to(dev), masks.to(dev)
    else:
        train_vae(vae, args.vae_steps, 16, rng, args.vae_edge_gain, dev)
        vae.eval()
        recon = vae_recon_scores(vae, np.random.default_rng(args.seed + 3), device=dev)
        log.info("vae reconstruction of 200 scenes, evaluator accuracy: %s", recon)
        latents, masks, scenes, scaling = encode_pool(vae, args.pool, rng, dev, args.shape_p)
    vae.eval().register_to_config(scaling_factor=scaling)
    log.info("latent scaling factor %.5f", scaling)
    if args.vae_only:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"vae": vae.state_dict(), "latents": latents.cpu(),
                    "masks": masks.cpu(), "scenes": scenes,
                    "scaling": scaling, "recon": recon}, out / "vae_pool.pt")
        return
    unet, text = train_unet(unet, text, tok, latents, scenes, args.unet_steps,
                            args.unet_batch, args.seed, dev, masks, args.object_gain,
                            lr=args.lr, mid_timesteps=args.mid_timesteps,
                            mid_centre=args.mid_centre, uniform_steps=args.uniform_steps,
                            late_steps=args.late_steps, late_centre=args.late_centre)
    minutes = (time.perf_counter() - t_start) / 60
    pipe = build_pipeline(vae, unet, text, tok)
    info = {k: getattr(args, k) for k in (
        "seed", "vae_steps", "vae_edge_gain", "unet_steps", "unet_batch", "object_gain",
        "lr", "mid_timesteps", "mid_centre", "uniform_steps", "late_steps", "late_centre",
        "shape_p", "attn16", "text_time", "layers", "pool", "threads", "device")}
    info.update(minutes=round(minutes, 1), parameters=counts, scaling_factor=scaling,
                vae_reconstruction=recon, noise_schedule=NOISE_SCHEDULE,
                torch=torch.__version__)
    if args.validate:
        info["validation"] = validation_scores(pipe, dev)
        log.info("validation set: %s", info["validation"])
    save(out, pipe.to("cpu"))
    (out / "training.json").write_text(json.dumps(info, indent=2))
    log.info("done in %.1f min -> %s", minutes, out)


def save(out: Path, pipe) -> None:
    tok_files = {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()}
    # fp16 weights halve what the repository carries; edge-convert loads them as fp32
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    # keep the vocab.json + merges.txt layout of real SD checkpoints
    for p in (out / "tokenizer").iterdir():
        p.unlink()
    for name, data in tok_files.items():
        (out / "tokenizer" / name).write_bytes(data)


if __name__ == "__main__":
    main()
