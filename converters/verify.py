"""`edge-convert verify`: what a (quantized / fp16) bundle costs against a reference.

Per component: file size, max abs and relative L2 error on the same inputs, mean latency.
End to end: PSNR, SSIM and max abs error of the final images over a fixed prompt/seed set.
The report is printed and written to `<bundle>/quality.json` (`edge-sdk info` shows it).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_sdk import GenerationConfig, Manifest, Pipeline
from edge_sdk import names as N
from edge_sdk.contracts import TextEncoderIO, UnetIO, VaeIO
from edge_sdk.denoise import Conditioning, guidance_embedding
from edge_sdk.vae import unscale_latents

QUALITY_FILE = N.QUALITY_FILE
DEFAULT_PROMPTS = [
    "a red circle on a blue background", "two small green squares at the top",
    "a large yellow star on the left, black background", "a purple triangle in the center",
    "a lighthouse on a cliff at sunset", "a bowl of fruit on a wooden table",
    "portrait of an old man, oil painting", "a city street in the rain at night",
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004; 11x11 Gaussian, sigma 1.5), mean over RGB."""
    import cv2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5)  # noqa: E731
        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        out.append(m.mean())
    return float(np.mean(out))


def _err(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {"max_abs": float(np.abs(a - b).max()),
            "rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))}


def _timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[Any, float]:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - t0) / repeats


def compare_components(test: Pipeline, ref: Pipeline, seed: int = 0) -> dict[str, Any]:
    """Each component of `test` vs `ref` on identical inputs."""
    m, rng = ref.manifest, np.random.default_rng(seed)
    side = m.unet.sample_size
    px = side * m.vae.scale_factor  # SDXL's time ids: the native size, uncropped
    conditioning = Conditioning.from_prompt(ref.encode_prompt(DEFAULT_PROMPTS[:2],
                                                              guidance_scale=1.0),
                                            (px, px, 0, 0, px, px) if m.added_conditions
                                            else None)
    lat = rng.standard_normal((2, m.vae.latent_channels, side, side)).astype(np.float32)
    unet_in = {UnetIO.SAMPLE: lat, UnetIO.TIMESTEP: np.array([700.0, 300.0], np.float32),
               **conditioning.cond}
    if m.unet.time_cond_proj_dim:  # an LCM UNet: the guidance embedding too
        unet_in[UnetIO.TIMESTEP_COND] = guidance_embedding(m.defaults.guidance_scale - 1,
                                                           m.unet.time_cond_proj_dim, 2)
    feeds = {
        **{role: ({TextEncoderIO.INPUT_IDS: ref.tokenizers[m.tokenizer_of(role)[0]](
            DEFAULT_PROMPTS[:2])}, _text_outputs(m, role)) for role in m.text.encoders},
        N.UNET: (unet_in, [UnetIO.OUTPUT]),
        N.VAE_DECODER: ({VaeIO.LATENTS: unscale_latents(lat[:1], m.vae)}, [VaeIO.IMAGE]),
    }
    out: dict[str, Any] = {}
    for comp, (inputs, names) in feeds.items():
        want, t_ref = _timed(lambda: _outputs(ref, comp, inputs, names))  # noqa: B023
        got, t_test = _timed(lambda: _outputs(test, comp, inputs, names))  # noqa: B023
        errs = {n: _err(got[n], want[n]) for n in names}
        out[comp] = {"precision": test.manifest.components[comp].precision,
                     "bytes": test.manifest.components[comp].bytes,
                     "reference_bytes": m.components[comp].bytes,
                     "seconds": t_test, "reference_seconds": t_ref,
                     # the worst of what the generation reads (each output's: "outputs")
                     **{k: max(e[k] for e in errs.values()) for k in ("max_abs", "rel_l2")},
                     "outputs": errs}
    return out


def _outputs(pipe: Pipeline, comp: str, inputs: dict[str, Any], names: list[str]
             ) -> dict[str, np.ndarray]:
    """What a generation reads of a component's outputs (of SDXL's raw hidden layers, the
    penultimate one)."""
    got = pipe.session(comp).run(inputs, names)
    return {n: got[n][:, -1] if n == TextEncoderIO.HIDDEN_LAYERS else got[n] for n in names}


def _text_outputs(m: Manifest, role: str) -> list[str]:
    """What a generation reads of a text encoder: its last hidden states, or (SDXL) the
    raw hidden layers, and the pooled projection of the encoder that feeds the UNet."""
    main = TextEncoderIO.HIDDEN_LAYERS if m.text.penultimate else TextEncoderIO.HIDDEN_STATES
    return [main] + ([TextEncoderIO.TEXT_EMBEDS] if role == m.text.pooled else [])


def compare_images(test: Pipeline, ref: Pipeline, prompts: list[str], steps: int | None
                   ) -> dict[str, Any]:
    rows, images, unet_step = [], [], {"test": [], "reference": []}
    for k, prompt in enumerate(prompts):
        pair = []
        for label, pipe in (("reference", ref), ("test", test)):
            r = pipe.generate(prompt, GenerationConfig(seed=k, steps=steps))
            unet_step[label].append(r.timings["denoise"] / r.config.steps)
            pair.append(np.asarray(r.images[0]))
        rows.append({"prompt": prompt, "seed": k, "psnr": psnr(pair[1], pair[0]),
                     "ssim": ssim(pair[1], pair[0]),
                     "max_abs": int(np.abs(pair[1].astype(int) - pair[0]).max())})
        images.append(pair)
    ref_all = np.stack([p[0] for p in images])
    test_all = np.stack([p[1] for p in images])
    return {"psnr": psnr(test_all, ref_all), "ssim": float(np.mean([r["ssim"] for r in rows])),
            "max_abs": max(r["max_abs"] for r in rows),
            "unet_step_seconds": float(np.mean(unet_step["test"])),
            "reference_unet_step_seconds": float(np.mean(unet_step["reference"])),
            "images": rows}


def evaluate_both(test: Pipeline, ref: Pipeline, limit: int | None = None) -> dict[str, Any]:
    """The shapes evaluator's scores (edge-sdk evaluate's held-out prompts, the models'
    default settings) for both bundles: what quantization costs in prompts met."""
    from edge_sdk.shapes import benchmark
    out: dict[str, Any] = {}
    for label, pipe in (("test", test), ("reference", ref)):
        report, _ = benchmark.run(lambda prompt, seed: pipe(prompt, seed=seed), limit)  # noqa: B023
        out[label] = report.summary()
    return out


def verify(bundle: str | Path, reference: str | Path, prompts: list[str] | None = None,
           steps: int | None = None, write: bool = True, evaluate: bool = False,
           providers: str | None = None,
           provider_options: dict[str, str] | None = None) -> dict[str, Any]:
    """Compare `bundle` with `reference` (a bundle, or a checkpoint converted to fp32 here);
    `evaluate=True` adds both bundles' held-out scores from the shapes evaluator (meaningful
    for the shipped shapes model and models trained like it); `providers` (a plugin EP:
    "qnn") adds where it places each component's nodes (edge_sdk.backends.readiness)."""
    bundle, reference = Path(bundle), Path(reference)
    if providers:  # refused now, not after minutes of comparison
        from edge_sdk.backends.readiness import check_provider
        check_provider(providers)
    if evaluate:  # before converting the reference and comparing (minutes), not after
        from edge_sdk.shapes import require_shapes_model
        require_shapes_model(Manifest.load(bundle), "edge-convert verify --evaluate")
    with tempfile.TemporaryDirectory(prefix="edge-verify-") as tmp:
        if not (reference / N.MANIFEST_FILE).is_file():  # a checkpoint: convert it to fp32
            from .convert import convert
            ref_bundle = Path(tmp) / "reference"
            convert(reference, ref_bundle, vae_encoder=False, progress=lambda _m: None)
        else:
            ref_bundle = reference
        test, ref = Pipeline.load(bundle), Pipeline.load(ref_bundle)
        report = {"reference": str(reference),
                  "reference_fingerprint": ref.manifest.source.fingerprint,
                  "components": compare_components(test, ref),
                  "end_to_end": compare_images(test, ref, prompts or DEFAULT_PROMPTS, steps)}
        if evaluate:
            report["evaluation"] = evaluate_both(test, ref)
        if "static_quantization" in test.manifest.converter:
            report["static_quantization"] = test.manifest.converter["static_quantization"]
    if providers:
        from edge_sdk.backends.readiness import bundle_readiness
        report["placement"] = {"provider": providers, "components": bundle_readiness(
            bundle, test.manifest, providers, provider_options)}
    if write:
        path = bundle / QUALITY_FILE
        tmp_path = path.with_suffix(f".tmp{os.getpid()}")
        tmp_path.write_text(json.dumps(report, indent=1))
        os.replace(tmp_path, path)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'component':<13}{'precision':>10}{'MB':>8}{'x ref':>7}{'max abs':>10}"
             f"{'rel L2':>9}{'ms/call':>9}{'ref':>8}"]
    for comp, c in report["components"].items():
        lines.append(f"{comp:<13}{c['precision']:>10}{c['bytes'] / 1e6:8.2f}"
                     f"{c['bytes'] / c['reference_bytes']:7.2f}{c['max_abs']:10.4f}"
                     f"{c['rel_l2']:9.4f}{c['seconds'] * 1e3:9.1f}"
                     f"{c['reference_seconds'] * 1e3:8.1f}")
    e = report["end_to_end"]
    lines.append(f"end to end over {len(e['images'])} images: PSNR {e['psnr']:.2f} dB, SSIM "
                 f"{e['ssim']:.4f}, max abs {e['max_abs']}/255; a denoising step in "
                 "generation (guided UNet calls + scheduler, the model's default size) "
                 f"{e['unet_step_seconds'] * 1e3:.1f} ms vs "
                 f"{e['reference_unet_step_seconds'] * 1e3:.1f} ms (reference)")
    if "evaluation" in report:
        t, r = (report["evaluation"][k]["accuracy"] for k in ("test", "reference"))
        lines.append(f"held-out prompts ({report['evaluation']['test']['prompts']}), whole prompt "
                     f"met: {t['whole']:.1f} % vs {r['whole']:.1f} % (reference); "
                     + ", ".join(f"{k} {t[k]:.1f} vs {r[k]:.1f}" for k in t if k != "whole"))
    if "static_quantization" in report:
        lines.append(describe_static(report["static_quantization"]))
    if "placement" in report:
        lines.append(f"placement on {report['placement']['provider']}:")
        lines += ["  " + line for line in report["placement"]["components"]]
    return "\n".join(lines)


def describe_static(q: dict[str, Any]) -> str:
    """One line on a static QDQ UNet: calibration, the layers left float, the PSNR."""
    line = (f"static quantization: {q.get('scheme')}, calibrated on "
            f"{q.get('calibration_inputs')} UNet inputs; float: "
            f"{', '.join(q.get('float_layers', []))}")
    if q.get("float_ops"):
        line += f"; float op types: {', '.join(q['float_ops'])}"
    if "target_psnr" in q:
        more = q.get("fallback_layers", [])
        line += (f"; target {q['target_psnr']} dB: {q.get('output_psnr')} dB with "
                 f"{len(more)} more layers float (all quantized: "
                 f"{q.get('output_psnr_all_quantized')} dB): {', '.join(more[:12])}"
                 + (f" (+{len(more) - 12} more)" if len(more) > 12 else ""))
    return line
