"""`edge-sdk evaluate`: the shapes model's held-out prompts, or its editing protocols, scored
by the evaluator (the command-line side; the protocols are edge_sdk.shapes)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from .cli_common import MODEL_HELP, add_backend_args, add_memory_arg, backend_kwargs
from .config import add_arguments, config_from_arguments
from .errors import InvalidInputError
from .progress import ProgressBar


def evaluate_parser(e: argparse.ArgumentParser) -> None:
    e.add_argument("--model", "-m", help=MODEL_HELP)
    add_arguments(e, only=("steps", "guidance_scale", "scheduler", "strength", "paste_back",
                           "decoder", "cache_interval", "controlnet_conditioning_scale",
                           "guess_mode"))
    e.add_argument("--task", default="generate",
                   choices=("generate", "recolour", "inpaint", "control"),
                   help="generate: text-to-image on the held-out prompts (default); "
                   "recolour: img2img, a rendered scene asked in another colour; inpaint: "
                   "a scene with one object left out, repainted in a mask; control: a "
                   "scene's Canny edges through the bundle's ControlNet, the prompt naming "
                   "only a colour and a background (README: editing and ControlNet "
                   "protocols; 64 cases unless --prompts)")
    e.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    e.add_argument("--prompts", type=int, default=None, metavar="N",
                   help="size of the prompt set (default 80, the standard set, which stays "
                        "the first 80 of a larger one; tune on e.g. --validation --prompts "
                        "320); with --task recolour or inpaint the number of cases (default "
                        "64)")
    e.add_argument("--validation", action="store_true",
                   help="use the validation prompt set (for tuning), not the held-out one")
    e.add_argument("--sheet", default=None,
                   help="also write a contact sheet of the results to this PNG path")
    e.add_argument("--json", default=None, help="also write the report as JSON here")
    add_memory_arg(e)
    add_backend_args(e)
    e.add_argument("--debug", action="store_true")


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .pipeline import Pipeline
    from .shapes import benchmark, require_shapes_model

    if (a.prompts is not None and a.prompts < 1) or (a.limit is not None and a.limit < 1):
        raise InvalidInputError(f"--prompts {a.prompts} / --limit {a.limit}: both must be at "
                                "least 1")
    from .image import check_output_path
    if a.sheet is not None:  # checked before the run, not after it
        check_output_path(a.sheet, {".png": "PNG"})
    if a.json is not None:
        check_output_path(a.json, {".json": "JSON"})
    pipe = Pipeline.load(a.model, memory=a.memory, **backend_kwargs(a))
    require_shapes_model(pipe.manifest, "edge-sdk evaluate")
    if a.task == "control":
        return _evaluate_control(a, pipe)
    if a.task != "generate":
        return _evaluate_editing(a, pipe)
    if a.strength is not None or a.paste_back is not None:
        raise InvalidInputError("--strength and --paste-back are for --task recolour or "
                                "inpaint")

    def generate(prompt: str, seed: int) -> Any:
        return pipe.generate(prompt, config_from_arguments(a, seed=seed)).images[0]

    bar = ProgressBar("evaluating", unit="prompt")
    report, images = benchmark.run(generate, a.limit, progress=lambda k, n: bar(k, n),
                                   validation=a.validation, prompts=a.prompts or 80)
    print(report.table())
    if a.sheet:
        print(f"contact sheet: {benchmark.contact_sheet(images, report, a.sheet)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": report.summary(), "rows": report.rows},
                                           indent=1))
    return 0


def _report(a: argparse.Namespace, report: Any) -> None:
    """An editing or ControlNet report: printed, and written to --json."""
    print(json.dumps(report.summary(), indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": report.summary(), "rows": report.rows},
                                           indent=1))


def _evaluate_control(a: argparse.Namespace, pipe: Any) -> int:
    """`edge-sdk evaluate --task control`: the ControlNet protocol (its first ControlNet)."""
    from .shapes import controlled, editing

    if a.strength is not None or a.paste_back is not None:
        raise InvalidInputError("--strength and --paste-back are for --task recolour or "
                                "inpaint")
    n = min(a.prompts or controlled.DEFAULT_CASES, a.limit or 10**9)
    config = config_from_arguments(a)
    others = [None] * (len(pipe.manifest.controlnets) - 1)

    def generate(case: Any) -> Any:
        return pipe.generate(case.prompt, replace(config, seed=case.seed),
                             control_image=[case.control, *others]).images[0]

    bar = ProgressBar("evaluating", unit="case")
    report, images = controlled.run(generate, n, a.validation, lambda k, m: bar(k, m))
    _report(a, report)
    if a.sheet:
        todo = controlled.cases(n, a.validation)
        sheet = [editing.EditCase("control", c.control, c.prompt, c.seed, c.target,
                                  c.control[..., 0] > 0) for c in todo]
        rows = [{**r, "ok": r["follows"] and r["colour"]} for r in report.rows]
        editing.contact_sheet(sheet, images, editing.EditReport("control", 0.0, rows),
                              a.sheet)
        print(f"contact sheet: {a.sheet}")
    return 0


def _evaluate_editing(a: argparse.Namespace, pipe: Any) -> int:
    """`edge-sdk evaluate --task recolour|inpaint`: the editing protocols."""
    from .shapes import editing

    if a.task == "recolour" and a.paste_back is not None:
        raise InvalidInputError("--paste-back is for --task inpaint (recolour has no mask)")
    n = min(a.prompts or editing.DEFAULT_CASES, a.limit or 10**9)
    config = config_from_arguments(a, strength=None, paste_back=None)

    def generate(case: Any, strength: float) -> Any:
        cfg = replace(config, seed=case.seed, strength=strength,
                      paste_back=bool(a.paste_back) if case.mask is not None else None)
        return pipe.generate(case.prompt, cfg, image=case.source,
                             mask_image=case.mask).images[0]

    bar = ProgressBar("evaluating", unit="case")
    report, images = editing.run(a.task, generate, n, validation=a.validation,
                                 strength=a.strength, progress=lambda k, m: bar(k, m))
    _report(a, report)
    if a.sheet:
        cases = editing.cases(a.task, n, a.validation)
        editing.contact_sheet(cases, images, report, a.sheet)
        print(f"contact sheet: {a.sheet}")
    return 0
