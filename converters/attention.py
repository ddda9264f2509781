"""Query-chunked self-attention for the exported UNet graph.

A plain export materialises one batch x heads x tokens x tokens score matrix per
self-attention layer: at 512x512 (4,096 tokens, 8 heads, fp32) that is 512 MB per image,
more than the whole budget of a small board. Splitting the queries into `chunks` slices
exports `chunks` independent MatMul -> Softmax -> MatMul chains that onnxruntime runs one
after the other, each freeing its scores before the next allocates, so the peak is the
full matrix divided by `chunks`. The result is the same attention (softmax is per query
row), only computed in pieces. The slices are computed from the graph's dynamic token
count, so the graph still serves every resolution.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)

# Tokens per query slice that `auto` aims for: at 4,096 keys, 8 heads, fp32 one slice's
# scores are 8 x 256 x 4096 x 4 B = 32 MB per image.
AUTO_QUERY_SLICE = 256
# Below this many tokens at the native size (64x64 latents = 4,096) chunking is not worth
# the extra nodes: the full score matrix is already small.
AUTO_MIN_TOKENS = 2048
# The VAE decoder's mid-block attention runs at the output's latent size, whatever the
# native size (a small model asked for 512x512 attends over 4,096 tokens: a 64 MB score
# matrix, x2 with its softmax), and it is one layer with one head: slicing always costs
# nothing measurable.
VAE_AUTO_CHUNKS = 16


def auto_chunks(sample_size: int) -> int:
    """The chunk count for a UNet whose native latent size is `sample_size` (square)."""
    tokens = sample_size * sample_size
    return 1 if tokens < AUTO_MIN_TOKENS else math.ceil(tokens / AUTO_QUERY_SLICE)


class ChunkedSelfAttnProcessor:
    """diffusers attention processor: classic attention, self-attention computed in
    `chunks` query slices. Cross-attention (77 keys) and masked attention are unchanged."""

    def __init__(self, chunks: int) -> None:
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.chunks = chunks

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any,
                 **kwargs: Any) -> Any:
        import torch

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        self_attention = encoder_hidden_states is None
        context = hidden_states if self_attention else encoder_hidden_states
        if not self_attention and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, context.shape[1], query.shape[0])
        chunks = self.chunks if self_attention and mask is None else 1
        key_t = key.transpose(-1, -2) * attn.scale
        if chunks == 1:
            out = _attend(query, key_t, value, mask)
        else:
            tokens = query.shape[1]  # a graph value under tracing: slices follow the input
            step = (tokens + chunks - 1) // chunks
            out = torch.cat([_attend(query[:, i * step:(i + 1) * step], key_t, value, None)
                             for i in range(chunks)], dim=1)
        hidden_states = attn.batch_to_head_dim(out)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attend(query: Any, key_t: Any, value: Any, mask: Any) -> Any:
    import torch
    scores = torch.bmm(query, key_t)
    if mask is not None:
        scores = scores + mask
    return torch.bmm(scores.softmax(dim=-1), value)


def use_chunked_attention(model: Any, chunks: int) -> None:
    """Give every attention layer of `model` (a UNet or a VAE) the chunked processor."""
    model.set_attn_processor(ChunkedSelfAttnProcessor(chunks))
    log.info("%s self-attention exported in %d query slices", type(model).__name__, chunks)
