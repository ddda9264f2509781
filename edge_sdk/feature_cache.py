"""Feature caching between denoising steps (DeepCache, Ma et al. 2023, arXiv 2312.00858).

A UNet's deep features change little from one step to the next. With `cache_interval=N`
the whole UNet runs on every N-th step (the first of a run included) and also returns its
deep features, the state entering the last up block's shallow layers; the steps between run
only the shallow branch (`unet_shallow`: the input convolution, the first layer of the
first down block, the last up block's last layers, the output head), fed the cached
features. The branch is exported by `edge-convert` (converters.feature_cache); given the
features of the same step it reproduces the UNet's output exactly, so the only difference
from running every step whole is the features' age.

Guidance works as without caching: one cache per guidance branch (the batched call caches
both halves at once; two sequential calls keep one each). Every scheduler calls the
predictor once per step, so the step index decides which graph runs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .backends import Session
from .contracts import UnetIO
from .denoise import Conditioning, Feeds, Predict, classifier_free_guidance, unet_feeds

log = logging.getLogger(__name__)

__all__ = ["cached_unet_predictor", "is_full_step"]


def is_full_step(step: int, first: int, interval: int) -> bool:
    """Whether step `step` of a run that began at step `first` runs the whole UNet."""
    return (step - first) % interval == 0


def cached_unet_predictor(unet: Session, shallow: Session, conditioning: Conditioning,
                          guidance_scale: float, interval: int,
                          batched: bool = True) -> Predict:
    """The guided model output, with the whole UNet every `interval` steps and its shallow
    branch between (interval 1: every step whole)."""
    cache: dict[int, np.ndarray] = {}  # guidance branch call -> its deep features
    first: list[int] = []
    counts = {"full": 0, "shallow": 0}

    def predict(x: np.ndarray, t: float, step: int) -> np.ndarray:
        if not first:
            first.append(step)
        full = is_full_step(step, first[0], interval)
        calls = iter(range(2))

        def run(sample: np.ndarray, feeds: Feeds) -> np.ndarray:
            key = next(calls)
            inputs: dict[str, Any] = unet_feeds(sample, t, feeds, conditioning.channels)
            deep = cache.get(key)
            if full or deep is None or deep.shape[0] != sample.shape[0]:
                out = unet.run(inputs, [UnetIO.OUTPUT, UnetIO.DEEP_FEATURES])
                cache[key] = out[UnetIO.DEEP_FEATURES]
                counts["full"] += 1
            else:
                out = shallow.run({**inputs, UnetIO.DEEP_FEATURES: deep})
                counts["shallow"] += 1
            return out[UnetIO.OUTPUT]
        result = classifier_free_guidance(run, x, conditioning, guidance_scale, batched)
        log.debug("step %d: %s UNet (calls so far %s)", step, "whole" if full else "shallow",
                  counts)
        return result
    return predict
