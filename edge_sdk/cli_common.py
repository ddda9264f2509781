"""Flags and helpers the `edge-sdk` subcommands share."""

from __future__ import annotations

import argparse
from typing import Any

from .errors import InvalidInputError
from .lora import parse_lora_arg

__all__ = ["MODEL_HELP", "add_memory_arg", "add_backend_args", "backend_kwargs"]

MODEL_HELP = ("a bundle folder, or a shipped model's name: shapes (the default, 20 steps) or "
              "shapes-lcm (4 steps)")


def add_memory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", default="fast", help="fast | balanced | low | a budget such "
                   "as 300MB or 1GiB (see the README's memory section)")


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "tflite"],
                   help="auto: each component's own format (default)")
    p.add_argument("--providers", default=None, help="comma-separated ONNX Runtime "
                   "execution providers, e.g. xnnpack,cpu; qnn (Qualcomm's NPU: a w8a8/w8a16 "
                   "UNet on it, the rest on the CPU) and openvino are plugins (their extras)")
    p.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for a plugin provider, e.g. soc_model=60 (repeatable)")
    p.add_argument("--delegate", default=None, metavar="PATH.so",
                   help="a TFLite external delegate library (e.g. a vendor NPU's)")
    p.add_argument("--delegate-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for --delegate (repeatable)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (.safetensors) applied to an fp32/fp16 ONNX bundle at load "
                   "time, at SCALE (default 1); repeatable")


def backend_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """Pipeline.load's backend arguments from add_backend_args's flags."""
    return {"threads": a.threads, "backend": a.backend,
            "providers": [p for p in a.providers.split(",") if p] if a.providers else None,
            "delegate": a.delegate,
            "delegate_options": pairs(a.delegate_option, "--delegate-option") or None,
            "provider_options": pairs(a.provider_option, "--provider-option") or None,
            "loras": dict(parse_lora_arg(x) for x in a.lora) or None}


def pairs(items: list[str], flag: str) -> dict[str, str]:
    """{KEY: VALUE} from repeated KEY=VALUE flags (a typed error for anything else)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"{flag} {item!r} is not KEY=VALUE")
        out[key] = value
    return out
