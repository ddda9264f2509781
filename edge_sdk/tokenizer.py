"""Prompt tokenization with the bundle's `tokenizer.json` (the `tokenizers` library only)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import BundleError, InvalidInputError
from .manifest import TokenizerSpec
from .prompt_weights import Chunk, chunk_prompt, tokenize_weighted

log = logging.getLogger(__name__)

# Prompts beyond this many characters are refused: tokenizing 10 M characters took 40 s, and
# CLIP reads 77 tokens (about 300 characters) of whatever it is given.
MAX_PROMPT_CHARS = 10_000


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
        # multi-vector textual inversions: `name` stands for name, name_1 ... (diffusers'
        # naming; edge-convert --embedding added them as tokens)
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()
                 if not t.special}
        self._multi = {t: " ".join([t] + [f"{t}_{i}" for i in range(1, _count(t, added))])
                       for t in added if f"{t}_1" in added}
        comma = self._fragment_ids(",")  # where A1111 prefers to end a long prompt's window
        self._comma = comma[0] if len(comma) == 1 else None

    def __call__(self, prompts: Sequence[str], warn: bool = True) -> np.ndarray:
        """Each prompt as plain text (no weighting syntax) in one window: [n, max_length]."""
        ids = [self.chunks(p, weighting=False, long=False, warn=warn)[0].ids for p in prompts]
        return np.stack(ids) if ids else np.zeros((0, self.spec.max_length), np.int64)

    def chunks(self, prompt: str, weighting: bool, long: bool,
               warn: bool = True) -> list[Chunk]:
        """`prompt` as text-encoder inputs with per-token weights (edge_sdk.prompt_weights):
        A1111's weighting syntax read when `weighting`, as many 75-token chunks as it
        needs when `long` (else one, truncated with a logged warning when `warn`)."""
        check_prompt(prompt)
        spec = self.spec
        fragments = tokenize_weighted(prompt, self._fragment_ids, weighting)
        chunks, dropped = chunk_prompt(fragments, length=spec.max_length,
                                       bos=spec.bos_token_id, eos=spec.eos_token_id,
                                       pad=spec.pad_token_id, comma=self._comma,
                                       split=long)
        if dropped and warn:
            log.warning("the prompt was truncated to the text encoder's %d tokens: its last "
                        "%d tokens were dropped (long_prompts=True / --long-prompts reads "
                        "them all)", spec.max_length, dropped)
        return chunks

    def _fragment_ids(self, text: str) -> list[int]:
        return list(self._tok.encode(self.expand(text), add_special_tokens=False).ids) \
            if text else []

    def expand(self, text: str) -> str:
        """`text` with each multi-vector embedding's token written out as all its tokens."""
        if not self._multi:
            return text
        found = set(self._tok.encode(text, add_special_tokens=False).tokens)
        for token in found & self._multi.keys():
            expanded = self._multi[token]
            text = re.sub(re.escape(token), lambda _: expanded, text, flags=re.IGNORECASE)
        return text

    def count(self, prompt: str) -> int:
        """Number of tokens of `prompt`, including <bos> and <eos>."""
        return len(self._tok.encode(prompt).ids)


def _count(token: str, added: set[str]) -> int:
    n = 1
    while f"{token}_{n}" in added:
        n += 1
    return n


def check_prompt(prompt: object, what: str = "prompt") -> str:
    """A prompt must be a string of at most MAX_PROMPT_CHARS characters."""
    if not isinstance(prompt, str):
        raise InvalidInputError(f"{what} must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInputError(f"{what} has {len(prompt)} characters; at most "
                                f"{MAX_PROMPT_CHARS} are accepted (the text encoder reads "
                                "the first ~300)")
    return prompt
