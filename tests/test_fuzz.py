"""Fuzzing (hypothesis) of what comes from outside: manifests and generation arguments. The
only acceptable outcomes are a valid result or a typed edge_sdk error — never a KeyError,
TypeError or a crash from deeper down."""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk import GenerationConfig, Manifest
from edge_sdk.errors import EdgeSDKError, InvalidInputError, ManifestError
from edge_sdk.models import default_bundle

VALID = json.loads((default_bundle() / "manifest.json").read_text())
MANIFEST = Manifest.from_dict(VALID)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


PATHS = _paths(VALID)[1:]


@st.composite
def mutated_manifests(draw: st.DrawFn) -> Any:
    """The shipped manifest with 1-3 places replaced by arbitrary JSON values or deleted."""
    m = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        node = m
        try:
            for key in path[:-1]:
                node = node[key]
            if draw(st.booleans()) and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced this path's parent
    return m


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_manifests())
def test_mutated_manifests_load_or_raise_manifest_error(data):
    try:
        m = Manifest.from_dict(data)
    except ManifestError:
        return
    # accepted: then it must be self-consistent enough to round-trip
    assert Manifest.from_dict(json.loads(m.to_json())) == m


@pytest.mark.parametrize("section,key,value,message", [
    # the fuzzer's find: a NaN size multiple loaded, then failed mid-generation on int(nan)
    ("unet", "size_multiple", float("nan"), "unet.size_multiple' is NaN"),
    ("unet", "size_multiple", 0, "unet.size_multiple' must be > 0"),
    ("unet", "size_multiple", "8", "unet.size_multiple' has the wrong type"),
    (None, "static_sizes", [[128]], "static_sizes' must be a list of"),
    ("scheduler", "beta_end", float("nan"), "scheduler.beta_end' is NaN"),
    ("vae", "shift_factor", float("nan"), "vae.shift_factor' is NaN"),
])
def test_values_the_runtime_would_choke_on_are_refused_at_load(section, key, value, message):
    data = copy.deepcopy(VALID)
    (data[section] if section else data)[key] = value
    with pytest.raises(ManifestError, match=re.escape(message)):
        Manifest.from_dict(data)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_arbitrary_json_is_refused_with_manifest_error(data):
    try:
        Manifest.from_dict(data)
    except ManifestError:
        return
    raise AssertionError(f"accepted {data!r} as a manifest")


anything = (st.none() | st.booleans() | st.integers(-2**64, 2**64)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))


@settings(max_examples=500, deadline=None)
@given(steps=anything, guidance=anything, seed=anything, width=anything, height=anything,
       scheduler=anything, num_images=anything, negative=anything)
def test_generation_arguments_resolve_or_raise_invalid_input(steps, guidance, seed, width,
                                                             height, scheduler, num_images,
                                                             negative):
    cfg = GenerationConfig(negative_prompt=negative, steps=steps, guidance_scale=guidance,
                           seed=seed, width=width, height=height, scheduler=scheduler,
                           num_images=num_images)
    try:
        r = cfg.resolve(MANIFEST)
    except InvalidInputError:
        return
    except EdgeSDKError as exc:  # typed, but the wrong family for a bad argument
        raise AssertionError(f"{type(exc).__name__} for an argument: {exc}") from exc
    assert 1 <= r.steps <= 1000 and math.isfinite(r.guidance_scale)
    assert r.width % 8 == 0 and r.height % 8 == 0 and r.width > 0 and r.height > 0
    assert isinstance(r.seed, int) and r.seed >= 0 and r.num_images >= 1


SCHEDULER_KEYS = sorted(VALID["scheduler"]) + ["steps_offset", "clip_sample", "trained_betas",
                                               "solver_order", "set_alpha_to_one"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(SCHEDULER_KEYS), anything | json_values, min_size=1,
                       max_size=3),
       st.sampled_from(["ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "lcm", None]))
def test_a_scheduler_section_that_loads_makes_a_working_scheduler(changes, name):
    """Edited scheduler configs: refused at load with a ManifestError, or every scheduler
    built from them runs (or refuses the combination, or the step count, with a typed
    InvalidInputError) — never an IndexError, a TypeError or a huge allocation
    mid-generation."""
    from edge_sdk.schedulers import create_scheduler
    data = copy.deepcopy(VALID)
    data["scheduler"].update(changes)
    try:
        m = Manifest.from_dict(data)
    except ManifestError:
        return
    try:
        sched = create_scheduler(name, {**m.scheduler, "prediction_type": m.prediction_type}, 3)
    except InvalidInputError:
        return
    x = np.ones((1, 4, 2, 2), np.float32)
    for i in range(len(sched.timesteps)):
        x = sched.step(i, sched.scale_model_input(x, i), np.zeros_like(x),
                       noise=np.zeros_like(x))
