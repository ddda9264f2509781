"""Distill the shapes model into a latent consistency model (LCM, Luo et al. 2023).

    python models/shapes/train_lcm.py -o lcm_checkpoint [--steps 200] [--seed 0]

The student is a UNet of the teacher's layout, initialised from it, that also takes the
guidance scale as an embedding (`time_cond_proj_dim`, as diffusers' LCM UNets): one
conditional pass per step, no unconditional one. Training follows diffusers'
train_lcm_distill_sd_wds.py: a scene's latents are noised to a timestep of a 50-step DDIM
skipping schedule; the teacher, with classifier-free guidance at a scale w drawn per sample,
takes one DDIM step back along the probability-flow ODE; the student's consistency function
at the noisier point must match that of its EMA copy (the target network) at the teacher's
point. Both go through LCM's boundary-condition scalings (c_skip, c_out: sigma_data 0.5,
timestep scaling 10). The data are fresh procedural scenes encoded with the teacher's VAE;
the text encoder, VAE and tokenizer are the teacher's, unchanged.

The result is a diffusers checkpoint (LCMScheduler, the teacher's noise schedule: zero
terminal SNR, v-prediction); convert it like any other (models/shapes-lcm/README.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import MAX_TOKENS, NOISE_SCHEDULE, encode_pool, lr_at  # noqa: E402

from edge_sdk.shapes.scenes import caption  # noqa: E402

log = logging.getLogger("train_lcm")
EMBED_DIM = 256  # the guidance embedding's width (diffusers' LCM UNets)
SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # LCM's boundary-condition scalings


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip, c_out at timesteps t: the consistency function is c_skip x + c_out x0."""
    s = t.double() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
    c_out = s / (s ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip.float()[:, None, None, None], c_out.float()[:, None, None, None]


def guidance_embedding(w: torch.Tensor, dim: int = EMBED_DIM) -> torch.Tensor:
    """diffusers' get_guidance_scale_embedding: the sinusoidal embedding of w * 1000."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class Schedule:
    """The teacher's noise schedule and the DDIM skipping schedule the ODE solver walks."""

    def __init__(self, ddim_steps: int) -> None:
        from diffusers import DDPMScheduler
        acp = DDPMScheduler(**NOISE_SCHEDULE, num_train_timesteps=1000).alphas_cumprod
        self.alpha, self.sigma = acp.sqrt(), (1 - acp).sqrt()
        self.skip = 1000 // ddim_steps
        self.timesteps = torch.arange(1, ddim_steps + 1) * self.skip - 1  # 19, 39 ... 999

    def x0_eps(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """v-prediction -> (x0, noise) at timesteps t."""
        a, s = self.alpha[t][:, None, None, None], self.sigma[t][:, None, None, None]
        return a * x - s * v, a * v + s * x

    def ddim_to(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha[t][:, None, None, None], self.sigma[t][:, None, None, None]
        return a * x0 + s * eps


def make_student(teacher) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    student = UNet2DConditionModel.from_config({**teacher.config,
                                                "time_cond_proj_dim": EMBED_DIM})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    # the guidance embedding starts silent: the student starts as the teacher
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.train()


def load_student(init: Path) -> torch.nn.Module:
    """An earlier run's student (its `unet` folder) to train on from."""
    from diffusers import UNet2DConditionModel
    student = UNet2DConditionModel.from_pretrained(init / "unet", torch_dtype=torch.float32)
    assert student.config.time_cond_proj_dim == EMBED_DIM, student.config.time_cond_proj_dim
    return student.train()


def distill(teacher, text, tok, latents, scenes, args, snapshot=None) -> torch.nn.Module:
    """The target network after `args.steps` steps; `snapshot(step, target)` is called
    every `args.save_every` steps (to pick a stopping point on the validation prompts)."""
    sched = Schedule(args.ddim_steps)
    student = load_student(args.init) if args.init else make_student(teacher)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        empty = text(tok([""], padding="max_length", max_length=MAX_TOKENS,
                         return_tensors="pt").input_ids)[0]
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        idx = rng.integers(0, len(scenes), args.batch)
        ids = tok([caption(scenes[i], rng) for i in idx], padding="max_length",
                  max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        x0 = latents[torch.from_numpy(idx)]
        noise = torch.randn(x0.shape, generator=gen)
        n = torch.randint(0, args.ddim_steps, (args.batch,), generator=gen)
        t_start = sched.timesteps[n]
        t_next = (t_start - sched.skip).clamp(min=0)
        w = args.w_min + (args.w_max - args.w_min) * torch.rand(args.batch, generator=gen)
        w_emb = guidance_embedding(w)
        x_start = sched.alpha[t_start][:, None, None, None] * x0 \
            + sched.sigma[t_start][:, None, None, None] * noise
        with torch.no_grad():
            ctx = text(ids)[0]
            v = teacher(torch.cat([x_start] * 2), torch.cat([t_start] * 2),
                        torch.cat([ctx, empty.expand_as(ctx)])).sample
            x0_c, eps_c = sched.x0_eps(v[:args.batch], x_start, t_start)
            x0_u, eps_u = sched.x0_eps(v[args.batch:], x_start, t_start)
            ww = w[:, None, None, None]
            x_next = sched.ddim_to(x0_c + ww * (x0_c - x0_u), eps_c + ww * (eps_c - eps_u),
                                   t_next)
            skip, out = boundary_scalings(t_next)
            v_t = target(x_next, t_next, ctx, timestep_cond=w_emb).sample
            goal = skip * x_next + out * sched.x0_eps(v_t, x_next, t_next)[0]
        skip, out = boundary_scalings(t_start)
        v_s = student(x_start, t_start, ctx, timestep_cond=w_emb).sample
        pred = skip * x_start + out * sched.x0_eps(v_s, x_start, t_start)[0]
        c = args.huber_c
        loss = (torch.sqrt((pred - goal) ** 2 + c * c) - c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            pt, ps = list(target.parameters()), [p.detach() for p in student.parameters()]
            torch._foreach_mul_(pt, args.ema)
            torch._foreach_add_(pt, ps, alpha=1 - args.ema)
        if snapshot and args.save_every and (step + 1) % args.save_every == 0 \
                and step + 1 < args.steps:
            snapshot(step + 1, target)
        if step % 100 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.5f (%.0f s)", step, args.steps, loss.item(),
                     time.perf_counter() - t0)
    return target


def save(out: Path, teacher_dir: Path, unet, ddim_steps: int) -> None:
    """The teacher's checkpoint with the student UNet and an LCMScheduler whose
    `original_inference_steps` is the skipping schedule it was distilled on."""
    from diffusers import LCMScheduler
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(teacher_dir, out, ignore=shutil.ignore_patterns("unet", "scheduler",
                                                                   "training.json"))
    unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    LCMScheduler(**NOISE_SCHEDULE, original_inference_steps=ddim_steps,
                 timestep_scaling=TIMESTEP_SCALING).save_pretrained(out / "scheduler")
    index = json.loads((teacher_dir / "model_index.json").read_text())
    index["_class_name"] = "LatentConsistencyModelPipeline"
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    index.pop("safety_checker", None), index.pop("feature_extractor", None)
    index.pop("requires_safety_checker", None), index.pop("image_encoder", None)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, default=Path("models/shapes/checkpoint"))
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200, help="distillation steps (200: the "
                    "shipped shapes-lcm, chosen on the validation prompts)")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.95, help="target network EMA decay")
    ap.add_argument("--ddim-steps", type=int, default=50, help="the skipping schedule")
    ap.add_argument("--w-min", type=float, default=0.5,
                    help="guidance w drawn in [w-min, w-max] (the scale is 1 + w)")
    ap.add_argument("--w-max", type=float, default=2.0)
    ap.add_argument("--huber-c", type=float, default=0.001)
    ap.add_argument("--pool", type=int, default=3000, help="scenes encoded for training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from an earlier run's checkpoint (default: the teacher)")
    ap.add_argument("--save-every", type=int, default=0,
                    help="also save the student every N steps, as OUT-stepN")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    t0 = time.perf_counter()
    teacher = UNet2DConditionModel.from_pretrained(args.teacher / "unet",
                                                   torch_dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    text = CLIPTextModel.from_pretrained(args.teacher / "text_encoder",
                                         torch_dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(args.teacher / "tokenizer")
    vae = AutoencoderKL.from_pretrained(args.teacher / "vae", torch_dtype=torch.float32).eval()
    latents, _, scenes, scaling = encode_pool(vae, args.pool, np.random.default_rng(args.seed))
    # the teacher's scaling, not the pool's own estimate: the UNet was trained on it
    latents = latents / scaling * vae.config.scaling_factor
    log.info("pool of %d scenes encoded in %.0f s", len(scenes), time.perf_counter() - t0)
    def snapshot(step: int, target) -> None:
        where = args.out.with_name(f"{args.out.name}-step{step}")
        save(where, args.teacher, copy.deepcopy(target), args.ddim_steps)
        log.info("step %d saved -> %s", step, where)

    unet = distill(teacher, text, tok, latents, scenes, args, snapshot)
    save(args.out, args.teacher, unet, args.ddim_steps)
    info = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    info.update(minutes=round((time.perf_counter() - t0) / 60, 1), torch=torch.__version__,
                embed_dim=EMBED_DIM, noise_schedule=NOISE_SCHEDULE)
    (args.out / "training.json").write_text(json.dumps(info, indent=2))
    log.info("done in %.1f min -> %s", info["minutes"], args.out)


if __name__ == "__main__":
    main()
