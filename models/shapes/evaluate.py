"""Score a bundle on the shapes model's fixed held-out prompt set.

    python models/shapes/evaluate.py [--model BUNDLE] [--sheet contact_sheet.png]

Same as `edge-sdk evaluate`: prints accuracy per attribute (colour, shape, count, position,
background) and for the whole prompt, separately for colour-shape pairs never seen in
training, and with `--sheet PATH` writes a contact sheet (red frame = prompt not fully met).
"""

import sys

from edge_sdk.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
