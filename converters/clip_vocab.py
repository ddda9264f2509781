"""CLIP's byte-level BPE vocabulary (the tokenizer of every SD 1.x/2.x checkpoint), offline.

Built from `assets/bpe_simple_vocab_16e6.txt.gz` exactly as OpenAI's CLIP tokenizer builds it:
the 256 byte-unicode characters, the same with `</w>`, the 48,894 merges joined, then
`<|startoftext|>` and `<|endoftext|>` (49,408 entries).
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_encoder() -> dict[int, str]:
    """byte value -> the printable character CLIP's BPE uses for it."""
    chars = _bytes_to_unicode()
    order = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
             + list(range(ord("®"), ord("ÿ") + 1)))
    order += [b for b in range(256) if b not in order]
    return dict(zip(order, chars))


def _bytes_to_unicode() -> list[str]:
    """The 256 byte characters in CLIP's vocabulary order."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    data = resources.files("converters").joinpath("assets/bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(data.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]
    tokens = _bytes_to_unicode()
    tokens = tokens + [t + "</w>" for t in tokens] + ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_files(folder: str | Path, pad_token: str = EOS, max_length: int = 77,
                               vocab_and_merges: tuple[dict[str, int], list[str]] | None = None
                               ) -> None:
    """Write a tokenizer folder the way SD checkpoints ship it: vocab.json, merges.txt,
    tokenizer_config.json and special_tokens_map.json (no tokenizer.json). The full CLIP
    vocabulary unless `vocab_and_merges` is given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges or clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
              "do_lower_case": True, "errors": "replace", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one (byte-encoded) word, in order."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(parts) > 1:
        pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, 1 << 30))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def subset_clip_vocab(words: set[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP's BPE restricted to the merges that `words` need, in CLIP's merge order.

    Every listed word tokenizes exactly as with the full CLIP vocabulary (each step's
    lowest-rank merge is kept), other text falls back to shorter pieces down to single
    bytes; the vocabulary shrinks from 49,408 entries to a few hundred."""
    _, merges = clip_vocab_and_merges()
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    byte_chars, enc = _bytes_to_unicode(), _byte_encoder()
    needed: set[tuple[str, str]] = set()
    for w in words:
        encoded = "".join(enc[b] for b in w.lower().encode("utf-8"))
        if encoded:
            needed.update(_bpe_merges_used(encoded, ranks))
    kept = [m for m in merges if tuple(m.split()) in needed]
    tokens = byte_chars + [t + "</w>" for t in byte_chars] + ["".join(m.split()) for m in kept]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, kept
