"""A diffusers AutoencoderKL decoder (and encoder) as a chain of stages split at its
GroupNorms, for exact tiled decoding (encoding) by edge_sdk.tiling.run_stages (see there for
why).

Each stage is a torch module whose GroupNorm takes its statistics as inputs (`mean`,
`inv_std`, [batch, groups]) instead of computing them over what it sees, so a tile is
normalised exactly as the whole map would be. The mid-block attention is global: it stays one
untiled stage (it runs at latent resolution, where memory is small).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edge_sdk.contracts import VAE_DECODER_STAGE, StageIO
from edge_sdk.manifest import DecoderStage


class StatNorm(torch.nn.Module):
    """GroupNorm's affine normalisation with statistics given from outside."""

    def __init__(self, gn: torch.nn.GroupNorm) -> None:
        super().__init__()
        self.groups, self.weight, self.bias = gn.num_groups, gn.weight, gn.bias

    def forward(self, x: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = x.reshape(b, self.groups, c // self.groups, h, w)
        g = (g - mean[:, :, None, None, None]) * inv_std[:, :, None, None, None]
        return g.reshape(b, c, h, w) * self.weight[None, :, None, None] \
            + self.bias[None, :, None, None]


class _In(torch.nn.Module):
    def __init__(self, post_quant_conv: Any, conv_in: Any) -> None:
        super().__init__()
        self.pq, self.conv_in = post_quant_conv, conv_in

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_in(self.pq(z) if self.pq is not None else z)


class _ResA(torch.nn.Module):  # norm1 -> act -> conv1
    def __init__(self, r: Any) -> None:
        super().__init__()
        self.norm, self.act, self.conv = StatNorm(r.norm1), r.nonlinearity, r.conv1

    def forward(self, x: torch.Tensor, mean: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x, mean, inv)))


class _ResB(torch.nn.Module):  # norm2 -> act -> conv2, plus the (shortcut of the) block input
    def __init__(self, r: Any) -> None:
        super().__init__()
        self.norm, self.act, self.conv = StatNorm(r.norm2), r.nonlinearity, r.conv2
        self.shortcut, self.scale = r.conv_shortcut, r.output_scale_factor

    def forward(self, h: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                inv: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.act(self.norm(h, mean, inv)))
        x = self.shortcut(x) if self.shortcut is not None else x
        return (x + h) / self.scale


class _Whole(torch.nn.Module):  # a module run on the whole map (attention)
    def __init__(self, m: Any) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class _Up(torch.nn.Module):
    def __init__(self, up: Any) -> None:
        super().__init__()
        self.conv = up.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Down(torch.nn.Module):  # the encoder's Downsample2D: zero pad right/bottom, stride 2
    def __init__(self, down: Any) -> None:
        super().__init__()
        self.conv, self.pad = down.conv, down.padding == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad else x)


class _EncOut(torch.nn.Module):  # norm -> act -> conv_out -> quant_conv: the latent moments
    def __init__(self, vae: Any) -> None:
        super().__init__()
        e = vae.encoder
        self.norm, self.act, self.conv = StatNorm(e.conv_norm_out), e.conv_act, e.conv_out
        self.quant = getattr(vae, "quant_conv", None)

    def forward(self, x: torch.Tensor, mean: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.act(self.norm(x, mean, inv)))
        return self.quant(h) if self.quant is not None else h


class _Out(torch.nn.Module):
    def __init__(self, d: Any) -> None:
        super().__init__()
        self.norm, self.act, self.conv = StatNorm(d.conv_norm_out), d.conv_act, d.conv_out

    def forward(self, x: torch.Tensor, mean: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x, mean, inv)))


@dataclass
class StageModule:
    """A stage as torch module plus what the runtime's Stage needs to know."""

    module: torch.nn.Module
    groups: int | None = None
    halo: int = 1
    scale: int = 1
    skips: tuple[int, ...] = ()
    tiled: bool = True
    eps: float = 1e-6
    down: int = 1


def _add_resnet(stages: list[StageModule], r: Any) -> None:
    """A resnet block as two stages: norm1 -> conv1, and norm2 -> conv2 + its input."""
    start = len(stages) - 1  # the block's input: the previous stage's output
    stages.append(StageModule(_ResA(r), r.norm1.num_groups, eps=r.norm1.eps))
    stages.append(StageModule(_ResB(r), r.norm2.num_groups, skips=(start,), eps=r.norm2.eps))


def _add_mid(stages: list[StageModule], mid: Any) -> None:
    _add_resnet(stages, mid.resnets[0])
    for attn, r in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            stages.append(StageModule(_Whole(attn), tiled=False))
        _add_resnet(stages, r)


def encoder_stages(vae: Any) -> list[StageModule]:
    """The stages of `vae`'s encoder, quant_conv included, in order: image -> moments."""
    e = vae.encoder
    if getattr(e, "down_blocks", None) is None or e.mid_block is None:
        raise ValueError("not an AutoencoderKL encoder")
    stages = [StageModule(_In(None, e.conv_in))]
    for block in e.down_blocks:
        for r in block.resnets:
            _add_resnet(stages, r)
        for down in block.downsamplers or []:
            # rows 2i..2i+2 of the input make output row i: a halo of 2 keeps the strips
            # on even rows
            stages.append(StageModule(_Down(down), halo=2, down=2))
    _add_mid(stages, e.mid_block)
    stages.append(StageModule(_EncOut(vae), e.conv_norm_out.num_groups,
                              eps=e.conv_norm_out.eps))
    return stages


def decoder_stages(vae: Any) -> list[StageModule]:
    """The stages of `vae`'s decoder, post_quant_conv included, in order."""
    d = vae.decoder
    if getattr(d, "up_blocks", None) is None or d.mid_block is None:
        raise ValueError("not an AutoencoderKL decoder")
    stages = [StageModule(_In(getattr(vae, "post_quant_conv", None), d.conv_in))]
    _add_mid(stages, d.mid_block)
    for block in d.up_blocks:
        for r in block.resnets:
            _add_resnet(stages, r)
        for up in block.upsamplers or []:
            stages.append(StageModule(_Up(up), scale=2))
    stages.append(StageModule(_Out(d), d.conv_norm_out.num_groups, eps=d.conv_norm_out.eps))
    return stages


def stage_io(s: StageModule) -> tuple[list[str], list[str]]:
    """Input and output names of a stage graph: the contract's, less what it does not take
    (the encoder's stages have the same contract)."""
    ins = [StageIO.X] + ([StageIO.SKIP] if s.skips else []) \
        + ([StageIO.MEAN, StageIO.INV_STD] if s.groups else [])
    return ins, VAE_DECODER_STAGE.output_names()


def export_decoder_stages(vae: Any, out_dir: Path, precision: str, opset: int,
                          prefix: str = "vae_decoder_s", encoder: bool = False
                          ) -> list[tuple[str, list[str], DecoderStage]]:
    """Export every stage of the decoder (`encoder`: of the encoder) as
    `<out_dir>/<prefix>NN.onnx` (+ data); return, per stage, its role, its files and its
    tiling metadata for the manifest."""
    import tempfile

    import onnx

    from .export_onnx import to_fp16
    from .quantize import save_graph
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"VAE decoder stages are exported as fp32 or fp16, not {precision}")
    stages = encoder_stages(vae) if encoder else decoder_stages(vae)
    example = _example_inputs(vae, stages, encoder)
    out = []
    for k, (s, args) in enumerate(zip(stages, example)):
        name = f"{prefix}{k:02d}"
        ins, outs = stage_io(s)
        every = VAE_DECODER_STAGE.dynamic_axes()
        axes = {n: every[n] for n in ins + outs}
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-") as tmp:
            raw = Path(tmp) / "stage.onnx"
            with torch.no_grad():
                torch.onnx.export(s.module, args, str(raw), input_names=ins, output_names=outs,
                                  dynamic_axes=axes, opset_version=opset, dynamo=False)
            graph = onnx.load(str(raw), load_external_data=True)
        if precision == "fp16":
            graph = to_fp16(graph)
        half = "encoder" if encoder else "decoder"
        graph.doc_string = f"edge-sdk VAE {half} stage {k} ({precision})"
        meta = DecoderStage(name, s.groups, s.halo, s.scale, tuple(s.skips), s.tiled,
                            float(s.eps), s.down)
        out.append((name, save_graph(graph, out_dir, name), meta))
    return out


def _example_inputs(vae: Any, stages: list[StageModule], encoder: bool = False
                    ) -> list[tuple[torch.Tensor, ...]]:
    """Each stage's example arguments, from running the chain on a small latent (image)."""
    z = torch.randn(1, vae.config.in_channels, 32, 48) if encoder else \
        torch.randn(1, vae.config.latent_channels, 4, 6)
    outputs: dict[int, torch.Tensor] = {-1: z}
    current, args_list = z, []
    with torch.no_grad():
        for k, s in enumerate(stages):
            args: tuple[torch.Tensor, ...] = (current,) + tuple(outputs[j] for j in s.skips)
            if s.groups:
                g = current.reshape(current.shape[0], s.groups, -1).double()
                args += (g.mean(2).float(), (1 / torch.sqrt(g.var(2, unbiased=False) + s.eps))
                         .float())
            args_list.append(args)
            current = s.module(*args)
            outputs[k] = current
    return args_list
