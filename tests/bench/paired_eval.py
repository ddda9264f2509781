"""Paired quality difference of bundles from their `edge-sdk evaluate --json` reports.

    edge-sdk evaluate --model REF --validation --prompts 320 --json ref.json
    edge-sdk evaluate --model B --validation --prompts 320 --json b.json
    python -m tests.bench.paired_eval ref.json b.json [c.json ...]

The evaluator draws each prompt with the same seed for every bundle, so each row of one
report pairs with the same row of the other: the difference in whole-prompt accuracy is
measured per prompt, with its standard error (not two independent accuracies compared).
"""

from __future__ import annotations

import argparse
import json
import sys

from .decoder_quality import paired_se


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)["rows"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("others", nargs="+")
    args = ap.parse_args()
    ref = _rows(args.reference)
    key = [(r["prompt"], r["seed"]) for r in ref]
    base = [bool(r["score"]["whole"]) for r in ref]
    print(f"{args.reference}: whole {100 * sum(base) / len(base):.1f} % "
          f"({len(base)} prompts)")
    for path in args.others:
        rows = _rows(path)
        if [(r["prompt"], r["seed"]) for r in rows] != key:
            print(f"{path}: not the same prompts and seeds as {args.reference}",
                  file=sys.stderr)
            return 2
        other = [bool(r["score"]["whole"]) for r in rows]
        diff, se = paired_se(base, other)
        print(f"{path}: whole {100 * sum(other) / len(other):.1f} %, paired difference "
              f"{diff:+.1f} ± {se:.1f} points (other minus reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
