"""Text encoding: prompts -> the hidden states the UNet attends to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .backends import Session
from .contracts import TextEncoderIO
from .errors import InferenceError, InvalidInputError
from .prompt_weights import apply_weights
from .tokenizer import PromptTokenizer


@dataclass(frozen=True)
class PromptEmbeds:
    """Conditional embeddings and, when guidance is on, the unconditional ones."""

    cond: np.ndarray  # [batch, tokens, dim]
    uncond: np.ndarray | None  # same shape, or None when classifier-free guidance is off


@dataclass(frozen=True)
class TextOptions:
    """How prompts are read: A1111's weighting syntax, prompts beyond one window of the
    text encoder, and clip skip (edge_sdk.prompt_weights; GenerationConfig's
    prompt_weighting, long_prompts and clip_skip)."""

    weighting: bool = True
    long: bool = False
    clip_skip: int = 0  # 0: the last layer's output; N: diffusers' clip_skip=N


def _run(session: Session, ids: np.ndarray, skips: Sequence[int]) -> np.ndarray:
    """The hidden states of each row of `ids`, row i read `skips[i]` layers from the end."""
    names = [TextEncoderIO.HIDDEN_STATES] + ([TextEncoderIO.LAYER_STATES] if any(skips) else [])
    outs = session.run({TextEncoderIO.INPUT_IDS: ids}, names)
    hidden = outs[TextEncoderIO.HIDDEN_STATES]
    if any(skips):
        layers = outs[TextEncoderIO.LAYER_STATES]
        n = layers.shape[1]
        if not all(0 <= k <= n for k in skips):
            raise InvalidInputError(f"clip_skip must be in [0, {n}] (this text encoder's "
                                    f"layers), got {max(skips)}")
        hidden = np.stack([h if k == 0 else layers[i, n - k]
                           for i, (h, k) in enumerate(zip(hidden, skips))])
    if not np.isfinite(hidden).all():
        raise InferenceError("the text encoder produced NaN/inf; the bundle's text encoder is "
                             "broken (try an fp32 text encoder)")
    return hidden.astype(np.float32, copy=False)


def encode_text(session: Session, tokenizer: PromptTokenizer, prompts: Sequence[str],
                options: TextOptions = TextOptions(),
                skips: Sequence[int] | None = None) -> np.ndarray:
    """The text encoder's hidden states for each prompt: [len(prompts), tokens, dim], tokens
    a multiple of the encoder's window (one window unless `options.long`; prompts of fewer
    windows are padded with the empty prompt's, as A1111 pads them). `skips`: each prompt's
    clip skip (default: `options.clip_skip` for all)."""
    skips = [options.clip_skip] * len(prompts) if skips is None else list(skips)
    chunked = [tokenizer.chunks(p, options.weighting, options.long) for p in prompts]
    most = max(len(c) for c in chunked)
    rows = [(c, k) for cs, k in zip(chunked, skips) for c in cs]
    first_pad = len(rows)
    pads = sorted({k for cs, k in zip(chunked, skips) if len(cs) < most})
    if pads:  # the empty prompt's window, once per clip skip that needs it
        empty = tokenizer.chunks("", False, False)[0]
        rows += [(empty, k) for k in pads]
    hidden = _run(session, np.stack([c.ids for c, _ in rows]), [k for _, k in rows])
    out, row = [], 0
    for cs, k in zip(chunked, skips):
        parts = [apply_weights(hidden[row + j], c.weights) for j, c in enumerate(cs)]
        row += len(cs)
        if len(cs) < most:
            parts += [hidden[first_pad + pads.index(k)]] * (most - len(cs))
        out.append(np.concatenate(parts, axis=0))
    return np.stack(out)


def encode_prompts(session: Session, tokenizer: PromptTokenizer, prompts: Sequence[str],
                   negative_prompt: str | None, num_images: int,
                   guidance: bool, options: TextOptions = TextOptions()) -> PromptEmbeds:
    """Encode each prompt (and the negative prompt, "" when None, if guidance is on) once
    and repeat it for `num_images`: the batch is the images of the first prompt, then those
    of the next (as diffusers orders them). Clip skip applies to the prompts, not the
    negative prompt, as in diffusers."""
    n = len(prompts)
    texts = list(prompts) + ([negative_prompt or ""] * n if guidance else [])
    skips = [options.clip_skip] * n + [0] * (len(texts) - n)
    hidden = encode_text(session, tokenizer, texts, options, skips)
    cond = np.repeat(hidden[:n], num_images, axis=0)
    uncond = np.repeat(hidden[n:], num_images, axis=0) if guidance else None
    return PromptEmbeds(cond, uncond)
