"""Prompt tokenization with the bundle's `tokenizer.json` (the `tokenizers` library only)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import BundleError, InvalidInputError
from .manifest import TokenizerSpec

log = logging.getLogger(__name__)


class PromptTokenizer:
    """CLIP-style tokenization: `<bos> tokens <eos> <pad>...`, exactly `max_length` ids.

    Prompts longer than the limit are truncated (keeping `<eos>` last) with a logged warning,
    as diffusers does.
    """

    def __init__(self, path: str | Path, spec: TokenizerSpec) -> None:
        from tokenizers import Tokenizer
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception on bad JSON
            raise BundleError(f"{path}: not a valid tokenizer.json ({exc}); re-convert the bundle"
                              ) from exc
        self.spec = spec

    def __call__(self, prompts: Sequence[str], warn: bool = True) -> np.ndarray:
        for p in prompts:
            if not isinstance(p, str):
                raise InvalidInputError(f"prompt must be a string, got {type(p).__name__}")
        L, spec = self.spec.max_length, self.spec
        out = np.full((len(prompts), L), spec.pad_token_id, dtype=np.int64)
        for row, enc in enumerate(self._tok.encode_batch(list(prompts))):
            ids = enc.ids
            if len(ids) > L and warn:
                dropped = self._tok.decode(ids[L - 1:-1]).replace("</w>", " ").strip()
                log.warning("The following part of your input was truncated because the text "
                            "encoder can only handle sequences up to %d tokens: %r", L, dropped)
            if len(ids) > L:
                ids = ids[:L - 1] + [spec.eos_token_id]
            out[row, :len(ids)] = ids
        return out

    def count(self, prompt: str) -> int:
        """Number of tokens of `prompt`, including <bos> and <eos>."""
        return len(self._tok.encode(prompt).ids)
