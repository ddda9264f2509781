"""Text encoding: prompts -> the hidden states the UNet attends to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .backends import Session
from .contracts import TextEncoderIO
from .errors import InferenceError
from .tokenizer import PromptTokenizer


@dataclass(frozen=True)
class PromptEmbeds:
    """Conditional embeddings and, when guidance is on, the unconditional ones."""

    cond: np.ndarray  # [batch, tokens, dim]
    uncond: np.ndarray | None  # same shape, or None when classifier-free guidance is off


def encode_text(session: Session, tokenizer: PromptTokenizer,
                prompts: Sequence[str]) -> np.ndarray:
    """Last hidden states of the text encoder for each prompt: [len(prompts), tokens, dim]."""
    ids = tokenizer(prompts)
    out = session.run({TextEncoderIO.INPUT_IDS: ids})[TextEncoderIO.HIDDEN_STATES]
    if not np.isfinite(out).all():
        raise InferenceError("the text encoder produced NaN/inf; the bundle's text encoder is "
                             "broken (try an fp32 text encoder)")
    return out.astype(np.float32, copy=False)


def encode_prompts(session: Session, tokenizer: PromptTokenizer, prompts: Sequence[str],
                   negative_prompt: str | None, num_images: int,
                   guidance: bool) -> PromptEmbeds:
    """Encode each prompt (and the negative prompt, "" when None, if guidance is on) once
    and repeat it for `num_images`: the batch is the images of the first prompt, then those
    of the next (as diffusers orders them)."""
    n = len(prompts)
    texts = list(prompts) + ([negative_prompt or ""] * n if guidance else [])
    hidden = encode_text(session, tokenizer, texts)
    cond = np.repeat(hidden[:n], num_images, axis=0)
    uncond = np.repeat(hidden[n:], num_images, axis=0) if guidance else None
    return PromptEmbeds(cond, uncond)
