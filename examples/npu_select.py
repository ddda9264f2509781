"""Run on an NPU or other accelerator when the board has one, on the CPU otherwise.

    python examples/npu_select.py "a red circle on a blue background" -o out.png
    python examples/npu_select.py "..." --require qnn      # fail unless the Qualcomm NPU is there

ONNX Runtime reaches accelerators through execution providers, each shipped in its own
onnxruntime build: `onnxruntime-qnn` (Qualcomm Hexagon NPU), `onnxruntime-openvino` (Intel
NPU/GPU), `onnxruntime-cann` (Huawei Ascend), NNAPI (Android), CoreML (Apple), and XNNPACK
(optimised ARM CPU kernels, in the default build on some platforms). This example takes the
first one of a preference list that the installed onnxruntime offers and falls back to the
CPU; `--require NAME` instead insists on one, and shows the SDK's typed error (naming the
package to install) when it is missing. The chosen providers are printed.

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


def pick_providers(available: list[str]) -> list[str]:
    """The first accelerator of PREFERENCE that onnxruntime offers; [] means CPU only."""
    for name in PREFERENCE:
        if FULL_NAMES[name] in available:
            return [name]
    return []


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

    available = ort.get_available_providers()
    providers = [args.require] if args.require else pick_providers(available)
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
