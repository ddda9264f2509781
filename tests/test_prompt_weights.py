"""Prompt weighting, long prompts and clip skip: the parser against A1111's documented
readings, the chunking and the weighting against values worked out by hand, and the text
encoder's output against diffusers (clip skip) and against itself (weights of 1, windows)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk import Pipeline
from edge_sdk.errors import InvalidInputError
from edge_sdk.prompt_weights import apply_weights, chunk_prompt, parse_weights
from edge_sdk.text_encoder import TextOptions

from .conftest import needs_convert

# A1111's own examples (modules/prompt_parser.py's docstring), weights worked out by hand:
# "(((house:1.3))" is 1.3 x 1.1 x 1.1, "[on]" inside the third "(" is 1.1 / 1.1, ...
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
]


@pytest.mark.parametrize("text,want", A1111_EXAMPLES)
def test_parse_weights_reads_prompts_as_a1111(text, want):
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in want], rtol=1e-12)


def test_parse_weights_edge_cases():
    assert parse_weights("") == [("", 1.0)]
    assert parse_weights("[dim") == [("dim", pytest.approx(1 / 1.1))]  # unclosed: to the end
    assert parse_weights("a) b") == [("a) b", 1.0)]  # a stray closer is text
    assert parse_weights("(a: 1.5 )") == [("a", 1.5)]
    assert parse_weights("x (y:oops) z") == [("x ", 1.0), ("y:oops", 1.1), (" z", 1.0)]
    assert parse_weights("one BREAK two") == [("one", 1.0), ("BREAK", None), ("two", 1.0)]
    # a weight of -1 is a weight (A1111's own BREAK marker is -1 too: not confused here)
    assert parse_weights("a (cat:-1) BREAK b") == [("a ", 1.0), ("cat", -1.0), ("", 1.0),
                                                   ("BREAK", None), ("b", 1.0)]
    with pytest.raises(InvalidInputError, match="prompt weight '1.2.3' is not a number"):
        parse_weights("a (red:1.2.3) b")


def _chunks(tokens, split=True, length=8, comma=99):
    """chunk_prompt over one fragment of weight 2 with 6-token windows (length 8)."""
    return chunk_prompt([(tokens, 2.0)], length=length, bos=1, eos=2, pad=0, comma=comma,
                        split=split)


def test_chunking_windows_commas_and_breaks():
    chunks, dropped = _chunks([10, 11, 12, 13, 14, 15, 16])
    assert dropped == 0
    assert [c.ids.tolist() for c in chunks] == [[1, 10, 11, 12, 13, 14, 15, 2],
                                                [1, 16, 2, 0, 0, 0, 0, 0]]
    assert chunks[1].weights.tolist() == [1, 2, 1, 1, 1, 1, 1, 1]
    # a comma within the last 20 tokens of a full window: the window ends after it
    chunks, _ = _chunks([10, 99, 11, 12, 13, 14, 15])
    assert [c.ids.tolist() for c in chunks] == [[1, 10, 99, 2, 0, 0, 0, 0],
                                                [1, 11, 12, 13, 14, 15, 2, 0]]
    # not split: one window, the rest counted as dropped, BREAK ignored
    chunks, dropped = chunk_prompt([([10, 11], 1.0), (None, 1.0), ([12] * 6, 1.0)], length=8,
                                   bos=1, eos=2, pad=0, comma=None, split=False)
    assert len(chunks) == 1 and dropped == 2
    assert chunks[0].ids.tolist() == [1, 10, 11, 12, 12, 12, 12, 2]
    chunks, _ = chunk_prompt([([10], 1.0), (None, 1.0), ([11], 1.0)], length=8, bos=1, eos=2,
                             pad=0, comma=None, split=True)
    assert [c.ids[:3].tolist() for c in chunks] == [[1, 10, 2], [1, 11, 2]]


def test_apply_weights_restores_the_mean():
    hidden = np.array([[1.0, 3.0], [2.0, 2.0], [4.0, 0.0]], np.float32)  # mean 2
    got = apply_weights(hidden, np.array([1.0, 2.0, 1.0], np.float32))
    # multiplied: [[1, 3], [4, 4], [4, 0]], mean 16/6; rescaled by 2 / (16/6) = 0.75
    np.testing.assert_allclose(got, [[0.75, 2.25], [3.0, 3.0], [3.0, 0.0]], rtol=1e-6)
    ones = np.ones(3, np.float32)
    assert apply_weights(hidden, ones) is hidden


@pytest.fixture(scope="module")
def shapes():
    return Pipeline.load("shapes")


def _embed(pipe, prompt, **text):
    return pipe.encode_prompt(prompt, guidance_scale=1.0, text=TextOptions(**text)).cond[0]


def test_weights_of_one_give_the_unweighted_embeddings(shapes):
    plain = _embed(shapes, "a red circle and a blue square", weighting=False)
    assert np.array_equal(_embed(shapes, "a (red:1.0) circle and a ((blue:1.0):1) square"),
                          plain)
    assert np.array_equal(_embed(shapes, "a red circle and a blue square"), plain)


def test_weighted_embeddings_as_a1111_computes_them(shapes):
    plain = _embed(shapes, "a red circle", weighting=False)
    ids = shapes.tokenizer(["a red circle"])[0]
    red = int(np.nonzero(ids == shapes.tokenizer.chunks("red", False, False)[0].ids[1])[0][0])
    want = plain.astype(np.float64).copy()
    want[red] *= 1.5
    want *= plain.mean(dtype=np.float64) / want.mean()
    got = _embed(shapes, "a (red:1.5) circle")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, plain, atol=1e-3)


def test_long_prompts_are_windows_concatenated(shapes):
    text = "a small red circle at the top left, " * 12  # ~110 tokens
    L = shapes.tokenizer.spec.max_length  # the shapes model's text encoder reads 32
    one = _embed(shapes, text)
    assert one.shape[0] == L
    long = _embed(shapes, text, long=True)
    chunks = shapes.tokenizer.chunks(text, False, True)
    assert len(chunks) > 2 and long.shape[0] == len(chunks) * L
    # a window ends after a comma (within its last 20 tokens), not mid-phrase
    first = chunks[0].ids.tolist()
    eos = first.index(shapes.tokenizer.spec.eos_token_id, 1)
    assert first[eos - 1] == shapes.tokenizer.chunks(",", False, False)[0].ids[1]
    assert eos < L - 1  # the window gave its last tokens to the next one
    session = shapes.session("text_encoder")
    windows = session.run({"input_ids": np.stack([c.ids for c in chunks])})
    np.testing.assert_array_equal(long, np.concatenate(list(windows["last_hidden_state"])))
    # the negative prompt (one window) is padded with the empty prompt's window
    embeds = shapes.encode_prompt(text, "blurry", guidance_scale=5.0,
                                  text=TextOptions(long=True))
    assert embeds.uncond.shape == embeds.cond.shape == (1, long.shape[0], one.shape[1])
    for k in range(1, len(chunks)):
        np.testing.assert_allclose(embeds.uncond[0, k * L:(k + 1) * L], _embed(shapes, ""),
                                   atol=1e-6)
    np.testing.assert_allclose(embeds.uncond[0, :L], _embed(shapes, "blurry"), atol=1e-6)
    image = shapes(text, steps=2, seed=3, long_prompts=True, output_type="np")
    assert np.isfinite(image).all()


def _clip_skip_reference(ckpt, prompt, skip):
    """diffusers' clip_skip by its definition (its pipeline's own code reaches for
    `text_encoder.text_model`, which transformers 5 no longer has): the hidden states
    `skip` layers before the last, through the final LayerNorm."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(ckpt / "tokenizer")
    enc = CLIPTextModel.from_pretrained(ckpt / "text_encoder").eval()
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = enc(ids, output_hidden_states=True)
        norm = getattr(enc, "text_model", enc).final_layer_norm
        return norm(out.hidden_states[-(skip + 1)]).numpy(), out.last_hidden_state.numpy()


@needs_convert
def test_clip_skip_matches_diffusers_definition(models):
    ckpt = models.checkpoint("tiny-sd1")
    pipe = Pipeline.load(models.bundle("tiny-sd1"))
    for skip in (1, 2):
        cond, _ = _clip_skip_reference(ckpt, "a red circle", skip)
        _, uncond = _clip_skip_reference(ckpt, "blurry", skip)
        got = pipe.encode_prompt("a red circle", "blurry", guidance_scale=7.5,
                                 text=TextOptions(clip_skip=skip))
        np.testing.assert_allclose(got.cond, cond, atol=1e-4)
        # as in diffusers, the negative prompt's embeddings are the last layer's
        np.testing.assert_allclose(got.uncond, uncond, atol=1e-4)
    assert not np.allclose(got.cond, _embed(pipe, "a red circle"), atol=1e-3)
    layers = pipe.session("text_encoder").outputs[-1].shape[1]
    with pytest.raises(InvalidInputError, match=r"clip_skip must be in \[0, "):
        pipe("a red circle", steps=1, clip_skip=layers + 1)
    image = pipe("a red circle", steps=2, seed=1, clip_skip=1, output_type="np")
    assert np.isfinite(image).all()
