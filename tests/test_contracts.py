"""The seams: one I/O contract per component kind used by exporters and runtime alike, the
manifest's format 2 and the migration of format 1, the weight map, the denoiser's predictor,
and the generation parameters declared once."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_sdk import GenerationConfig, Manifest, Pipeline
from edge_sdk.contracts import CONTRACTS, contract_of
from edge_sdk.errors import InvalidInputError
from edge_sdk.models import default_bundle

from .conftest import needs_convert

# the shipped bundle's manifest as it was in format 1 (same graphs)
V1_MANIFEST = Path(__file__).with_name("data") / "shapes_manifest_v1.json"


@needs_convert
@pytest.mark.parametrize("arch,options", [("tiny-sd1", {}), ("tiny-sd2", {"vae_stages": True})])
def test_every_exported_graph_has_its_contracts_names(models, arch, options):
    """What the exporter wrote (recorded in the manifest from the graph itself) is what the
    contract of the component's kind says, so the runtime's feeds always fit."""
    m = Manifest.load(models.bundle(arch, **options))
    assert {c.kind for c in m.components.values()} >= {"text_encoder", "unet", "unet_shallow",
                                                        "vae_decoder"}
    for comp in m.components.values():
        contract = contract_of(comp.kind)
        got_in = [t.name for t in comp.inputs]
        assert set(contract.input_names()) <= set(got_in) <= set(contract.input_names(True))
        got_out = [t.name for t in comp.outputs]
        assert got_out[:len(contract.output_names())] == contract.output_names()
        assert set(got_out) <= set(contract.output_names(True))
        for t in comp.inputs + comp.outputs:  # dynamic axes named as the contract names them
            for axis, name in contract.tensor(t.name).dynamic_axes.items():
                assert t.shape[axis] == name, (comp.name, t.name, t.shape)


@needs_convert
def test_the_weight_map_finds_each_parameter_in_the_graph(models):
    """Including the Linear weights stored transposed for the export (`<name>.weight_t`,
    where the tracer would fold them into anonymous copies): what a load-time LoRA must
    find."""
    import onnx
    import torch
    from diffusers import UNet2DConditionModel
    from onnx import numpy_helper
    bundle = models.bundle("tiny-sd1")
    m = Manifest.load(bundle)
    spec = m.components["unet"]
    wmap = json.loads((bundle / spec.weight_map).read_text())
    graph = onnx.load(str(bundle / spec.path), load_external_data=True)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    unet = UNet2DConditionModel.from_pretrained(models.checkpoint("tiny-sd1") / "unet")
    linears = [n + ".weight" for n, mod in unet.named_modules()
               if isinstance(mod, torch.nn.Linear)]
    assert linears and all(n in wmap for n in linears)
    transposed = [n for n in linears if wmap[n][1]]
    assert transposed and all(wmap[n][0] == f"m.{n}_t" for n in transposed)
    for name, (init, transposed) in wmap.items():
        w = dict(unet.named_parameters())[name].detach().numpy()
        assert np.array_equal(inits[init], w.T if transposed else w), name
    assert m.components["unet"].weight_map in {f.path for f in spec.files}  # hashed too


@needs_convert
def test_a_format_1_bundle_is_migrated_with_one_warning_and_gives_the_same_pixels(
        tmp_path, caplog):
    """The fixture is the shipped model's format-1 manifest (text encoder, UNet, decoder and
    its stages). The default bundle's UNet now takes ControlNet residuals, which format 1
    cannot describe, so the files are those of the same model converted without its
    ControlNet, the fixture's sizes and checksums set to theirs."""
    from converters.convert import convert
    plain = tmp_path / "v2"
    convert(Path(__file__).resolve().parents[1] / "models" / "shapes" / "checkpoint", plain,
            precision="fp16", default_steps=20, default_guidance=2, vae_encoder=False,
            feature_cache=False, name="shapes")
    old = tmp_path / "v1"
    shutil.copytree(plain, old)
    fixture = json.loads(V1_MANIFEST.read_text())
    entries = {f.path: f for c in Manifest.load(plain).components.values() for f in c.files}
    for comp in fixture["components"].values():
        for f in comp["files"]:
            f["size"], f["sha256"] = entries[f["path"]].size, entries[f["path"]].sha256
    (old / "manifest.json").write_text(json.dumps(fixture))
    with caplog.at_level(logging.WARNING, logger="edge_sdk"):
        v1 = Pipeline.load(old)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "edge-convert" in warnings[0].getMessage()
    assert "--overwrite" in warnings[0].getMessage()
    v2 = Pipeline.load(plain)
    assert v1.manifest.vae.decoder_stages == v2.manifest.vae.decoder_stages
    assert v1.manifest.unet.size_multiple == 32  # as format 1 recorded it (the UNet's levels)
    assert v1.manifest.tokenizer.sha256 is None and v2.manifest.tokenizer.sha256
    for seed in (0, 1):
        assert np.array_equal(np.asarray(v1("a red circle on a blue background", seed=seed)),
                              np.asarray(v2("a red circle on a blue background", seed=seed)))


def test_a_tokenizer_swapped_into_a_bundle_fails_verification(tmp_path):
    from edge_sdk.errors import IntegrityError
    bundle = tmp_path / "b"
    shutil.copytree(default_bundle(), bundle)
    tok = json.loads((bundle / "tokenizer.json").read_text())
    tok["added_tokens"] = tok["added_tokens"][:1]
    (bundle / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(IntegrityError, match="tokenizer.json"):
        Pipeline.load(bundle)


def test_the_manifest_round_trips_and_has_no_untyped_settings():
    m = Manifest.load(default_bundle())
    assert Manifest.from_dict(m.to_dict()) == m
    assert not m.extra  # what the runtime reads is typed
    assert m.format_version == 2 and set(m.tokenizers) == {"tokenizer"}


# -- parameters declared once ---------------------------------------------------------
def test_call_and_cli_take_exactly_the_declared_generation_parameters():
    from edge_sdk.cli import _parser
    declared = {f.name for f in dataclasses.fields(GenerationConfig)}
    params = inspect.signature(Pipeline.__call__).parameters
    named = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
    assert named - {"self", "prompt", "image", "mask_image", "control_image", "latents",
                    "callback",
                    "output_type", "return_dict", "callback_on_step_end",
                    "callback_on_step_end_tensor_inputs", "preview",
                    "preview_every"} == declared
    gen = next(a for a in _parser()._subparsers._group_actions[0].choices.items()
               if a[0] == "generate")[1]
    assert declared <= {a.dest for a in gen._actions}


def test_diffusers_names_are_accepted_and_unknown_names_refused():
    pipe = Pipeline.load()
    a = np.asarray(pipe("a red circle on a blue background", seed=2, steps=3))
    b = np.asarray(pipe("a red circle on a blue background", seed=2, num_inference_steps=3))
    assert np.array_equal(a, b)
    with pytest.raises(InvalidInputError, match="unknown generation parameter 'stepz'"):
        pipe("x", stepz=3)
    with pytest.raises(InvalidInputError, match="repeats"):
        GenerationConfig.from_kwargs({"steps": 2, "num_inference_steps": 3})


# -- the denoiser seam ----------------------------------------------------------------
def test_the_loop_calls_the_predictor_per_step_from_the_begin_index():
    from edge_sdk.denoise import run_denoising
    from edge_sdk.schedulers import create_scheduler
    sched = create_scheduler("ddim", {"_class_name": "DDIMScheduler"}, 10)
    sched.set_begin_index(4)
    calls = []

    def predict(x, t, step):
        calls.append((step, t))
        return np.zeros_like(x)
    run_denoising(predict, sched, np.ones((1, 4, 2, 2), np.float32))
    assert [c[0] for c in calls] == list(range(4, 10))
    assert [c[1] for c in calls] == [float(t) for t in sched.timesteps[4:]]


def test_guidance_batched_and_as_two_passes_agree_and_guidance_is_applied():
    from edge_sdk.denoise import Conditioning, classifier_free_guidance
    cond = Conditioning({"c": np.full((2, 3), 2.0, np.float32)},
                        {"c": np.zeros((2, 3), np.float32)})
    x = np.ones((2, 4), np.float32)

    def run(sample, feeds):  # a fake model: output = sample * mean(context)
        return sample * feeds["c"].mean(axis=1, keepdims=True)
    batched = classifier_free_guidance(run, x, cond, 3.0, batched=True)
    two = classifier_free_guidance(run, x, cond, 3.0, batched=False)
    assert np.array_equal(batched, two) and np.allclose(batched, 6.0)  # 0 + 3 * (2 - 0)
    assert np.allclose(classifier_free_guidance(run, x, Conditioning(cond.cond), 3.0), 2.0)


def test_contract_kinds_are_what_manifests_may_name():
    assert set(CONTRACTS) == {"text_encoder", "unet", "unet_shallow", "vae_decoder",
                              "vae_encoder", "vae_decoder_stage", "vae_encoder_stage",
                              "controlnet"}


def test_controlnet_residuals_pair_a_controlnet_with_its_unet():
    """A ControlNet's outputs and the UNet's residual inputs are the same list, in order:
    the contracts name as many as any SD UNet's down path has skips (SD 12, SDXL 9)."""
    from edge_sdk.contracts import CONTROLNET, UNET, ControlNetIO, UnetIO
    outs = CONTROLNET.output_names(optional=True)
    ins = [n for n in UNET.input_names(optional=True) if "residual" in n]
    assert len(outs) == len(ins) >= 13
    assert outs[-1] == ControlNetIO.MID and ins[-1] == UnetIO.MID_RESIDUAL
    assert [o.replace("res_sample", "additional_residual") for o in outs[:-1]] == ins[:-1]
    assert CONTROLNET.input_names() == ["sample", "timestep", "encoder_hidden_states",
                                        "controlnet_cond"]
