"""The bundle's tokenizer.json gives the same ids as transformers' CLIPTokenizer built from
the checkpoint's vocab.json + merges.txt (the real CLIP BPE vocabulary)."""

from __future__ import annotations

import pytest

from edge_sdk import Manifest
from edge_sdk.tokenizer import PromptTokenizer

from .conftest import needs_convert

pytestmark = needs_convert

PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "   ", "A RED circle!!",
           "two small green squares at the top left", "naïve café, 東京 🚀", "don't stop",
           "a " * 100, "x" * 300, "<|endoftext|> inside", "tab\tand\nnewline"]


def test_known_ids(models):
    bundle = models.bundle("tiny-sd1")
    m = Manifest.load(bundle)
    tok = PromptTokenizer(bundle / m.tokenizer.file, m.tokenizer)
    ids = tok(["a photo of an astronaut riding a horse on mars"])[0]
    want = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    assert ids[:12].tolist() == want
    assert (ids[12:] == 49407).all() and ids.shape == (77,)


@pytest.mark.parametrize("arch,pad_id", [("tiny-sd1", 49407), ("tiny-sd2", 0)])
def test_matches_transformers(models, arch, pad_id):
    from transformers import CLIPTokenizer
    ref = CLIPTokenizer.from_pretrained(models.checkpoint(arch) / "tokenizer")
    bundle = models.bundle(arch)
    m = Manifest.load(bundle)
    assert m.tokenizer.pad_token_id == pad_id
    tok = PromptTokenizer(bundle / m.tokenizer.file, m.tokenizer)
    ours = tok(PROMPTS, warn=False)
    for prompt, row in zip(PROMPTS, ours):
        want = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert row.tolist() == want, prompt


def test_subset_vocab_tokenizes_like_full_clip(tmp_path):
    """The shapes model's vocabulary (CLIP merges restricted to its words) splits those words
    exactly as the full CLIP vocabulary does."""
    from transformers import CLIPTokenizer

    from converters.clip_vocab import subset_clip_vocab, write_clip_tokenizer_files
    words = {"a", "red", "circle", "squares", "background", "purple", "triangles", ","}
    vocab, merges = subset_clip_vocab(words)
    assert len(vocab) < 1000 and len(merges) < 200
    write_clip_tokenizer_files(tmp_path / "sub", vocab_and_merges=(vocab, merges))
    write_clip_tokenizer_files(tmp_path / "full")
    sub = CLIPTokenizer.from_pretrained(tmp_path / "sub")
    full = CLIPTokenizer.from_pretrained(tmp_path / "full")
    text = "a red circle, purple triangles squares background"
    assert sub.convert_ids_to_tokens(sub(text).input_ids) == \
        full.convert_ids_to_tokens(full(text).input_ids)
