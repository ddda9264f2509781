"""Tokenizer export: the checkpoint's vocab.json + merges.txt -> one `tokenizer.json` that the
runtime reads with the `tokenizers` library alone, checked against transformers' tokenizer."""

from __future__ import annotations

from pathlib import Path

from edge_sdk import names as N
from edge_sdk.errors import ConversionError
from edge_sdk.manifest import TokenizerSpec, sha256_file
from edge_sdk.tokenizer import PromptTokenizer

from .checkpoint import Checkpoint

PROBES = ["a photo of an astronaut riding a horse on mars", "", "Ünïcödé café — 東京, 🚀!!",
          "two small green squares at the top left " * 12]


# tokenizer role -> (checkpoint folder, bundle file, the text encoder it feeds)
ROLES = {N.TOKENIZER: ("tokenizer", N.TOKENIZER_FILE, N.TEXT_ENCODER),
         N.TOKENIZER_2: ("tokenizer_2", N.TOKENIZER_2_FILE, N.TEXT_ENCODER_2)}


def export_tokenizer(ckpt: Checkpoint, out_dir: Path, max_positions: int,
                     role: str = N.TOKENIZER) -> TokenizerSpec:
    """The tokenizer of `role` written as one tokenizer.json and checked against the
    checkpoint's on probe texts."""
    folder, file, encoder = ROLES[role]
    tok = ckpt.load_tokenizer(folder)
    backend = tok.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    path = out_dir / file
    backend.save(str(path))
    max_length = int(tok.model_max_length)
    if not 0 < max_length <= max_positions:  # unset in the config -> "very large" sentinel
        max_length = max_positions
    if tok.pad_token is None:
        raise ConversionError(f"{ckpt.path / folder}: no pad token in the tokenizer config")
    spec = TokenizerSpec(file=file, max_length=max_length, pad_token=tok.pad_token,
                         pad_token_id=int(tok.pad_token_id), bos_token_id=int(tok.bos_token_id),
                         eos_token_id=int(tok.eos_token_id), size=path.stat().st_size,
                         sha256=sha256_file(path), text_encoder=encoder)
    ours = PromptTokenizer(path, spec)
    for text in PROBES:
        want = tok(text, padding="max_length", max_length=max_length, truncation=True).input_ids
        got = ours([text], warn=False)[0].tolist()
        if got != list(want):
            raise ConversionError(f"exported tokenizer disagrees with the checkpoint's on "
                                  f"{text[:40]!r}: {got[:12]} vs {list(want)[:12]}")
    return spec
