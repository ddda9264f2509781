"""The memory estimate behind the refusal of generations that cannot fit."""

from __future__ import annotations


def test_memory_estimate_grows_with_size_and_guidance():
    from edge_sdk import GenerationConfig
    from edge_sdk.manifest import Manifest
    from edge_sdk.memory import estimate_peak_bytes
    from edge_sdk.models import default_bundle
    m = Manifest.load(default_bundle())
    est = lambda **kw: estimate_peak_bytes(m, GenerationConfig(seed=0, **kw).resolve(m))  # noqa
    # SD-like attention: 512x512 with guidance -> 2 x 8 heads x 4096^2 floats = 1 GiB
    assert est(width=512, height=512, guidance_scale=7.5) == 2 * 8 * 4096**2 * 4
    assert est(width=512, height=512, guidance_scale=1.0) == 8 * 4096**2 * 4
    assert est(width=1024, height=1024) > 10 * est(width=512, height=512)
