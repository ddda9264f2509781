"""Text encoding: prompts -> the hidden states the UNet attends to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .backends import Session
from .contracts import TextEncoderIO
from .errors import InferenceError, InvalidInputError
from .manifest import TextSpec
from .prompt_weights import apply_weights
from .tokenizer import PromptTokenizer


@dataclass(frozen=True)
class PromptEmbeds:
    """Conditional embeddings and, when guidance is on, the unconditional ones."""

    cond: np.ndarray  # [batch, tokens, dim]
    uncond: np.ndarray | None  # same shape, or None when classifier-free guidance is off
    # SDXL: the projected pooled output of the conditional and unconditional prompts
    # [batch, dim] (the UNet's text_embeds); None for models without it
    pooled: np.ndarray | None = None
    uncond_pooled: np.ndarray | None = None


@dataclass(frozen=True)
class TextOptions:
    """How prompts are read: A1111's weighting syntax, prompts beyond one window of the
    text encoder, and clip skip (edge_sdk.prompt_weights; GenerationConfig's
    prompt_weighting, long_prompts and clip_skip)."""

    weighting: bool = True
    long: bool = False
    clip_skip: int = 0  # 0: the last layer's output; N: diffusers' clip_skip=N


@dataclass(frozen=True)
class Encoder:
    """One text encoder of a bundle: its role, its session (opened when called), the
    tokenizer that feeds it, and what to do once its prompts are encoded (release it, in a
    memory plan that does)."""

    role: str
    session: Callable[[], Session]
    tokenizer: PromptTokenizer
    release: Callable[[], None] = lambda: None


def _run(session: Session, ids: np.ndarray, skips: Sequence[int], penultimate: bool = False,
         pooled: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The hidden states of each row of `ids`, row i read `skips[i]` layers from the end
    (from the penultimate layer's raw output when `penultimate`, as SDXL reads them), and
    the projected pooled output when `pooled`."""
    layered = penultimate or any(skips)
    states = TextEncoderIO.HIDDEN_LAYERS if penultimate else TextEncoderIO.LAYER_STATES
    names = ([] if penultimate else [TextEncoderIO.HIDDEN_STATES]) \
        + ([states] if layered else []) + ([TextEncoderIO.TEXT_EMBEDS] if pooled else [])
    outs = session.run({TextEncoderIO.INPUT_IDS: ids}, names)
    hidden = outs.get(TextEncoderIO.HIDDEN_STATES)
    if layered:
        layers = outs[states]
        n = layers.shape[1]
        last = n - 1 if penultimate else n  # the index clip skip 0 reads, counted back
        if not all(0 <= k <= last for k in skips):
            raise InvalidInputError(f"clip_skip must be in [0, {last}] (this text encoder's "
                                    f"layers), got {max(skips)}")
        hidden = np.stack([hidden[i] if k == 0 and not penultimate else layers[i, last - k]
                           for i, k in enumerate(skips)])
    pool = outs[TextEncoderIO.TEXT_EMBEDS].astype(np.float32, copy=False) if pooled else None
    if not np.isfinite(hidden).all() or (pool is not None and not np.isfinite(pool).all()):
        raise InferenceError("the text encoder produced NaN/inf; the bundle's text encoder is "
                             "broken (try an fp32 text encoder)")
    return hidden.astype(np.float32, copy=False), pool


def encode_text(session: Session, tokenizer: PromptTokenizer, prompts: Sequence[str],
                options: TextOptions = TextOptions(),
                skips: Sequence[int] | None = None) -> np.ndarray:
    """The text encoder's hidden states for each prompt: [len(prompts), tokens, dim], tokens
    a multiple of the encoder's window (one window unless `options.long`; prompts of fewer
    windows are padded with the empty prompt's, as A1111 pads them). `skips`: each prompt's
    clip skip (default: `options.clip_skip` for all)."""
    return encode_text_pooled(session, tokenizer, prompts, options, skips)[0]


def encode_text_pooled(session: Session, tokenizer: PromptTokenizer, prompts: Sequence[str],
                       options: TextOptions = TextOptions(),
                       skips: Sequence[int] | None = None, penultimate: bool = False,
                       pooled: bool = False, windows: int = 1
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """encode_text, read from the penultimate layer when `penultimate`, with each prompt's
    projected pooled output ([len(prompts), dim], its first window's) when `pooled`, and
    at least `windows` windows per prompt (so two encoders' tokens line up)."""
    skips = [options.clip_skip] * len(prompts) if skips is None else list(skips)
    chunked = [tokenizer.chunks(p, options.weighting, options.long) for p in prompts]
    most = max([len(c) for c in chunked] + [windows])
    rows = [(c, k) for cs, k in zip(chunked, skips) for c in cs]
    first_pad = len(rows)
    pads = sorted({k for cs, k in zip(chunked, skips) if len(cs) < most})
    if pads:  # the empty prompt's window, once per clip skip that needs it
        empty = tokenizer.chunks("", False, False)[0]
        rows += [(empty, k) for k in pads]
    hidden, pool = _run(session, np.stack([c.ids for c, _ in rows]), [k for _, k in rows],
                        penultimate, pooled)
    out, firsts, row = [], [], 0
    for cs, k in zip(chunked, skips):
        parts = [apply_weights(hidden[row + j], c.weights) for j, c in enumerate(cs)]
        firsts.append(row)
        row += len(cs)
        if len(cs) < most:
            parts += [hidden[first_pad + pads.index(k)]] * (most - len(cs))
        out.append(np.concatenate(parts, axis=0))
    return np.stack(out), None if pool is None else pool[firsts]


def encode_prompts(encoders: Sequence[Encoder], spec: TextSpec, prompts: Sequence[str],
                   negative_prompt: str | None, num_images: int, guidance: bool,
                   options: TextOptions = TextOptions(), prompt_2: str | None = None,
                   negative_prompt_2: str | None = None) -> PromptEmbeds:
    """Encode each prompt (and the negative prompt, if guidance is on) once with each text
    encoder in turn (each released after its prompts), concatenate their hidden states on
    the feature axis and repeat them for `num_images`: the batch is the images of the first
    prompt, then those of the next (as diffusers orders them). As diffusers'
    StableDiffusionXLPipeline: the second encoder reads `prompt_2` (default: the prompt) and
    `negative_prompt_2` (default: the negative prompt); with no negative prompt the
    unconditional embeddings are the empty prompt's, or zeros where the model says
    `force_zeros_for_empty_prompt`. Clip skip applies to the prompts, not the negative
    prompt."""
    n = len(prompts)
    zeros = guidance and negative_prompt is None and spec.force_zeros_for_empty_prompt
    negative = negative_prompt or ""
    texts = [list(prompts), [prompt_2 or p for p in prompts]][:len(encoders)]
    if guidance and not zeros:
        texts = [t + [neg] * n for t, neg in
                 zip(texts, [negative, negative_prompt_2 or negative])]
    skips = [options.clip_skip] * n + [0] * (len(texts[0]) - n)
    windows = max(len(e.tokenizer.chunks(t, options.weighting, True, warn=False))
                  for e, ts in zip(encoders, texts) for t in ts) if options.long else 1
    hiddens, pooled = [], None
    for enc, ts in zip(encoders, texts):
        try:
            hidden, pool = encode_text_pooled(enc.session(), enc.tokenizer, ts, options,
                                              skips, spec.penultimate, enc.role == spec.pooled,
                                              windows)
        finally:
            enc.release()
        hiddens.append(hidden)
        pooled = pool if pool is not None else pooled
    hidden = np.concatenate(hiddens, axis=-1) if len(hiddens) > 1 else hiddens[0]

    def images(x: np.ndarray | None, uncond: bool) -> np.ndarray | None:
        if x is None or (uncond and not guidance):
            return None
        part = (np.zeros_like(x[:n]) if zeros else x[n:]) if uncond else x[:n]
        return np.repeat(part, num_images, axis=0)
    return PromptEmbeds(images(hidden, False), images(hidden, True), images(pooled, False),
                        images(pooled, True))
