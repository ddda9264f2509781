"""Feature caching (DeepCache): the shallow branch's graph, the predictor that alternates
it with the whole UNet, and the pipeline option."""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import pytest

from edge_sdk import GenerationConfig, Pipeline
from edge_sdk import names as N
from edge_sdk.controlnet import zero_residuals
from edge_sdk.contracts import UnetIO
from edge_sdk.denoise import Conditioning
from edge_sdk.errors import InvalidInputError
from edge_sdk.feature_cache import cached_unet_predictor


class FakeUnet:
    """out = sample * 2 + context mean; deep features = sample + timestep + context mean
    (so each guidance half caches its own)."""

    def __init__(self, log: list) -> None:
        self.log = log

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        self.log.append(("full", feeds[UnetIO.SAMPLE].shape[0], tuple(outputs or ())))
        x, t = feeds[UnetIO.SAMPLE], feeds[UnetIO.TIMESTEP]
        ctx = feeds[UnetIO.CONTEXT].mean(axis=(1, 2))[:, None, None, None]
        return {UnetIO.OUTPUT: x * 2 + ctx,
                UnetIO.DEEP_FEATURES: x + t[:, None, None, None] + ctx}


class FakeShallow:
    """out = deep features + context mean: shows which features it was given."""

    def __init__(self, log: list) -> None:
        self.log = log

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        self.log.append(("shallow", feeds[UnetIO.SAMPLE].shape[0], ()))
        ctx = feeds[UnetIO.CONTEXT].mean(axis=(1, 2))[:, None, None, None]
        return {UnetIO.OUTPUT: feeds[UnetIO.DEEP_FEATURES] + ctx}


def _conditioning(guided: bool) -> Conditioning:
    cond = {UnetIO.CONTEXT: np.ones((1, 3, 2), np.float32)}
    return Conditioning(cond, {UnetIO.CONTEXT: np.zeros((1, 3, 2), np.float32)} if guided
                        else None)


@pytest.mark.parametrize("batched", [True, False])
def test_the_whole_unet_runs_every_interval_and_its_features_feed_the_steps_between(batched):
    log: list = []
    predict = cached_unet_predictor(FakeUnet(log), FakeShallow(log), _conditioning(True),
                                    3.0, 3, batched)
    x = np.zeros((1, 1, 2, 2), np.float32)
    outs = [predict(x + i, float(100 - i), i) for i in range(7)]
    kinds = [k for k, _, _ in log]
    per_step = 1 if batched else 2  # the guidance halves in one call or two
    want = [k for s in range(7) for k in ["full" if s % 3 == 0 else "shallow"] * per_step]
    assert kinds == want
    assert all(o == (UnetIO.OUTPUT, UnetIO.DEEP_FEATURES) for k, _, o in log if k == "full")
    # step 2 reuses step 0's features (sample 0, timestep 100), each half its own: uncond
    # 100 (+ context 0), cond 101 (+ context 1); guided: 100 + 3 * (102 - 100). Halves
    # swapping caches would give 101.
    np.testing.assert_allclose(outs[2], 106.0)
    # step 3 is whole again: 2 * 3 + guidance of the context (3 * 1)
    np.testing.assert_allclose(outs[3], 9.0)


def test_a_run_that_starts_late_caches_from_its_own_first_step():
    """img2img starts at the scheduler's begin index: that step must run whole."""
    log: list = []
    predict = cached_unet_predictor(FakeUnet(log), FakeShallow(log), _conditioning(False),
                                    0.0, 2)
    for i in range(5, 10):
        predict(np.zeros((1, 1, 2, 2), np.float32), 1.0, i)
    assert [k for k, _, _ in log] == ["full", "shallow", "full", "shallow", "full"]


# -- the graphs --------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2])
def test_the_shallow_branch_reproduces_the_unet_given_its_own_features(layers):
    """With attention in the first block (SD's layout) and at both cache depths."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from converters.feature_cache import (_cached_unet_wrap, _shallow_wrap, cache_problem,
                                          deep_channels)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=8).eval()
    assert cache_problem(dict(unet.config), layers) is None
    x, t, ctx = torch.randn(2, 4, 5, 7), torch.tensor([700.0, 20.0]), torch.randn(2, 3, 16)
    with torch.no_grad():
        out, deep = _cached_unet_wrap(layers)(unet)(x, t, ctx)
        again = _shallow_wrap(layers)(unet)(x, t, ctx, deep)
        other = _shallow_wrap(layers)(unet)(x, t, ctx, torch.zeros_like(deep))
    assert deep.shape == (2, deep_channels(dict(unet.config), layers), 5, 7)
    assert torch.equal(out, again)
    assert (out - other).abs().max() > 1e-2  # the features matter


def test_bundle_graphs_agree_and_the_pipeline_caches(models):
    bundle = models.bundle("tiny-sd1")
    pipe = Pipeline.load(bundle)
    assert N.UNET_SHALLOW in pipe.manifest.components
    unet, shallow = pipe.session(N.UNET), pipe.session(N.UNET_SHALLOW)
    rng = np.random.default_rng(0)
    feeds = {UnetIO.SAMPLE: rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
             UnetIO.TIMESTEP: np.array([900.0, 30.0], np.float32),
             UnetIO.CONTEXT: rng.standard_normal((2, 77, 32), dtype=np.float32)}
    full = unet.run(feeds, [UnetIO.OUTPUT, UnetIO.DEEP_FEATURES])
    assert list(unet.run(feeds)) == [UnetIO.OUTPUT]  # fetched only when asked for
    again = shallow.run({**feeds, UnetIO.DEEP_FEATURES: full[UnetIO.DEEP_FEATURES]})
    np.testing.assert_allclose(again[UnetIO.OUTPUT], full[UnetIO.OUTPUT], atol=1e-5)

    cfg = dict(seed=3, steps=6, guidance_scale=4.0, output_type="np", return_dict=True)
    plain = pipe("a red circle", **cfg)
    same = pipe("a red circle", cache_interval=1, **cfg)
    cached = pipe("a red circle", cache_interval=3, **cfg)
    assert np.array_equal(plain.latents, same.latents)
    assert cached.config.cache_interval == 3
    assert not np.array_equal(plain.latents, cached.latents)


def _recorded_calls(pipe: Pipeline) -> list[str]:
    """A list that records, in order, each call of the UNet and of its shallow branch."""
    calls: list[str] = []
    for role in (N.UNET, N.UNET_SHALLOW):
        def wrap(session: Any, role: str = role) -> Any:
            class Recorded:
                inputs, outputs = session.inputs, session.outputs

                def run(self, feeds: Any, outputs: Any = None) -> Any:
                    calls.append(role)
                    return session.run(feeds, outputs)
            return Recorded()
        pipe.components.wrap(role, wrap)
    return calls


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_every_memory_mode_runs_the_branches_as_planned(models, memory):
    pipe = Pipeline.load(models.bundle("tiny-sd1"), memory=memory)
    log = _recorded_calls(pipe)
    pipe("a red circle", seed=0, steps=7, guidance_scale=3.0, cache_interval=3, scheduler="ddim")
    per_step = 1 if pipe.plan.batch_cfg else 2
    assert Counter(log) == {N.UNET: 3 * per_step, N.UNET_SHALLOW: 4 * per_step}


def test_inpainting_and_lcm_unets_cache_too(models):
    """Extra input channels (an inpainting UNet) and timestep_cond (LCM) reach both graphs:
    the cached run differs from the whole one and stays finite."""
    for arch, extra in (("tiny-inpaint", {"image": np.full((64, 64, 3), 200, np.uint8),
                                          "mask_image": np.full((64, 64), 255, np.uint8)}),
                        ("tiny-lcm", {})):
        pipe = Pipeline.load(models.bundle(arch))
        assert N.UNET_SHALLOW in pipe.manifest.components, arch
        runs = [pipe.generate("a red circle", GenerationConfig(seed=0, steps=4,
                                                                cache_interval=n), **extra)
                for n in (1, 2)]
        assert np.isfinite(runs[1].latents).all() and runs[1].config.cache_interval == 2
        assert not np.array_equal(runs[0].latents, runs[1].latents), arch


def test_img2img_caches_from_its_first_step(models):
    """strength 0.5 of 6 DDIM steps runs the last 3: whole, shallow, whole."""
    pipe = Pipeline.load(models.bundle("tiny-sd1"))
    calls = _recorded_calls(pipe)
    pipe("a red circle", image=np.full((64, 64, 3), 120, np.uint8), strength=0.5, steps=6,
         scheduler="ddim", guidance_scale=3.0, seed=0, cache_interval=2)
    assert calls == [N.UNET, N.UNET_SHALLOW, N.UNET]


def test_the_shipped_default_models_branch_reproduces_its_unet():
    """The default model's layout (no attention in its first and last blocks, the caption
    in the time embedding, one layer per block), fp16, through onnxruntime."""
    pipe = Pipeline.load()
    unet, shallow = pipe.session(N.UNET), pipe.session(N.UNET_SHALLOW)
    embeds = pipe.encode_prompt("a red circle on a blue background", guidance_scale=2.0)
    rng = np.random.default_rng(0)
    feeds = {UnetIO.SAMPLE: rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
             UnetIO.TIMESTEP: np.array([900.0, 300.0], np.float32),
             UnetIO.CONTEXT: np.concatenate([embeds.uncond, embeds.cond]),
             # its UNet takes the shipped ControlNet's residuals: none here (zeros)
             **zero_residuals(pipe.manifest, 2, 16, 16)}
    full = unet.run(feeds, [UnetIO.OUTPUT, UnetIO.DEEP_FEATURES])
    again = shallow.run({**feeds, UnetIO.DEEP_FEATURES: full[UnetIO.DEEP_FEATURES]})
    np.testing.assert_allclose(again[UnetIO.OUTPUT], full[UnetIO.OUTPUT], atol=2e-3)
    stale = shallow.run({**feeds, UnetIO.DEEP_FEATURES: full[UnetIO.DEEP_FEATURES][::-1]})
    assert np.abs(stale[UnetIO.OUTPUT] - full[UnetIO.OUTPUT]).max() > 0.05


def test_no_feature_cache_leaves_the_unet_graph_as_it_was(models):
    pipe = Pipeline.load(models.bundle("tiny-sd1", feature_cache=False))
    assert N.UNET_SHALLOW not in pipe.manifest.components
    assert [o.name for o in pipe.manifest.components[N.UNET].outputs] == [UnetIO.OUTPUT]
    with pytest.raises(InvalidInputError, match="no shallow UNet branch"):
        pipe("a red circle", steps=2, cache_interval=2)
