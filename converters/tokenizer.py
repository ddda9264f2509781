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


def export_tokenizer(ckpt: Checkpoint, out_dir: Path, max_positions: int) -> TokenizerSpec:
    tok = ckpt.load_tokenizer()
    backend = tok.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(out_dir / N.TOKENIZER_FILE))
    max_length = int(tok.model_max_length)
    if not 0 < max_length <= max_positions:  # unset in the config -> "very large" sentinel
        max_length = max_positions
    if tok.pad_token is None:
        raise ConversionError(f"{ckpt.path / 'tokenizer'}: no pad token in the tokenizer config")
    path = out_dir / N.TOKENIZER_FILE
    spec = TokenizerSpec(file=N.TOKENIZER_FILE, max_length=max_length, pad_token=tok.pad_token,
                         pad_token_id=int(tok.pad_token_id), bos_token_id=int(tok.bos_token_id),
                         eos_token_id=int(tok.eos_token_id), size=path.stat().st_size,
                         sha256=sha256_file(path))
    ours = PromptTokenizer(out_dir / N.TOKENIZER_FILE, spec)
    for text in PROBES:
        want = tok(text, padding="max_length", max_length=max_length, truncation=True).input_ids
        got = ours([text], warn=False)[0].tolist()
        if got != list(want):
            raise ConversionError(f"exported tokenizer disagrees with the checkpoint's on "
                                  f"{text[:40]!r}: {got[:12]} vs {list(want)[:12]}")
    return spec
