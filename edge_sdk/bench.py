"""`edge-sdk bench`: one generation, timed per stage and per UNet step, with the process's
peak resident memory and its peak private (anonymous) memory.

Peak RSS is the kernel's high-water mark (VmHWM). Private memory has no high-water mark, so
a thread samples RssAnon every few milliseconds (and every step samples it too): mapped
weights count in RSS but not here, which is the point of mapping them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import GenerationConfig
from .osmem import process_memory


class _PeakSampler:
    """Samples RssAnon in a background thread; `peak` is the highest seen, `peak_between`
    the highest within a time window (a stage's)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, 0
        self.samples: list[tuple[float, int]] = []  # (perf_counter, RssAnon)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        value = process_memory().get("RssAnon", 0)
        self.samples.append((time.perf_counter(), value))
        self.peak = max(self.peak, value)

    def peak_between(self, t0: float, t1: float) -> int:
        """The highest sample within [t0, t1] (a window shorter than the sampling interval:
        the last sample before its end)."""
        inside = [v for t, v in self.samples if t0 <= t <= t1]
        before = [v for t, v in self.samples if t <= t1]
        return max(inside) if inside else (before[-1] if before else 0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "_PeakSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@dataclass
class BenchReport:
    """What `edge-sdk bench` measured (seconds and bytes)."""

    model: str
    memory_plan: str
    config: dict[str, Any]
    load_s: float
    text_encoder_s: float
    unet_step_s: list[float]
    vae_decoder_s: float
    total_s: float
    peak_rss_bytes: int
    peak_private_bytes: int
    rss_after_load_bytes: int
    private_after_load_bytes: int
    # peak private memory within each stage (text_encoder, vae_encoder, denoise,
    # vae_decoder), from the sampler's timestamped samples
    stage_peak_private_bytes: dict[str, int] = field(default_factory=dict)
    vae_encoder_s: float | None = None  # img2img / inpainting only
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        steps = self.unet_step_s
        median = sorted(steps)[len(steps) // 2] if steps else float("nan")
        mib = 2**20
        rows = [("model", self.model), ("memory plan", self.memory_plan),
                ("size / steps", f"{self.config['width']}x{self.config['height']}, "
                                 f"{self.config['steps']} steps, guidance "
                                 f"{self.config['guidance_scale']}"),
                ("load", f"{self.load_s:.3f} s"),
                ("text encoder", f"{self.text_encoder_s:.3f} s"),
                *([("VAE encoder", f"{self.vae_encoder_s:.3f} s")]
                  if self.vae_encoder_s is not None else []),
                ("UNet step", f"median {median:.3f} s, first {steps[0]:.3f} s, "
                              f"all {sum(steps):.3f} s" if steps else "-"),
                ("VAE decoder", f"{self.vae_decoder_s:.3f} s"),
                ("total", f"{self.total_s:.3f} s"),
                ("RSS after load", f"{self.rss_after_load_bytes / mib:.0f} MiB (private "
                                   f"{self.private_after_load_bytes / mib:.0f} MiB)"),
                ("peak RSS", f"{self.peak_rss_bytes / mib:.0f} MiB"),
                ("peak private", f"{self.peak_private_bytes / mib:.0f} MiB"),
                ("peak private by stage", ", ".join(
                    f"{k} {v / mib:.0f} MiB" for k, v in self.stage_peak_private_bytes.items()))]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_bench(prompt: str, config: GenerationConfig, load: Any, image: Any = None,
              mask_image: Any = None, control_image: Any = None
              ) -> tuple[BenchReport, Any]:
    """Load with `load()` (a callable returning a Pipeline) and generate once (from `image`
    and `mask_image`, steered by `control_image`, when given), measuring; return the report
    and the Generation."""
    with _PeakSampler() as sampler:
        t0 = time.perf_counter()
        pipe = load()
        load_s = time.perf_counter() - t0
        after_load = process_memory()
        stamps: list[float] = []

        def on_step(i: int, n: int, _latents: Any) -> None:
            stamps.append(time.perf_counter())
            sampler.sample()

        t0 = time.perf_counter()
        result = pipe.generate(prompt, config, callback=on_step, image=image,
                               mask_image=mask_image, control_image=control_image)
        total = time.perf_counter() - t0
    # the stages run one after the other (the initial noise between them takes
    # milliseconds): their windows follow from the timings
    windows, at = {}, t0
    for stage in STAGES:
        if stage in result.timings:
            windows[stage] = (at, at + result.timings[stage])
            at = windows[stage][1]
    starts = [windows["denoise"][0]] + stamps[:-1]
    steps = [b - a for a, b in zip(starts, stamps)]
    report = BenchReport(
        model=str(pipe.manifest.source.name), memory_plan=pipe.plan.describe(),
        config=result.config.as_dict(), load_s=load_s,
        text_encoder_s=result.timings["text_encoder"], unet_step_s=steps,
        vae_decoder_s=result.timings["vae_decoder"], total_s=total,
        peak_rss_bytes=process_memory().get("VmHWM", 0), peak_private_bytes=sampler.peak,
        rss_after_load_bytes=after_load.get("VmRSS", 0),
        private_after_load_bytes=after_load.get("RssAnon", 0),
        stage_peak_private_bytes={k: sampler.peak_between(*w) for k, w in windows.items()},
        vae_encoder_s=result.timings.get("vae_encoder"))
    return report, result


# in the order they run
STAGES = ("prepare", "text_encoder", "vae_encoder", "denoise", "vae_decoder")
