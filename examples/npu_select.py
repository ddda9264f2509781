"""Run on an NPU or other accelerator when the board has one, on the CPU otherwise.

    python examples/npu_select.py "a red circle on a blue background" -o out.png
    python examples/npu_select.py "..." --model npu-bundle --require qnn   # the Qualcomm NPU

ONNX Runtime reaches accelerators through execution providers. Some are compiled into an
onnxruntime build (XNNPACK's ARM kernels, NNAPI, CoreML, CANN); others are plugins for a
stock onnxruntime, found only once their package is installed: `onnxruntime-qnn`
(Qualcomm's HTP NPU, the `[qnn]` extra) and `onnxruntime-ep-openvino` (Intel, `[openvino]`).
An NPU runs statically quantized graphs only: a bundle made with `edge-convert CKPT -o B
--precision w8a16 --sizes 512x512` (or w8a8) runs its UNet there and the rest on the CPU.
This example takes the first accelerator of a preference list that is there (the NPU only
for such a bundle) and falls back to the CPU; `--require NAME` insists on one and shows the
SDK's typed error, naming the fix, when it cannot be used. The chosen providers are printed.

TFLite bundles (`edge-convert --format tflite`) reach NPUs through the vendor's LiteRT
delegate instead: `--delegate /path/libvendor_delegate.so --delegate-option key=value`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import onnxruntime as ort

from edge_sdk import Pipeline
from edge_sdk.errors import BackendUnavailableError, InvalidInputError
from edge_sdk.image import save_png

# Best first. Names as edge_sdk accepts them (short aliases or full provider names).
PREFERENCE = ("qnn", "cann", "openvino", "coreml", "nnapi", "xnnpack")
FULL_NAMES = {"qnn": "QNNExecutionProvider", "cann": "CANNExecutionProvider",
              "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider",
              "nnapi": "NnapiExecutionProvider", "xnnpack": "XnnpackExecutionProvider"}


def pick_providers(available: list[str], npu_bundle: bool = True) -> list[str]:
    """The first accelerator of PREFERENCE that is available ([] means CPU only); the NPU
    only for a bundle with a statically quantized (w8a8/w8a16) UNet."""
    for name in PREFERENCE:
        if FULL_NAMES[name] in available and (npu_bundle or name != "qnn"):
            return [name]
    return []


def available_providers() -> list[str]:
    """Compiled-in providers, and the plugin ones whose package is installed."""
    from edge_sdk.backends import plugins
    return ort.get_available_providers() + [ep for ep in plugins.PLUGINS
                                            if plugins.installed(ep)]


def has_npu_unet(model: str | None) -> bool:
    from edge_sdk import Manifest
    from edge_sdk.models import default_bundle, resolve_model
    manifest = Manifest.load(resolve_model(model) if model else default_bundle())
    return manifest.components["unet"].precision in ("w8a8", "w8a16")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("-o", "--output", default="out.png")
    ap.add_argument("--model", default=None, help="bundle folder (default: the shipped model)")
    ap.add_argument("--require", default=None, help="an execution provider that must be used")
    ap.add_argument("--delegate", default=None, help="TFLite bundles: the NPU's delegate (.so)")
    ap.add_argument("--delegate-option", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    available = available_providers()
    providers = [args.require] if args.require else pick_providers(
        available, has_npu_unet(args.model))
    print(f"onnxruntime {ort.__version__} offers {available}")
    options = dict(o.split("=", 1) for o in args.delegate_option)
    try:
        if args.delegate:  # a TFLite bundle: the delegate replaces the execution providers
            providers = []
            pipe = Pipeline.load(args.model, delegate=args.delegate, delegate_options=options)
        else:
            pipe = Pipeline.load(args.model, providers=providers)
    except (BackendUnavailableError, InvalidInputError) as exc:  # typed, naming the fix
        print(f"cannot use {args.require or args.delegate!r}: {exc}", file=sys.stderr)
        return 3
    print(f"running on {providers or ['cpu']} (then CPU for any op the accelerator lacks)")
    image = pipe(args.prompt, seed=0)
    save_png(image, args.output, {"prompt": args.prompt, "providers": ",".join(providers)})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
