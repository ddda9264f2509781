"""Textual-inversion embeddings added at conversion (`edge-convert --embedding FILE`).

Each file's vectors become new tokens of the tokenizer and new rows of the text encoder's
token embedding, as diffusers' `load_textual_inversion` adds them: a one-vector embedding is
the token `NAME`; an n-vector one is `NAME`, `NAME_1` ... `NAME_{n-1}`, and the runtime
expands `NAME` in a prompt to all n (edge_sdk.tokenizer, as diffusers'
`maybe_convert_prompt`). Formats: A1111's `.safetensors` (`emb_params`, the trigger word is
the file's name) and `.pt` (`string_to_param`, only with --allow-pickle), and diffusers'
(`{token: vectors}`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_sdk.errors import ConversionError, SafetensorsError
from edge_sdk.safetensors_file import read_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedding:
    """One textual inversion: its trigger word, vectors [n, width] and file."""

    token: str
    vectors: np.ndarray
    path: Path

    @property
    def tokens(self) -> list[str]:
        """The tokens its vectors are added as (diffusers' naming)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors))]

    def describe(self) -> dict[str, Any]:
        from edge_sdk.manifest import sha256_file
        return {"file": self.path.name, "sha256": sha256_file(self.path), "token": self.token,
                "vectors": int(len(self.vectors))}


def _tensors(path: Path, allow_pickle: bool) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        try:
            return read_tensors(path)
        except SafetensorsError as exc:
            raise ConversionError(f"--embedding: {exc}") from exc
    if path.suffix not in (".pt", ".bin"):
        raise ConversionError(f"--embedding {path}: not a .safetensors, .pt or .bin file")
    if not allow_pickle:
        raise ConversionError(f"--embedding {path}: a pickle file, which can run code when "
                              "loaded; use its .safetensors version, or pass --allow-pickle "
                              "if you trust the source")
    import torch
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on a bad pickle
        raise ConversionError(f"--embedding {path}: unreadable ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        data = {"emb_params": next(iter(data["string_to_param"].values()))}
    return {k: (v.detach().float().numpy() if hasattr(v, "detach") else v)
            for k, v in (data.items() if isinstance(data, dict) else [])}


def read_embedding(path: str | Path, width: int, allow_pickle: bool = False) -> Embedding:
    """One embedding file, its vectors checked against the text encoder's `width`."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"--embedding {path}: no such file")
    data = _tensors(path, allow_pickle)
    arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    if "emb_params" in arrays:  # A1111: the trigger word is the file's name
        token, vectors = path.stem, arrays["emb_params"]
    elif len(arrays) == 1:  # diffusers: {token: vectors}
        token, vectors = next(iter(arrays.items()))
    else:
        raise ConversionError(f"--embedding {path}: not a textual-inversion file (keys "
                              f"{sorted(data)[:4]}): expected A1111's emb_params / "
                              "string_to_param or diffusers' {token: vectors}; SDXL "
                              "embeddings (clip_l, clip_g) are not supported")
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, vectors.shape[-1])
    if vectors.shape[1] != width:
        raise ConversionError(f"--embedding {path}: its vectors are {vectors.shape[1]} wide, "
                              f"this text encoder's are {width}: the embedding was made for "
                              "another model family (SD 1.x: 768, SD 2.x: 1024); use one made "
                              "for this model")
    if not token.strip() or any(c.isspace() for c in token):
        raise ConversionError(f"--embedding {path}: its token {token!r} must be one word")
    return Embedding(token, vectors, path)


def read_embeddings(paths: Sequence[str | Path], width: int, vocab: Any,
                    allow_pickle: bool) -> list[Embedding]:
    """Every --embedding, refused when its tokens are already words of `vocab` or of an
    earlier embedding."""
    out: list[Embedding] = []
    taken: set[str] = set()
    for path in paths:
        emb = read_embedding(path, width, allow_pickle)
        clash = [t for t in emb.tokens if t in vocab or t in taken]
        if clash:
            raise ConversionError(f"--embedding {path}: its token {clash[0]!r} is already in "
                                  "the tokenizer's vocabulary or another embedding; rename "
                                  "the file (A1111) to give it another trigger word")
        taken.update(emb.tokens)
        out.append(emb)
    return out


def add_tokens(tokenizer: Any, embeddings: Sequence[Embedding]) -> list[int]:
    """Add the embeddings' tokens to a transformers tokenizer; their ids, in order."""
    tokens = [t for e in embeddings for t in e.tokens]
    tokenizer.add_tokens(tokens)
    return [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]


def add_vectors(text_encoder: Any, ids: Sequence[int], embeddings: Sequence[Embedding]) -> None:
    """Grow the text encoder's token embedding to the new ids and write the vectors."""
    import torch
    rows = np.concatenate([e.vectors for e in embeddings])
    text_encoder.resize_token_embeddings(max(ids) + 1)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[list(ids)] = torch.from_numpy(rows).to(table.dtype)
    log.info("embeddings: %d tokens added", len(ids))
