"""Prompt weighting and long prompts, as AUTOMATIC1111's web UI reads them.

`(word)` multiplies the attention to `word` by 1.1, `[word]` divides it by 1.1, `(word:1.3)`
sets the factor; brackets nest (their factors multiply), `\\(` and friends are literal
characters, and an unclosed bracket applies to the rest of the prompt (A1111's reading of
unbalanced brackets; a stray closing one is plain text). `BREAK` starts a new 75-token chunk.

The weights are applied to the text encoder's output, as A1111 does: every token's hidden
state is multiplied by its weight, then the whole chunk is rescaled so that its mean is the
unweighted one. Long prompts are cut into chunks of 75 tokens (a chunk breaks after the last
comma when one falls within the last 20 tokens), each encoded on its own between <bos> and
<eos>, and the chunks' hidden states are concatenated along the tokens.

These are free functions over token ids and arrays; edge_sdk.text_encoder drives them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import InvalidInputError

ROUND_FACTOR = 1.1  # (word)
SQUARE_FACTOR = 1 / 1.1  # [word]
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack: tokens a chunk may give back
BREAK = "BREAK"

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_weights(text: str) -> list[tuple[str, float | None]]:
    """The prompt as (text, weight) fragments, neighbours of equal weight merged; a `BREAK`
    is the fragment ("BREAK", None) (A1111 marks it with weight -1, which is also a weight
    a prompt may give)."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for frag in res[start:]:
            frag[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _number(weight, text))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND_FACTOR)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE_FACTOR)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append([BREAK, None])
                res.append([part, 1.0])
    for start in round_open:  # unclosed: to the end of the prompt
        multiply(start, ROUND_FACTOR)
    for start in square_open:
        multiply(start, SQUARE_FACTOR)
    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for text_, w in res[1:]:
        if w is not None and w == merged[-1][1]:
            merged[-1][0] += text_
        else:
            merged.append([text_, w])
    return [(t, None if w is None else float(w)) for t, w in merged]


def _number(weight: str, prompt: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise InvalidInputError(f"prompt weight {weight!r} is not a number (in "
                                f"{prompt[:60]!r}); write it as (word:1.2), or escape the "
                                "brackets as \\( \\) (or prompt_weighting=False)") from None


@dataclass(frozen=True)
class Chunk:
    """One text-encoder input: `<bos> tokens <eos> <pad>...` and each position's weight."""

    ids: np.ndarray  # int64 [length]
    weights: np.ndarray  # float32 [length], 1.0 on <bos>, <eos> and padding


def chunk_prompt(fragments: Sequence[tuple[list[int] | None, float]], *, length: int, bos: int,
                 eos: int, pad: int, comma: int | None, split: bool) -> tuple[list[Chunk], int]:
    """Token fragments (ids without specials, or None for a BREAK; weight) -> chunks of
    `length` ids, and the number of tokens dropped. `split`: as many chunks as the prompt
    needs (A1111's long prompts); otherwise one, truncated, its BREAKs ignored."""
    room = length - 2
    if not split:
        flat = [(t, w) for ids, w in fragments if ids is not None for t in ids]
        return [_close(flat[:room], length, bos, eos, pad)], max(0, len(flat) - room)
    chunks: list[Chunk] = []
    cur: list[tuple[int, float]] = []
    last_comma = -1
    for ids, w in fragments:
        if ids is None:  # BREAK
            chunks.append(_close(cur, length, bos, eos, pad))
            cur, last_comma = [], -1
            continue
        for t in ids:
            if t == comma:
                last_comma = len(cur)
            elif len(cur) == room and last_comma != -1 and room - last_comma <= COMMA_BACKTRACK:
                # the tokens after the last comma move on to the next chunk
                chunks.append(_close(cur[:last_comma + 1], length, bos, eos, pad))
                cur, last_comma = cur[last_comma + 1:], -1
            if len(cur) == room:
                chunks.append(_close(cur, length, bos, eos, pad))
                cur, last_comma = [], -1
            cur.append((t, w))
    if cur or not chunks:
        chunks.append(_close(cur, length, bos, eos, pad))
    return chunks, 0


def _close(tokens: Sequence[tuple[int, float]], length: int, bos: int, eos: int,
           pad: int) -> Chunk:
    ids = np.full(length, pad, dtype=np.int64)
    weights = np.ones(length, dtype=np.float32)
    ids[0], ids[len(tokens) + 1] = bos, eos
    for i, (t, w) in enumerate(tokens, start=1):
        ids[i], weights[i] = t, w
    return Chunk(ids, weights)


def apply_weights(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A chunk's hidden states [tokens, dim] with each token's weight multiplied in, then
    scaled so the mean is the unweighted one (A1111's "original" emphasis). All weights 1:
    `hidden` itself."""
    if np.all(weights == 1.0):
        return hidden
    mean = hidden.mean(dtype=np.float64)
    out = hidden * weights[:, None]
    new_mean = out.mean(dtype=np.float64)
    if new_mean == 0.0:  # (weights of 0 everywhere that matters): nothing to restore
        return out
    return (out * (mean / new_mean)).astype(hidden.dtype, copy=False)


def tokenize_weighted(text: str, encode: Callable[[str], list[int]],
                      weighting: bool) -> list[tuple[list[int] | None, float]]:
    """The prompt's fragments as (token ids, weight): parsed with `parse_weights` when
    `weighting`, else the whole text at weight 1; ids None for a BREAK."""
    parsed = parse_weights(text) if weighting else [(text, 1.0)]
    return [(None, 1.0) if w is None else (encode(t), w) for t, w in parsed]
