"""The table of bad inputs: each row is one thing a user can get wrong — a file, a manifest, a
parameter, a prompt, a conversion — and the typed edge_sdk error it must get, with the words
its message must contain. Every row is a test; tests/BAD_INPUTS.md is this table in prose
(`python -m tests.test_bad_inputs` writes it; a test checks it is current).

Rows whose error is None must *work* (handled, not refused), and their check says how.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from edge_sdk import (BackendUnavailableError, BundleError, InferenceError, IntegrityError,
                      InvalidInputError, ManifestError, Pipeline, SchedulerError)
from edge_sdk.errors import (CallbackError, ConversionError, LoraError,
                             SafetensorsError)
from edge_sdk.preview import Preview

from .conftest import needs_convert

pytestmark = needs_convert


class Ctx:
    """What a row acts on: the tiny SD1-style bundle (a fresh copy per row), its loaded
    pipeline, its checkpoint, a scratch folder."""

    def __init__(self, models: Any, pipe: Pipeline, tmp: Path) -> None:
        self.models, self.pipe, self.tmp = models, pipe, tmp
        self._bundle: Path | None = None

    @property
    def bundle(self) -> Path:
        if self._bundle is None:
            self._bundle = self.tmp / "bundle"
            shutil.copytree(self.models.bundle("tiny-sd1"), self._bundle)
        return self._bundle

    @property
    def ckpt(self) -> Path:
        return self.models.checkpoint("tiny-sd1")

    def manifest(self, edit: Callable[[dict], None]) -> Path:
        path = self.bundle / "manifest.json"
        m = json.loads(path.read_text())
        edit(m)
        path.write_text(json.dumps(m))
        return self.bundle

    def damage(self, name: str, how: Callable[[bytes], bytes]) -> Path:
        path = self.bundle / name
        path.write_bytes(how(path.read_bytes()))
        return self.bundle

    def gen(self, prompt: Any = "a red circle", **kw: Any) -> Any:
        return self.pipe(prompt, **{"steps": 2, "seed": 0, **kw})

    def cli(self, *args: Any) -> Any:
        from edge_sdk.cli import main
        return main([*map(str, args), "--debug"])  # --debug: the error raised, not printed

    def convert(self, *args: Any) -> Any:
        from converters.cli import main
        return main([*map(str, args), "--debug"])  # --debug: the error raised, not printed


@dataclass(frozen=True)
class Row:
    kind: str        # file | manifest | parameter | prompt | conversion
    what: str        # the bad input, in words
    act: Callable[[Ctx], Any]
    error: type | None
    match: str       # regex the message must match (or, for error None, a description)


def _flip(data: bytes) -> bytes:
    raw = bytearray(data)
    raw[len(raw) // 2] ^= 0xFF
    return bytes(raw)


def _del(path: list[str]) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        node = m
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


def _set(path: list[Any], value: Any) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _load(ctx: Ctx, bundle: Path, **kw: Any) -> Pipeline:
    return Pipeline.load(bundle, **kw)


def _symlinked_weights(ctx: Ctx) -> Path:
    data = ctx.bundle / "unet.onnx.data"
    real = ctx.tmp / "elsewhere.data"
    shutil.move(data, real)
    os.symlink(real, data)
    return ctx.bundle


def _pickle_checkpoint(ctx: Ctx) -> Path:
    ck = ctx.tmp / "pickled"
    shutil.copytree(ctx.ckpt, ck)
    st = next((ck / "unet").glob("*.safetensors"))
    st.rename(st.with_name("diffusion_pytorch_model.bin"))
    return ck


def _edited(ctx: Ctx, edits: dict[str, dict[str, Any]], **files: str) -> Path:
    """A copy of the checkpoint with config fields changed (component -> {key: value}) and
    extra files (relative path -> text): the converter must refuse it before loading
    weights, so the weights need not match."""
    ck = ctx.tmp / "edited"
    shutil.copytree(ctx.ckpt, ck)
    for comp, changes in edits.items():
        name = "model_index.json" if comp == "." else f"{comp}/config.json"
        cfg = json.loads((ck / name).read_text())
        cfg.update(changes)
        (ck / name).write_text(json.dumps(cfg))
    for rel, text in files.items():
        (ck / rel).parent.mkdir(parents=True, exist_ok=True)
        (ck / rel).write_text(text)
    return ck


# -- img2img and inpainting inputs ------------------------------------------------------
def _rgb(w: int = 64, h: int = 64) -> np.ndarray:
    return (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)


def _box_mask(w: int = 64, h: int = 64) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[16:40, 20:48] = 255
    return m


def _saved(c: Ctx, name: str, image: Any) -> Path:
    from PIL import Image
    path = c.tmp / name
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
    return path


def _pil(mode: str) -> Callable[[Ctx], Any]:
    from PIL import Image
    return lambda c: c.gen(image=Image.fromarray(_rgb()).convert(mode))


def _converted_file(mode: str) -> Callable[[Ctx], bool]:
    """A file in another 8-bit mode is read as load_image reads it (made RGB)."""
    from PIL import Image

    def act(c: Ctx) -> bool:
        path = _saved(c, f"in-{mode}.png", Image.fromarray(_rgb()).convert(mode))
        return c.gen(image=path, strength=0.5).size == (64, 64)
    return act


def _sixteen_bit(c: Ctx) -> bool:
    """A 16-bit grayscale file is scaled to 8 bits (PIL's own conversion would clip it)."""
    from PIL import Image

    from edge_sdk.image_input import read_image
    path = c.tmp / "deep.png"
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    got = np.asarray(read_image(path).image)[..., 0].astype(int)
    return bool(np.abs(got - np.round(ramp / 257)).max() == 0) and \
        c.gen(image=path, strength=0.5).size == (64, 64)


def _inpaint_bundle(c: Ctx) -> Pipeline:
    return Pipeline.load(c.models.bundle("tiny-inpaint"))


def _no_encoder(c: Ctx) -> Any:
    bundle = c.manifest(lambda m: m["components"].pop("vae_encoder"))
    return Pipeline.load(bundle)("x", image=_rgb(), steps=2)


def _blended(c: Ctx) -> bool:
    """A mask on an ordinary UNet: after the last step the latents outside the mask are the
    image's own (diffusers' blend), inside they are generated."""
    from edge_sdk.edit import mask_latents
    from edge_sdk.image_input import mask_array
    from edge_sdk.vae import scale_latents
    from PIL import Image
    out = c.gen(image=_rgb(), mask_image=_box_mask(), encode_mode="mean",
                output_type="latent")
    mean, _ = c.pipe.encode_image(_rgb()[None].astype(np.float32) / 255)
    known = scale_latents(mean, c.pipe.manifest.vae)
    outside = mask_latents(mask_array(Image.fromarray(_box_mask())), 8)[0, 0] == 0
    return bool(np.abs(out[:, outside] - known[0][:, outside]).max() < 1e-5
                and np.abs(out[:, ~outside] - known[0][:, ~outside]).max() > 0.1)


def _tiny_folder(c: Ctx, config: Any, weights: bool = True) -> Path:
    """A --tiny-vae folder with this config.json (and an empty weights file)."""
    folder = c.tmp / "taesd"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(config if isinstance(config, str)
                                        else json.dumps(config))
    if weights:
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return folder


def _write(c: Ctx, name: str, data: bytes) -> Path:
    (c.tmp / name).write_bytes(data)
    return c.tmp / name


def _bf16_file(c: Ctx) -> Path:
    """A safetensors file whose one weight is bfloat16 (written by hand: numpy has no bf16)."""
    header = json.dumps({"0.weight": {"dtype": "BF16", "shape": [3, 4, 1, 1],
                                      "data_offsets": [0, 24]}}).encode()
    path = c.tmp / "bf16.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(24))
    return path


def _preview_file(c: Ctx, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A --preview-decoder file holding zero tensors of these names and shapes."""
    from safetensors.numpy import save_file
    save_file({k: np.zeros(v, np.float32) for k, v in shapes.items()}, str(c.tmp / "pd.st"))
    return c.tmp / "pd.st"


def _convert_edited(edits: dict[str, dict[str, Any]], **files: str) -> Callable[[Ctx], Any]:
    return lambda c: c.convert(_edited(c, edits, **files), "-o", c.tmp / "out")


def _drop_output(role: str, name: str) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        outs = m["components"][role]["outputs"]
        outs[:] = [t for t in outs if t["name"] != name]
    return edit


def _xl_manifest(ctx: Ctx, edit: Callable[[dict], None]) -> Path:
    """A copy of the tiny SDXL bundle with its manifest edited."""
    bundle = ctx.tmp / "sdxl"
    shutil.copytree(ctx.models.bundle("tiny-sdxl"), bundle)
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return bundle


def _xl_edited(ctx: Ctx, edits: dict[str, dict[str, Any]], drop: str | None = None) -> Path:
    """A copy of the tiny SDXL checkpoint with config fields changed (component -> {key:
    value}; "." the model index) and a component folder removed."""
    ck = ctx.tmp / "sdxl-edited"
    shutil.copytree(ctx.models.checkpoint("tiny-sdxl"), ck)
    for comp, changes in edits.items():
        path = ck / ("model_index.json" if comp == "." else f"{comp}/config.json")
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    if drop:
        shutil.rmtree(ck / drop)
    return ck


def _xl_refiner(ctx: Ctx) -> Any:
    ck = _xl_edited(ctx, {"unet": {"projection_class_embeddings_input_dim": 72}})
    return ctx.convert(ck, "-o", ctx.tmp / "out")


def _longer_tokenizer(ctx: Ctx) -> Any:
    ck = _edited(ctx, {})
    path = ck / "tokenizer" / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_max_length": 100}))
    return ctx.convert(ck, "-o", ctx.tmp / "out")


def _warned(logger: str, words: str, act: Callable[[Ctx], Any]) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        with _capture(logger) as records:
            act(ctx)
        assert any(words in r.getMessage() for r in records), [r.getMessage() for r in records]
    return check


def _one_per_prompt(ctx: Ctx) -> None:
    images = ctx.gen(["a red circle", "a blue square"])
    assert isinstance(images, list) and len(images) == 2


def _same_as_python_ints(ctx: Ctx) -> None:
    a = np.asarray(ctx.gen(steps=np.int64(2), seed=np.int64(3), guidance_scale=np.float32(3)))
    assert np.array_equal(a, np.asarray(ctx.gen(steps=2, seed=3, guidance_scale=3.0)))


def _long_prompt(ctx: Ctx) -> None:
    with _capture("edge_sdk.tokenizer") as records:
        image = ctx.gen("a red circle on a blue background " * 20)
    assert image.size == (64, 64)
    assert any("truncated" in r.getMessage() and "77 tokens" in r.getMessage() for r in records)


def _unbalanced(ctx: Ctx) -> None:
    """A1111 closes an unclosed bracket at the end of the prompt; a stray closer is text."""
    with _capture("edge_sdk") as records:
        a = np.asarray(ctx.gen("a (red circle"))
    assert not [r for r in records if r.levelno >= logging.WARNING]
    assert np.array_equal(a, np.asarray(ctx.gen("a (red circle)")))
    assert not np.array_equal(a, np.asarray(ctx.gen("a red circle")))
    assert np.asarray(ctx.gen("a red) circle]")).shape == (64, 64, 3)


class _capture:
    def __init__(self, logger: str) -> None:
        self.logger, self.records = logging.getLogger(logger), []

    def __enter__(self) -> list:
        self.handler = logging.Handler()
        self.handler.emit = self.records.append  # type: ignore[method-assign]
        self.logger.addHandler(self.handler)
        return self.records

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)


def _nan_from_model(ctx: Ctx) -> None:
    unet = ctx.pipe.session("unet")
    original = unet.run
    unet.run = lambda feeds: {"out_sample": np.full_like(feeds["sample"], np.nan)}
    try:
        ctx.gen()
    finally:
        unet.run = original


def _with_memory(available: int, fn: Callable[[], Any]) -> Any:
    from unittest import mock
    with mock.patch("edge_sdk.estimate.available_bytes", return_value=available):
        return fn()


def _with_env(name: str, value: str, fn: Callable[[], Any]) -> Any:
    from unittest import mock
    with mock.patch.dict(os.environ, {name: value}):
        return fn()


def _drop_layer_states(m: dict) -> None:
    """The manifest of a bundle whose text encoder has no layer states (the graph's extra
    output is then simply not asked for)."""
    te = m["components"]["text_encoder"]
    te["outputs"] = [t for t in te["outputs"] if t["name"] != "layer_states"]


def _convert_lora(ctx: Ctx, write: Callable[[Ctx, Path], Any]) -> Any:
    path = ctx.tmp / "lora.safetensors"
    write(ctx, path)
    return ctx.convert(ctx.ckpt, "-o", ctx.tmp / "out", "--lora", f"{path}:0.8")


def _load_lora(ctx: Ctx, write: Callable[[Ctx, Path], Any], scale: Any = 0.8) -> Any:
    path = ctx.tmp / "lora.safetensors"
    write(ctx, path)
    return Pipeline.load(ctx.bundle, loras={path: scale})


def _convert_embedding(ctx: Ctx, name: str, tensors: dict | None) -> Any:
    path = ctx.tmp / name
    if tensors is None:
        path.write_bytes(b"\x80\x04pickle")
    else:
        _save(path, tensors)
    return ctx.convert(ctx.ckpt, "-o", ctx.tmp / "out", "--embedding", path)


def _single(ctx: Ctx, *args: Any, shapes: dict | None = None,
            name: str = "m.safetensors") -> Any:
    """edge-convert on a single file: the tiny checkpoint written out in the original layout,
    or a sparse file with these tensor shapes."""
    from .single_files import sparse_file, write_single_file
    path = ctx.tmp / name
    if shapes is None:
        write_single_file(ctx.ckpt, path)
    else:
        sparse_file(path, shapes)
    return ctx.convert(path, "-o", ctx.tmp / "out", *args)


def _sparse(ctx: Ctx, name: str, shapes: dict) -> Path:
    from .single_files import sparse_file
    return sparse_file(ctx.tmp / name, shapes)


def _sd2_shapes(inpainting: bool = False) -> dict:
    from .single_files import layout_shapes, original_layout
    return layout_shapes(original_layout("sd2-inpainting" if inpainting else "sd2")[2])


def _save(path: Path, tensors: dict) -> None:
    from safetensors.numpy import save_file
    save_file(tensors, str(path))


def _lora_other_base(ctx: Ctx, path: Path) -> None:
    from .lora_files import modules
    module, shape = next(iter(modules(ctx.ckpt, "unet", ("attn2.to_k",)).items()))
    key = "lora_unet_" + module.replace(".", "_")
    _save(path, {key + ".lora_down.weight": np.ones((4, 1024), np.float32),
                 key + ".lora_up.weight": np.ones((shape[0], 4), np.float32)})


def _lora_unmatched(ctx: Ctx, path: Path) -> None:
    key = "lora_unet_mid_block_foo"
    _save(path, {key + ".lora_down.weight": np.ones((4, 8), np.float32),
                 key + ".lora_up.weight": np.ones((8, 4), np.float32)})


def _lora_loha(ctx: Ctx, path: Path) -> None:
    _save(path, {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a":
                 np.ones((4, 8), np.float32)})


def _works(check: Callable[[Ctx], bool]) -> Callable[[Ctx], None]:
    def act(ctx: Ctx) -> None:
        assert check(ctx)
    return act


L = _load

def _control_pipe(ctx: Ctx) -> Pipeline:
    return Pipeline.load(ctx.models.control_bundle(2))


def _control(ctx: Ctx, control: Any = "two", **kw: Any) -> Any:
    img = np.full((64, 96, 3), 30, np.uint8)
    img[20:40, 30:60] = 220
    control = [img, img] if isinstance(control, str) else control
    return _control_pipe(ctx)("a red circle", steps=2, seed=0, width=96, height=64,
                              control_image=control, **kw)


def _other_size_control(ctx: Ctx) -> None:
    """Resized to the output as diffusers does (Lanczos, aspect changed)."""
    from PIL import Image
    small = np.zeros((24, 40, 3), np.uint8)
    small[6:18, 10:30] = 255
    resized = Image.fromarray(small).resize((96, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(_control(ctx, [small, None])),
                          np.asarray(_control(ctx, [np.asarray(resized), None])))


def _foreign_controlnet(ctx: Ctx) -> Any:
    """A ControlNet whose cross-attention width is not this UNet's (an SD 2.x one, 1024,
    on an SD 1.x model, 768)."""
    folder = ctx.tmp / "cn-sd2"
    shutil.copytree(ctx.models.controlnet("tiny-sd1", 1), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["cross_attention_dim"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    return ctx.convert(ctx.ckpt, "-o", ctx.tmp / "out", "--controlnet", folder)


def _control_manifest(ctx: Ctx, edit: Callable[[dict], None]) -> Pipeline:
    bundle = ctx.tmp / "cn-bundle"
    shutil.copytree(ctx.models.control_bundle(2), bundle)
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return Pipeline.load(bundle)


ROWS: list[Row] = [
    # files
    Row("file", "bundle folder does not exist", lambda c: L(c, c.tmp / "nope"), BundleError,
        "does not exist"),
    Row("file", "a file given where the bundle folder belongs",
        lambda c: L(c, c.bundle / "manifest.json"), BundleError, "is a file, not a bundle folder"),
    Row("file", "folder without manifest.json", lambda c: L(c, c.tmp), BundleError,
        "no manifest.json"),
    Row("file", "a weights file missing",
        lambda c: (c.bundle / "unet.onnx.data").unlink() or L(c, c.bundle), BundleError,
        "unet.onnx.data.*missing"),
    Row("file", "weights truncated", lambda c: L(c, c.damage("unet.onnx.data",
                                                              lambda b: b[:1000])),
        IntegrityError, "truncated"),
    Row("file", "weights corrupted, same size",
        lambda c: L(c, c.damage("vae_decoder.onnx.data", _flip)), IntegrityError, "sha256"),
    Row("file", "graph replaced by garbage, checksums off",
        lambda c: L(c, c.damage("text_encoder.onnx", lambda b: b"\0" * len(b)), verify=False),
        BundleError, "not a valid ONNX file|onnxruntime cannot load"),
    Row("file", "a bundle file is a symbolic link", lambda c: L(c, _symlinked_weights(c)),
        BundleError, "symbolic link"),
    Row("file", "tokenizer.json corrupted, checksums off",
        lambda c: L(c, c.damage("tokenizer.json", lambda b: b"{"), verify=False),
        BundleError, "tokenizer"),
    # manifests
    Row("manifest", "manifest is not JSON",
        lambda c: L(c, c.damage("manifest.json", lambda b: b"{not json")), ManifestError,
        "JSON"),
    Row("manifest", "a required field missing (vae.scaling_factor)",
        lambda c: L(c, c.manifest(_del(["vae", "scaling_factor"]))), ManifestError,
        "vae.scaling_factor"),
    Row("manifest", "a field of the wrong type (defaults.steps = \"twenty\")",
        lambda c: L(c, c.manifest(_set(["defaults", "steps"], "twenty"))), ManifestError,
        "defaults.steps"),
    Row("manifest", "written by a newer edge-convert (format_version 99)",
        lambda c: L(c, c.manifest(_set(["format_version"], 99))), ManifestError,
        "upgrade edge-sdk"),
    Row("manifest", "names a file outside the bundle (../unet.onnx)",
        lambda c: L(c, c.manifest(_set(["components", "unet", "files", 0, "path"],
                                       "../unet.onnx"))), ManifestError, "inside the bundle"),
    Row("manifest", "names a file by absolute path",
        lambda c: L(c, c.manifest(_set(["components", "unet", "files", 0, "path"],
                                       "/etc/passwd"))), ManifestError, "inside the bundle"),
    Row("manifest", "I/O names that do not match the graph",
        lambda c: L(c, c.manifest(_set(["components", "unet", "inputs", 0, "name"],
                                       "latents"))), BundleError, "do not match the manifest"),
    Row("manifest", "VAE decoder stage list naming a missing component",
        lambda c: L(c, c.manifest(_set(["vae", "decoder_stages"], [{"component": "x"}]))),
        ManifestError, "decoder_stages.*malformed"),
    Row("manifest", "a required component missing (no unet)",
        lambda c: L(c, c.manifest(_del(["components", "unet"]))), ManifestError, "unet"),
    Row("manifest", "scheduler num_train_timesteps 0",
        lambda c: L(c, c.manifest(_set(["scheduler", "num_train_timesteps"], 0))),
        ManifestError, "num_train_timesteps' must be a whole number"),
    Row("manifest", "scheduler num_train_timesteps 10**12 (a 7 TiB table)",
        lambda c: L(c, c.manifest(_set(["scheduler", "num_train_timesteps"], 10**12))),
        ManifestError, "num_train_timesteps"),
    Row("manifest", "scheduler beta_end a string",
        lambda c: L(c, c.manifest(_set(["scheduler", "beta_end"], "x"))), ManifestError,
        "beta_end' has the wrong type"),
    Row("manifest", "vae.scaling_factor 0",
        lambda c: L(c, c.manifest(_set(["vae", "scaling_factor"], 0))), ManifestError,
        "scaling_factor' must be > 0"),
    Row("manifest", "the UNet's role given another kind",
        lambda c: L(c, c.manifest(_set(["components", "unet", "kind"], "text_encoder"))),
        ManifestError, "'unet' is of kind 'text_encoder'"),
    Row("file", "another bundle's tokenizer.json dropped in",
        lambda c: L(c, c.damage("tokenizer.json", lambda b: b.replace(b"<|endoftext|>",
                                                                        b"<|endoftxet|>"))),
        IntegrityError, "tokenizer.json"),
    # parameters
    Row("parameter", "width not a multiple of 8 (100)", lambda c: c.gen(width=100),
        InvalidInputError, "multiples of 8 pixels; try 96"),
    Row("parameter", "width 0 (the suggestion is a size the model takes)",
        lambda c: c.gen(width=0), InvalidInputError, "multiples of 8 pixels; try 8"),
    Row("parameter", "height zero", lambda c: c.gen(height=0), InvalidInputError,
        "positive multiple"),
    Row("parameter", "width the UNet cannot halve evenly (72 on a 2-level UNet)",
        _works(lambda c: c.gen(width=72).size == (72, 64)), None,
        "works: the UNet graph takes any multiple of 8 (skip sizes passed to its upsamplers)"),
    Row("parameter", "width 72 on an older bundle whose UNet graph needs multiples of 16",
        lambda c: Pipeline.load(c.manifest(lambda m: m["unet"].update(size_multiple=16)))(
            "x", width=72, steps=2), InvalidInputError, "multiples of 16 pixels; try 64"),
    Row("parameter", "width a float (64.0)", lambda c: c.gen(width=64.0), InvalidInputError,
        "integer"),
    Row("parameter", "width beyond any memory (100000)", lambda c: c.gen(width=100000),
        InvalidInputError, "width"),
    Row("parameter", "a size that cannot fit in the memory available",
        lambda c: _with_memory(1 << 20, lambda: c.gen(width=64, height=64)), InvalidInputError,
        "needs about .* MiB of working memory in memory mode 'fast', 1 MiB is available"),
    Row("parameter", "steps 0", lambda c: c.gen(steps=0), InvalidInputError,
        r"steps must be in \[1"),
    Row("parameter", "steps 2.5", lambda c: c.gen(steps=2.5), InvalidInputError,
        "steps must be an integer"),
    Row("parameter", "steps a string (\"20\")", lambda c: c.gen(steps="20"),
        InvalidInputError, "steps must be an integer"),
    Row("parameter", "callback not callable", lambda c: c.gen(callback=5), InvalidInputError,
        "callback must be callable"),
    Row("parameter", "callback_on_step_end asking for a tensor there is not",
        lambda c: c.gen(callback_on_step_end=lambda p, i, t, kw: kw,
                        callback_on_step_end_tensor_inputs=["prompt_embeds"]),
        InvalidInputError, "give a list of \\['latents'\\]"),
    Row("parameter", "callback_on_step_end returning latents of another shape",
        lambda c: c.gen(callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"][0]}),
        CallbackError, "must be floats of shape"),
    Row("parameter", "callback_on_step_end returning the latents array, not the dict",
        lambda c: c.gen(callback_on_step_end=lambda p, i, t, kw: kw["latents"]),
        CallbackError, "not the dict of tensors"),
    Row("parameter", "callback_on_step_end_tensor_inputs a nested list",
        lambda c: c.gen(callback_on_step_end=lambda p, i, t, kw: kw,
                        callback_on_step_end_tensor_inputs=[["latents"]]),
        InvalidInputError, "give a list of"),
    Row("parameter", "decode_latents with a tile that is not a number (\"8\")",
        lambda c: c.pipe.decode_latents(np.zeros((1, 4, 8, 8), np.float32), tile="8"),
        InvalidInputError, "tile must be a whole number"),
    Row("parameter", "decode_latents with latents 0 rows high",
        lambda c: c.pipe.decode_latents(np.zeros((1, 4, 0, 8), np.float32), tile=4),
        InvalidInputError, "every side >= 1"),
    Row("parameter", "a spill folder ($EDGE_SDK_SPILL_DIR) that does not exist, memory low",
        lambda c: _with_env("EDGE_SDK_SPILL_DIR", str(c.tmp / "nowhere"), lambda: Pipeline.load(
            c.bundle, memory="low")("x", steps=1)), InvalidInputError,
        "is not a writable directory"),
    Row("parameter", "guidance NaN", lambda c: c.gen(guidance_scale=float("nan")),
        InvalidInputError, "finite"),
    Row("parameter", "guidance infinite", lambda c: c.gen(guidance_scale=float("inf")),
        InvalidInputError, "finite"),
    Row("parameter", "guidance negative", lambda c: c.gen(guidance_scale=-1.0),
        InvalidInputError, "guidance_scale"),
    Row("parameter", "seed negative", lambda c: c.gen(seed=-1), InvalidInputError, "seed"),
    Row("parameter", "num_images 0", lambda c: c.gen(num_images=0), InvalidInputError,
        "num_images"),
    Row("parameter", "unknown scheduler", lambda c: c.gen(scheduler="warp"), SchedulerError,
        "unknown scheduler 'warp'.*euler"),
    Row("parameter", "latents of the wrong shape",
        lambda c: c.gen(latents=np.zeros((1, 4, 5, 5), np.float32), width=64, height=64),
        InvalidInputError, "latents must have shape"),
    Row("parameter", "latents holding NaN",
        lambda c: c.gen(latents=np.full((1, 4, 8, 8), np.nan, np.float32)),
        InvalidInputError, "finite"),
    Row("parameter", "threads 0", lambda c: L(c, c.bundle, threads=0), InvalidInputError,
        "threads"),
    Row("parameter", "an execution provider not in this onnxruntime (cann)",
        lambda c: L(c, c.bundle, providers=["cann"]), BackendUnavailableError,
        "'cann' is not available in this onnxruntime build"),
    Row("parameter", "an NPU provider (qnn) for a bundle with no w8a8/w8a16 UNet",
        lambda c: L(c, c.bundle, providers=["qnn"]), InvalidInputError,
        "is an NPU, which runs statically quantized graphs, and this bundle has none"),
    Row("parameter", "provider_options without a plugin provider",
        lambda c: L(c, c.bundle, provider_options={"soc_model": "60"}), InvalidInputError,
        "provider_options are for a plugin execution provider"),
    Row("parameter", "an unknown backend", lambda c: L(c, c.bundle, backend="warp"),
        InvalidInputError, "backend 'warp' is unknown"),
    Row("parameter", "the TFLite backend asked of an ONNX bundle",
        lambda c: L(c, c.bundle, backend="tflite"),
        BundleError, "stored as 'onnx'"),
    # parameters of a diffusers user's making
    Row("parameter", "scheduler not a string (5)", lambda c: c.gen(scheduler=5),
        InvalidInputError, "scheduler must be a name"),
    Row("parameter", "numpy integers and floats (np.int64 steps and seed, np.float32 guidance)",
        _same_as_python_ints, None, "works: the same image as with Python numbers"),
    Row("parameter", "an unknown keyword (stepz=3)", lambda c: c.gen(stepz=3),
        InvalidInputError, "unknown generation parameter 'stepz'"),
    Row("parameter", "diffusers' names (num_inference_steps, num_images_per_prompt)",
        _works(lambda c: len(c.pipe("x", num_inference_steps=2, num_images_per_prompt=2,
                                    seed=0)) == 2), None, "works: the same parameters"),
    Row("parameter", "num_images None", lambda c: c.gen(num_images=None), InvalidInputError,
        "num_images must be an integer"),
    Row("parameter", "providers as one string ('cpu')",
        _works(lambda c: L(c, c.bundle, providers="cpu").options.providers == ("cpu",)), None,
        "works: one provider, not a sequence of letters"),
    Row("parameter", "delegate_options not a mapping",
        lambda c: L(c, c.bundle, delegate_options=["a=b"]), InvalidInputError,
        "delegate_options must be a mapping"),
    Row("parameter", "threads 1000 (more than the cores)",
        _warned("edge_sdk", "usable cores", lambda c: L(c, c.bundle, threads=1000)), None,
        "works: capped at the usable cores, with a warning"),
    Row("prompt", "a list of prompts", _one_per_prompt, None, "works: one image per prompt"),
    Row("prompt", "an empty list of prompts", lambda c: c.gen([]), InvalidInputError,
        "list of prompts is empty"),
    Row("prompt", "a prompt of 10,001 characters", lambda c: c.gen("x" * 10_001),
        InvalidInputError, "10001 characters; at most 10000"),
    # prompts
    Row("prompt", "prompt None", lambda c: c.gen(None), InvalidInputError,
        "prompt must be a string"),
    Row("prompt", "prompt bytes", lambda c: c.gen(b"a red circle"), InvalidInputError,
        "prompt must be a string"),
    Row("prompt", "negative prompt not a string", lambda c: c.gen(negative_prompt=3),
        InvalidInputError, "negative_prompt"),
    Row("prompt", "prompt longer than the text encoder's 77 tokens", _long_prompt, None,
        "works: truncated to 77 tokens, with a warning naming the limit"),
    Row("prompt", "unbalanced brackets in a weighted prompt: 'a (red circle', 'a red) circle]'",
        _unbalanced, None, "works as A1111 reads it: an unclosed bracket weighs the rest of "
        "the prompt, a stray closing one is text"),
    Row("prompt", "a weight that is not a number: '(red:lots)'",
        _works(lambda c: c.gen("a (red:lots) circle").size == (64, 64)), None,
        "works as A1111 reads it: ':lots' is text inside a (x1.1) bracket"),
    Row("parameter", "prompt_weighting not a bool", lambda c: c.gen(prompt_weighting="no"),
        InvalidInputError, "prompt_weighting must be True or False, got 'no'"),
    Row("parameter", "clip_skip negative", lambda c: c.gen(clip_skip=-1), InvalidInputError,
        "clip_skip must be a whole number >= 0 .*got -1"),
    Row("prompt", "a prompt weight that is not a number: '(red:1.2.3)'",
        lambda c: c.gen("a (red:1.2.3) circle"), InvalidInputError,
        "prompt weight '1.2.3' is not a number.*prompt_weighting=False"),
    Row("parameter", "clip_skip beyond the text encoder's layers",
        lambda c: c.gen(clip_skip=3), InvalidInputError,
        "clip_skip=3: this text encoder has 2 layers; clip_skip must be in \\[0, 2\\]"),
    Row("parameter", "clip_skip on a bundle converted before clip skip existed",
        lambda c: Pipeline.load(c.manifest(_drop_layer_states))("x", steps=2, clip_skip=1),
        InvalidInputError, "exposes no earlier layers.*re-convert the checkpoint"),
    Row("prompt", "empty prompt", _works(lambda c: c.gen("").size == (64, 64)), None,
        "works: an unconditional image"),
    Row("prompt", "non-ASCII prompt (emoji, accents, CJK)",
        _works(lambda c: c.gen("un cercle rouge 🔴 赤い円").size == (64, 64)), None,
        "works: tokenized like any text"),
    Row("prompt", "the model turns out NaN (broken weights)", _nan_from_model, InferenceError,
        "NaN"),
    # img2img and inpainting: the source image, the mask and their parameters
    Row("image", "image is an RGBA PIL image", _pil("RGBA"), InvalidInputError,
        r"RGBA PIL image; give an RGB one \(image.convert\('RGB'\)\)"),
    Row("image", "image is a grayscale (L) PIL image", _pil("L"), InvalidInputError,
        "L PIL image; give an RGB one"),
    Row("image", "image file with alpha (RGBA PNG)", _works(_converted_file("RGBA")), None,
        "works: made RGB, as diffusers' load_image does (alpha dropped, logged)"),
    Row("image", "image file with a palette (P PNG)", _works(_converted_file("P")), None,
        "works: made RGB, as diffusers' load_image does"),
    Row("image", "image file of 16-bit grayscale", _works(_sixteen_bit), None,
        "works: scaled to 8 bits (PIL's conversion, which diffusers uses, clips it white)"),
    Row("image", "image is a 16-bit PIL image in memory", lambda c: c.gen(
        image=__import__("PIL.Image").Image.fromarray(np.zeros((64, 64), np.uint16))),
        InvalidInputError, "16-bit or float.*give an 8-bit one"),
    Row("image", "image array HxWx4", lambda c: c.gen(image=np.zeros((64, 64, 4), np.uint8)),
        InvalidInputError, r"shape \(64, 64, 4\); give HxWx3"),
    Row("image", "image array of uint16", lambda c: c.gen(
        image=np.zeros((64, 64, 3), np.uint16)), InvalidInputError, "uint16; give uint8"),
    Row("image", "image float array outside [0, 1]", lambda c: c.gen(
        image=np.full((64, 64, 3), 2.0)), InvalidInputError, r"finite values in \[0, 1\]"),
    Row("image", "image path that does not exist", lambda c: c.gen(image=c.tmp / "no.png"),
        InvalidInputError, "image file .* does not exist"),
    Row("image", "image file that is not an image", lambda c: (c.tmp / "x.png").write_text(
        "text") and c.gen(image=c.tmp / "x.png"), InvalidInputError, "not a readable image"),
    Row("image", "image smaller than 8 pixels a side", lambda c: c.gen(
        image=np.zeros((4, 64, 3), np.uint8)), InvalidInputError, "smaller than 8 pixels"),
    Row("image", "image larger than 8192 px a side, no width/height given", lambda c: c.gen(
        image=np.zeros((8, 8200, 3), np.uint8)), InvalidInputError,
        "image is 8200x8, larger than 8192 pixels a side; give width= and height="),
    Row("image", "image larger than 8192 px a side, width and height given",
        _works(lambda c: c.gen(image=np.zeros((8, 8200, 3), np.uint8), width=64,
                               height=64).size == (64, 64)), None,
        "works: the image is resized to the size asked for"),
    Row("image", "image smaller than 8 px a side, width and height given",
        _works(lambda c: c.gen(image=np.zeros((4, 64, 3), np.uint8), width=64,
                               height=64).size == (64, 64)), None,
        "works: the image is resized to the size asked for"),
    Row("image", "image and mask of different sizes", lambda c: c.gen(
        image=_rgb(), mask_image=_box_mask(48, 64)), InvalidInputError,
        "image is 64x64 but mask_image is 48x64"),
    Row("image", "mask_image without image", lambda c: c.gen(mask_image=_box_mask()),
        InvalidInputError, "mask_image was given without image"),
    Row("image", "strength 1.5", lambda c: c.gen(image=_rgb(), strength=1.5),
        InvalidInputError, r"strength must be a number in \[0, 1\]"),
    Row("image", "strength -0.1", lambda c: c.gen(image=_rgb(), strength=-0.1),
        InvalidInputError, r"strength must be a number in \[0, 1\]"),
    Row("image", "strength so small that no step runs (0.05 of 10 steps)", lambda c: c.gen(
        image=_rgb(), strength=0.05, steps=10), InvalidInputError,
        r"strength 0.05 of 10 steps runs no step.*at least 0.1"),
    Row("image", "strength without an image", lambda c: c.gen(strength=0.5),
        InvalidInputError, "strength needs a source image"),
    Row("image", "padding_mask_crop without a mask", lambda c: c.gen(
        image=_rgb(), padding_mask_crop=8), InvalidInputError,
        "padding_mask_crop and paste_back are for inpainting"),
    Row("image", "padding_mask_crop with an all-black mask", lambda c: c.gen(
        image=_rgb(), mask_image=np.zeros((64, 64), np.uint8), padding_mask_crop=8),
        InvalidInputError, "black everywhere"),
    Row("image", "encode_mode 'argmax'", lambda c: c.gen(image=_rgb(), encode_mode="argmax"),
        InvalidInputError, "encode_mode must be 'sample' or 'mean'"),
    Row("image", "a mask for a bundle whose UNet is not an inpainting one", _works(_blended),
        None, "works: the known region is blended back after every step (diffusers' way)"),
    Row("parameter", "decoder 'tiny' on a bundle without a tiny decoder",
        lambda c: c.gen(decoder="tiny"), InvalidInputError, "no tiny decoder.*--tiny-vae"),
    Row("parameter", "decoder 'bogus'", lambda c: c.gen(decoder="bogus"), InvalidInputError,
        "decoder must be one of"),
    Row("manifest", "vae.tiny_scaling_factor set without a tiny decoder component",
        lambda c: Pipeline.load(c.manifest(lambda m: m["vae"].update(
            tiny_scaling_factor=1.0))), ManifestError,
        "tiny_scaling_factor is 1.0 but the bundle has no 'vae_decoder_tiny'"),
    Row("parameter", "preview that is not callable (a path)",
        lambda c: c.gen(preview="preview.png"), InvalidInputError,
        "preview must be callable as preview\\(step, image\\)"),
    Row("parameter", "preview_every 0", lambda c: c.gen(preview=lambda s, i: None,
                                                         preview_every=0),
        InvalidInputError, "preview_every must be a whole number of steps >= 1"),
    Row("parameter", "preview_every beside a Preview object that says otherwise",
        lambda c: c.gen(preview=Preview(lambda s, i: None, 2), preview_every=3),
        InvalidInputError, "preview_every=3 beside a Preview object with every=2: give it once"),
    Row("parameter", "a preview callback that raises",
        lambda c: c.gen(preview=lambda s, i: 1 / 0), CallbackError,
        "^the preview callback raised ZeroDivisionError.*generation was stopped"),
    Row("parameter", "previews on a bundle converted before previews (no map, no tiny decoder)",
        lambda c: Pipeline.load(c.manifest(lambda m: m["vae"].pop("latent_rgb")))(
            "x", steps=1, preview=lambda s, i: None), InvalidInputError,
        "no preview map \\(converted before previews existed\\); re-convert it$"),
    Row("cli", "generate --preview naming the output image itself", lambda c: c.cli(
        "generate", "x", "--model", c.bundle, "-o", c.tmp / "o.png", "--preview",
        c.tmp / "o.png"), InvalidInputError, "also an output image; give the preview its own"),
    Row("cli", "generate --preview-every without --preview", lambda c: c.cli(
        "generate", "x", "--model", c.bundle, "-o", c.tmp / "o.png", "--preview-every", "2"),
        InvalidInputError, "--preview-every and --preview-source are for --preview"),
    Row("cli", "generate --preview-every 0", lambda c: c.cli(
        "generate", "x", "--model", c.bundle, "-o", c.tmp / "o.png", "--preview",
        c.tmp / "p.png", "--preview-every", "0"), InvalidInputError,
        "--preview-every must be a whole number of steps >= 1, got 0"),
    Row("parameter", "previews from the tiny decoder on a bundle without one",
        lambda c: c.gen(preview=Preview(lambda s, i: None, 1, "tiny")), InvalidInputError,
        "tiny decoder: this bundle has none; add one with `edge-convert ... --tiny-vae"),
    Row("parameter", "a preview source that does not exist",
        lambda c: c.gen(preview=Preview(lambda s, i: None, 1, "taesd")), InvalidInputError,
        "preview source must be one of \\('auto', 'map', 'tiny'\\)"),
    Row("manifest", "vae.latent_rgb (the preview map) of the wrong shape",
        lambda c: L(c, c.manifest(_set(["vae", "latent_rgb"], [[1, 2, 3]]))), ManifestError,
        "vae.latent_rgb' must be latent_channels \\+ 1 rows of 3"),
    Row("manifest", "vae.preview_decoder with a weight of the wrong length",
        lambda c: L(c, c.manifest(_set(["vae", "preview_decoder"], [
            {"shape": [3, 4, 1, 1], "weight": [0.0] * 11, "bias": [0.0] * 3}]))),
        ManifestError, "vae.preview_decoder' must be layers of"),
    Row("manifest", "vae.preview_decoder whose layers do not chain",
        lambda c: L(c, c.manifest(_set(["vae", "preview_decoder"], [
            {"shape": [8, 4, 1, 1], "weight": [0.0] * 32, "bias": [0.0] * 8},
            {"shape": [3, 6, 1, 1], "weight": [0.0] * 18, "bias": [0.0] * 3}]))),
        ManifestError, "preview_decoder': layer 1 takes 6 channels where 8 come in"),
    Row("manifest", "unet.time_cond_proj_dim set on a UNet without timestep_cond",
        lambda c: Pipeline.load(c.manifest(lambda m: m["unet"].update(
            time_cond_proj_dim=32))), ManifestError,
        "time_cond_proj_dim is 32 but the UNet graph takes no timestep_cond"),
    Row("image", "img2img with an LCM-distilled model (not supported yet)",
        lambda c: Pipeline.load(c.models.bundle("tiny-lcm"))("x", image=_rgb(), steps=2),
        InvalidInputError, "LCM-distilled UNet are not supported yet"),
    Row("parameter", "negative_prompt for an LCM-distilled model (guidance embedded)",
        lambda c: Pipeline.load(c.models.bundle("tiny-lcm"))("x", negative_prompt="blurry",
                                                              steps=1),
        InvalidInputError, "LCM-distilled .* takes no negative_prompt"),
    Row("image", "an inpainting (9-channel) bundle given an image but no mask",
        lambda c: _inpaint_bundle(c)("x", image=_rgb(), steps=2), InvalidInputError,
        "inpainting one \\(9 input channels\\): it needs mask_image"),
    Row("image", "an inpainting (9-channel) bundle asked for text-to-image",
        lambda c: _inpaint_bundle(c)("x", steps=2), InvalidInputError,
        "inpainting one .*give image= and mask_image="),
    Row("image", "a bundle converted without a VAE encoder", _no_encoder, InvalidInputError,
        "no VAE encoder .*--no-vae-encoder"),
    Row("cli", "generate --image that does not exist", lambda c: c.cli(
        "generate", "x", "--model", c.bundle, "--image", c.tmp / "none.png", "-o",
        c.tmp / "o.png"), InvalidInputError, "image file .* does not exist"),
    Row("cli", "generate --strength 2", lambda c: c.cli(
        "generate", "x", "--model", c.bundle, "--image", _saved(c, "in.png", _rgb()),
        "--strength", "2", "-o", c.tmp / "o.png"), InvalidInputError,
        r"strength must be a number in \[0, 1\]"),
    # the command line's outputs, checked before any work
    Row("cli", "-o an existing folder", lambda c: c.cli("generate", "x", "--model", c.bundle,
                                                       "-o", c.tmp), InvalidInputError,
        "is a folder"),
    Row("cli", "-o in a folder that does not exist",
        lambda c: c.cli("generate", "x", "--model", c.bundle, "-o", c.tmp / "no" / "a.png"),
        InvalidInputError, "does not exist"),
    Row("cli", "-o with an unknown image type (.gif)",
        lambda c: c.cli("generate", "x", "--model", c.bundle, "-o", c.tmp / "a.gif"),
        InvalidInputError, "unknown file type '.gif'"),
    Row("cli", "evaluate --sheet '' (empty)", lambda c: c.cli("evaluate", "--sheet", ""),
        InvalidInputError, "output path is empty"),
    Row("cli", "evaluate on a model that is not the shapes model (the evaluator's)",
        lambda c: c.cli("evaluate", "--model", c.bundle, "--limit", "1"), InvalidInputError,
        "is not the shapes model, so its scores would say nothing"),
    Row("cli", "evaluate --json in a folder that does not exist",
        lambda c: c.cli("evaluate", "--json", c.tmp / "no" / "r.json"), InvalidInputError,
        "does not exist"),
    # conversion
    Row("conversion", "--calibration without static int8",
        lambda c: (c.tmp / "p.txt").write_text("a cat\n") and c.convert(
            c.ckpt, "-o", c.tmp / "out", "--calibration", c.tmp / "p.txt"), ConversionError,
        "--calibration is for static quantization"),
    Row("conversion", "--int8-method static with --precision fp16",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--precision", "fp16",
                            "--int8-method", "static"), ConversionError,
        "quantizes an int8 UNet, but the UNet is fp16"),
    Row("file", "loras= whose keys match no layer of the bundle's model",
        lambda c: _load_lora(c, _lora_unmatched), LoraError, "2 of its 2 keys match no layer"),
    Row("file", "loras= with a truncated safetensors header",
        lambda c: _load_lora(c, lambda _, p: p.write_bytes(b"\xff" * 8 + b"{")),
        SafetensorsError, "not a .safetensors file, or truncated"),
    Row("parameter", "loras= scale not a number",
        lambda c: _load_lora(c, _lora_unmatched, "strong"), LoraError,
        "scale 'strong' is not a finite number"),
    Row("file", "loras= on an int8 bundle (quantized weights)",
        lambda c: Pipeline.load(c.models.bundle("tiny-sd1", "int8"),
                                loras={c.tmp / "x.safetensors": 1.0}), LoraError,
        "needs fp32/fp16 ONNX graphs; this bundle's .* int8. Fuse the LoRA at conversion"),
    Row("conversion", "--lora for another base model (its layers' shapes differ)",
        lambda c: _convert_lora(c, _lora_other_base), ConversionError,
        "--lora: .*changes a \\(\\d+, 1024\\) weight, the model's is .*another base model"),
    Row("conversion", "--lora whose keys match no layer of the model",
        lambda c: _convert_lora(c, _lora_unmatched), ConversionError,
        "--lora: .*2 of its 2 keys match no layer.*mid_block_foo"),
    Row("conversion", "--lora in a convention not read (LoHa keys)",
        lambda c: _convert_lora(c, _lora_loha), ConversionError,
        "--lora: .*in no LoRA convention this reads.*hada_w1_a"),
    Row("conversion", "--lora with a truncated safetensors header",
        lambda c: _convert_lora(c, lambda _, p: p.write_bytes(b"\x10\x27" + b"\0" * 6 + b"{")),
        ConversionError, "--lora: .*not a .safetensors file, or truncated"),
    Row("conversion", "--lora file missing", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--lora", c.tmp / "nope.safetensors:0.5"),
        ConversionError, "--lora .*nope.safetensors: no such file"),
    Row("conversion", "--embedding whose width does not match the text encoder",
        lambda c: _convert_embedding(c, "wide.safetensors",
                                     {"emb_params": np.ones((2, 1024), np.float32)}),
        ConversionError, "--embedding .*1024 wide, this text encoder's are 32.*another model"),
    Row("conversion", "single file of an unknown layout (Flux-style blocks, no SD UNet)",
        lambda c: _single(c, shapes={"double_blocks.0.img_attn.qkv.weight": (96, 32)}),
        ConversionError, "no Stable Diffusion UNet in the original layout.*double_blocks"),
    Row("conversion", "single file with a truncated safetensors header",
        lambda c: c.convert(_write(c, "cut.safetensors", b"\x10\x27" + b"\0" * 6 + b"{"),
                            "-o", c.tmp / "out"), ConversionError,
        "not a .safetensors file, or truncated"),
    Row("conversion", "single file of an SDXL refiner (one conditioner text encoder)",
        lambda c: _single(c, shapes={"conditioner.embedders.0.model.ln_final.weight": (8,)}),
        ConversionError, "without SDXL base's two text encoders: an SDXL refiner"),
    Row("conversion", "single file of an architecture no shipped family has, no --config",
        lambda c: _single(c), ConversionError,
        "unknown architecture \\(a CLIP text encoder.*width 32\\).*--config DIR"),
    Row("conversion", "SD 2.x single file that does not state its prediction type",
        lambda c: _single(c, shapes=_sd2_shapes()), ConversionError,
        "SD 2.x.*--prediction-type v_prediction.*--prediction-type epsilon"),
    Row("conversion", "--family that the file's weights do not fit (sd1 for SD 2.x inpainting)",
        lambda c: _single(c, "--family", "sd1", shapes=_sd2_shapes(True)), ConversionError,
        "\\(UNet\\): the weights do not fit.*wrong shape"),
    Row("conversion", "a LoRA given as the checkpoint",
        lambda c: _single(c, shapes={"lora_unet_x.lora_down.weight": (4, 8)}),
        ConversionError, "a LoRA, not a checkpoint.*--lora"),
    Row("conversion", "single-file .ckpt (pickle) without --allow-pickle",
        lambda c: c.convert(_write(c, "m.ckpt", b"\x80\x04pickle"), "-o", c.tmp / "out"),
        ConversionError, "m.ckpt: a pickle file.*--allow-pickle"),
    Row("conversion", "--config folder without the model configs",
        lambda c: _single(c, "--config", c.tmp), ConversionError,
        "--config .*missing .*unet/config.json"),
    Row("conversion", "--family given for a diffusers folder",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--family", "sd1"),
        ConversionError, "--family: for single-file checkpoints"),
    Row("conversion", "--vae whose weights do not fit the checkpoint's VAE",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--vae", _sparse(
            c, "vae.safetensors", {"encoder.conv_in.weight": (8, 3, 3, 3)})),
        ConversionError, "--vae .*weights do not fit.*missing"),
    Row("conversion", "--embedding as a .pt pickle without --allow-pickle",
        lambda c: _convert_embedding(c, "style.pt", None), ConversionError,
        "--embedding .*style.pt: a pickle file.*--allow-pickle"),
    Row("conversion", "--embedding whose trigger word is already a word of the vocabulary",
        lambda c: _convert_embedding(c, "red.safetensors",
                                     {"emb_params": np.ones((1, 32), np.float32)}),
        ConversionError, "--embedding .*its token 'red' is already in the tokenizer"),
    Row("conversion", "--embedding that is not a textual inversion (an SDXL one)",
        lambda c: _convert_embedding(c, "xl.safetensors", {
            "clip_l": np.ones((1, 32), np.float32), "clip_g": np.ones((1, 32), np.float32)}),
        ConversionError, "not a textual-inversion file.*SDXL"),
    Row("conversion", "--default-steps -3", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--default-steps", "-3"), ConversionError,
        "--default-steps must be a whole number"),
    Row("conversion", "--default-guidance nan", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--default-guidance", "nan"), ConversionError,
        "--default-guidance must be a finite number"),
    Row("conversion", "--export-cache for an ONNX bundle",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--export-cache", c.tmp / "x"),
        ConversionError, "--export-cache is for --format tflite"),
    Row("conversion", "--export-cache that cannot be a folder (a file is there)",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--format", "tflite",
                            "--export-cache", c.bundle / "manifest.json"),
        ConversionError, "--export-cache .* cannot be created"),
    Row("conversion", "--opset 5", lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--opset",
                                                       "5"), ConversionError, "--opset 5"),
    Row("conversion", "checkpoint folder does not exist",
        lambda c: c.convert(c.tmp / "nope", "-o", c.tmp / "out"), ConversionError,
        "nope"),
    Row("conversion", "not a diffusers checkpoint (no model_index.json)",
        lambda c: c.convert(c.tmp, "-o", c.tmp / "out"), ConversionError, "model_index.json"),
    Row("conversion", "pickle weights without --allow-pickle",
        lambda c: c.convert(_pickle_checkpoint(c), "-o", c.tmp / "out"), ConversionError,
        "--allow-pickle"),
    Row("conversion", "output exists, no --overwrite",
        lambda c: c.convert(c.ckpt, "-o", c.bundle), ConversionError, "--overwrite"),
    Row("conversion", "unknown precision (int3)",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--precision", "int3"),
        ConversionError, "int3"),
    Row("conversion", "unknown component in --precision",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--precision", "unet2=int8"),
        ConversionError, "unknown component"),
    Row("conversion", "text encoder width (512) differs from the UNet's cross-attention "
        "width (768)", _convert_edited({"text_encoder": {"hidden_size": 512},
                                        "unet": {"cross_attention_dim": 768}}),
        ConversionError, "text encoder's width.*is 512 but the UNet's cross-attention width"
        ".*is 768"),
    Row("conversion", "VAE latent channels (16) differ from the UNet's (4)",
        _convert_edited({"vae": {"latent_channels": 16}}), ConversionError,
        "UNet takes 4 input channels; with the VAE's 16 latent channels it must take 16 .*"
        "or 33"),
    Row("conversion", "tokenizer longer (100) than the text encoder's positions (77)",
        _longer_tokenizer, ConversionError,
        r"model_max_length \(100\) exceeds.*max_position_embeddings \(77\)"),
    Row("conversion", "an SDXL-style UNet without a second text encoder",
        _convert_edited({"unet": {"addition_embed_type": "text_time"}}), ConversionError,
        "needs both a text_encoder_2 folder"),
    Row("conversion", "an SDXL refiner (aesthetic-score conditioning, 5 time ids)",
        _xl_refiner, ConversionError, "an SDXL refiner"),
    Row("conversion", "an SDXL refiner folder (no first text encoder)", lambda c: c.convert(
        _xl_edited(c, {".": {"requires_aesthetics_score": True}}, drop="text_encoder"), "-o",
        c.tmp / "out"), ConversionError, "an SDXL refiner .*SDXL base and Turbo"),
    Row("conversion", "an SDXL inpainting UNet (9 input channels)", lambda c: c.convert(
        _xl_edited(c, {"unet": {"in_channels": 9}}), "-o", c.tmp / "out"), ConversionError,
        "an SDXL inpainting UNet \\(9 input channels\\)"),
    Row("conversion", "--format tflite for an SDXL checkpoint", lambda c: c.convert(
        c.models.checkpoint("tiny-sdxl"), "-o", c.tmp / "out", "--format", "tflite"),
        ConversionError, "--format tflite .*not available for SDXL"),
    Row("manifest", "an SDXL manifest whose text section names no pooled encoder",
        lambda c: Pipeline.load(_xl_manifest(c, _set(["text", "pooled"], None))),
        ManifestError, "text.pooled is None but the UNet graph takes 'text_embeds'"),
    Row("manifest", "an SDXL manifest whose tokenizers have different lengths",
        lambda c: Pipeline.load(_xl_manifest(c, _set(["tokenizers", "tokenizer_2",
                                                      "max_length"], 64))),
        ManifestError, "the text encoders' tokenizers have different lengths"),
    Row("manifest", "an SDXL manifest whose pooled encoder lost its text_embeds output",
        lambda c: Pipeline.load(_xl_manifest(c, _drop_output("text_encoder_2",
                                                             "text_embeds"))),
        ManifestError, "text encoder 'text_encoder_2' has no \\['hidden_layers', "
        "'text_embeds'\\] outputs"),
    Row("manifest", "an SDXL manifest reading one encoder (its width not the UNet's context)",
        lambda c: Pipeline.load(_xl_manifest(c, _set(["text"], {
            "encoders": ["text_encoder"], "penultimate": True, "pooled": None}))),
        ManifestError, "widths \\[32\\] do not make the UNet's context width 64"),
    Row("parameter", "prompt_2 for an SD 1.x model", lambda c: c.gen(prompt_2="a cube"),
        InvalidInputError, "prompt_2: for SDXL models"),
    Row("parameter", "SDXL original_size that is not (height, width)", lambda c: Pipeline.load(
        c.models.bundle("tiny-sdxl"))("x", steps=1, original_size=(512,)), InvalidInputError,
        r"original_size must be two whole numbers .*\(height, width"),
    Row("parameter", "a LoRA on an SDXL bundle", lambda c: Pipeline.load(
        c.models.bundle("tiny-sdxl"), loras={c.tmp / "x.safetensors": 1.0}), LoraError,
        "LoRAs on SDXL bundles are not supported yet"),
    Row("conversion", "a UNet with 5 input channels (neither 4 nor inpainting's 9)",
        _convert_edited({"unet": {"in_channels": 5}}), ConversionError,
        "UNet takes 5 input channels.*must take 4 .*or 9"),
    Row("conversion", "--tiny-vae folder of another class (AutoencoderKL)", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--tiny-vae", _tiny_folder(
            c, {"_class_name": "AutoencoderKL"})), ConversionError,
        "_class_name is 'AutoencoderKL', not 'AutoencoderTiny'"),
    Row("conversion", "--tiny-vae config.json that is not an object", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--tiny-vae", _tiny_folder(c, "[1, 2]")),
        ConversionError, "_class_name is None, not 'AutoencoderTiny'"),
    Row("conversion", "--tiny-vae with scaling_factor 0", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--tiny-vae", _tiny_folder(
            c, {"_class_name": "AutoencoderTiny", "scaling_factor": 0})), ConversionError,
        "scaling_factor 0 is not a positive number"),
    Row("conversion", "--tiny-vae folder without safetensors weights", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--tiny-vae", _tiny_folder(
            c, {"_class_name": "AutoencoderTiny"}, weights=False)), ConversionError,
        "no .safetensors weights.*--allow-pickle"),
    Row("conversion", "--tiny-vae for another latent width (8 channels, the VAE makes 4)",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--tiny-vae", _tiny_folder(
            c, {"_class_name": "AutoencoderTiny", "latent_channels": 8})), ConversionError,
        "decodes 8 latent channels, this checkpoint's VAE makes 4"),
    Row("conversion", "--preview-decoder that is not a safetensors file", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--preview-decoder", _write(c, "pd.safetensors", b"{}")),
        ConversionError, "--preview-decoder .*not a readable .safetensors file"),
    Row("conversion", "--preview-decoder with a tensor that is not a layer's",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--preview-decoder", _preview_file(
            c, {"0.weight": (3, 4, 1, 1), "0.bias": (3,), "scale": (1,)})), ConversionError,
        "unexpected tensor 'scale'"),
    Row("conversion", "--preview-decoder for another latent width (8 channels, the VAE makes 4)",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--preview-decoder", _preview_file(
            c, {"0.weight": (3, 8, 1, 1), "0.bias": (3,)})), ConversionError,
        "layer 0 takes 8 channels where 4 come in; give the preview decoder trained for"),
    Row("conversion", "--preview-decoder in bfloat16 (numpy has no such type)",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--preview-decoder", _bf16_file(c)),
        ConversionError, "bfloat16.*(save it as float32|in float32 or float16)"),
    Row("conversion", "--preview-decoder with an empty weight", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--preview-decoder", _preview_file(
            c, {"0.weight": (3, 0, 1, 1), "0.bias": (3,)})), ConversionError,
        "layer 0 needs a finite, non-empty 4-d float weight"),
    Row("conversion", "--preview-decoder whose last layer is not RGB", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--preview-decoder", _preview_file(
            c, {"0.weight": (8, 4, 3, 3), "0.bias": (8,)})), ConversionError,
        "last layer makes 8 channels, not 3 \\(RGB\\)"),
    Row("parameter", "cache_interval 0", lambda c: c.gen(cache_interval=0),
        InvalidInputError, "cache_interval must be in \\[1, 1000\\], got 0"),
    Row("parameter", "cache_interval as a string", lambda c: c.gen(cache_interval="3"),
        InvalidInputError, "cache_interval must be an integer, got '3'"),
    Row("parameter", "cache_interval on a bundle without the shallow UNet branch",
        lambda c: Pipeline.load(c.manifest(lambda m: m["components"].pop("unet_shallow")))(
            "x", steps=2, cache_interval=3), InvalidInputError,
        "cache_interval=3: this bundle has no shallow UNet branch.*re-convert it"),
    Row("manifest", "a shallow UNet branch beside a UNet graph without deep features",
        lambda c: L(c, c.manifest(lambda m: m["components"]["unet"].update(
            outputs=m["components"]["unet"]["outputs"][:1]))), ManifestError,
        "'unet_shallow' component but the UNet graph does not output.*'deep_features'"),
    Row("conversion", "--precision naming the UNet's shallow branch",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--precision", "unet_shallow=fp16"),
        ConversionError, "unknown component 'unet_shallow'.*takes the UNet's"),
    Row("conversion", "--feature-cache with --format tflite", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--format", "tflite", "--feature-cache"),
        ConversionError, "--feature-cache is ONNX-only"),
    Row("conversion", "--feature-cache with static int8", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--precision", "int8", "--int8-method", "static",
        "--feature-cache"), ConversionError, "not available with static quantization"),
    Row("conversion", "--feature-cache on a UNet that cannot be split",
        lambda c: c.convert(_edited(c, {"unet": {"center_input_sample": True}}), "-o",
                            c.tmp / "out", "--feature-cache"), ConversionError,
        "this UNet cannot be split \\(it centres its input sample"),
    Row("conversion", "w8a8 for the text encoder (static QDQ is the UNet's)",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--precision", "text_encoder=w8a8"),
        ConversionError, "static quantization of the UNet"),
    Row("conversion", "w8a16 with --format tflite", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--format", "tflite", "--precision", "w8a16"),
        ConversionError, "ONNX's static QDQ"),
    Row("conversion", "int8-full for an ONNX bundle (it is TFLite's)", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--precision", "int8-full"), ConversionError,
        "int8-full is TFLite's full-integer UNet; add --format tflite"),
    Row("conversion", "int8-full for the VAE decoder (full integer is the UNet's)",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--format", "tflite",
                            "--precision", "vae_decoder=int8-full"), ConversionError,
        "static quantization of the UNet"),
    Row("conversion", "--int8-method static with --format tflite", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--format", "tflite", "--precision", "int8",
        "--int8-method", "static"), ConversionError, "TFLite's static int8 is --precision "
        "int8-full"),
    Row("conversion", "--sizes for an fp32 ONNX bundle", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--sizes", "64x64"), ConversionError,
        "--sizes fixes the shapes of an NPU's UNet"),
    Row("conversion", "two --sizes for a w8a16 (NPU) bundle", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--precision", "w8a16", "--sizes", "64x64,64x128"),
        ConversionError, "an ONNX NPU bundle has one size"),
    Row("conversion", "a malformed --sizes for a w8a8 bundle", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--precision", "w8a8", "--sizes", "64by64"),
        ConversionError, "is not WIDTHxHEIGHT"),
    Row("conversion", "--target-psnr without static quantization", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--target-psnr", "30"), ConversionError,
        "a positive number of dB, for ONNX static quantization"),
    Row("conversion", "a ControlNet made for another base (its context width differs)",
        _foreign_controlnet, ConversionError, "made for another base model: its "
        "cross_attention_dim is 64, this checkpoint's UNet has 32"),
    Row("conversion", "--controlnet PATH that does not exist", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--controlnet", c.tmp / "nowhere"), ConversionError,
        "--controlnet .*nowhere does not exist"),
    Row("conversion", "--controlnet with --format tflite", lambda c: c.convert(
        c.ckpt, "-o", c.tmp / "out", "--format", "tflite", "--controlnet",
        c.models.controlnet("tiny-sd1", 1)), ConversionError, "ControlNet bundles are ONNX"),
    Row("conversion", "a static-quantization precision for the ControlNets",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--precision", "int8,controlnet=w8a8",
                            "--controlnet", c.models.controlnet("tiny-sd1", 1)),
        ConversionError, "controlnet=w8a8: static quantization is the UNet's"),
    Row("conversion", "--controlnet a file that is not a ControlNet (UNet weights)",
        lambda c: c.convert(c.ckpt, "-o", c.tmp / "out", "--controlnet",
                            next(c.models.checkpoint("tiny-sd1").glob(
                                "unet/*.safetensors"))), ConversionError,
        "not a ControlNet in the original layout"),
    Row("parameter", "a control image of another size than the output",
        _other_size_control, None, "resized to the output size (Lanczos), as diffusers does"),
    Row("parameter", "an unknown --control-preprocess", lambda c: c.cli(
        "generate", "x", "-m", c.models.control_bundle(2), "-o", c.tmp / "o.png",
        "--control-image", c.tmp / "x.png", "--control-preprocess", "depth"),
        InvalidInputError, "unknown control preprocessor 'depth'; choose one of canny, "
        "scribble, none"),
    Row("parameter", "a control image for a bundle without ControlNets", lambda c: c.gen(
        control_image=np.zeros((64, 64, 3), np.uint8)), InvalidInputError,
        "this bundle has no ControlNet; convert one into it"),
    Row("parameter", "one control image for a bundle of two ControlNets",
        lambda c: _control(c, np.zeros((64, 96, 3), np.uint8)), InvalidInputError,
        "1 control image\\(s\\) for this bundle's 2 ControlNet"),
    Row("parameter", "controlnet_conditioning_scale without a control image",
        lambda c: c.gen(controlnet_conditioning_scale=0.5), InvalidInputError,
        "controlnet_conditioning_scale need a control image"),
    Row("parameter", "three conditioning scales for two ControlNets",
        lambda c: _control(c, controlnet_conditioning_scale=[1, 1, 1]), InvalidInputError,
        "has 3 values for this bundle's 2 ControlNet"),
    Row("parameter", "control_guidance_start after its end",
        lambda c: _control(c, control_guidance_start=0.8, control_guidance_end=0.5),
        InvalidInputError, "need 0 <= start < end <= 1"),
    Row("parameter", "feature caching with a control image",
        lambda c: _control(c, cache_interval=2), InvalidInputError,
        "cache_interval with a control image"),
    Row("manifest", "a ControlNet entry naming a component that is not there",
        lambda c: _control_manifest(c, _set(["controlnets", 1, "component"], "controlnet_7")),
        ManifestError, "ControlNet 1 must be the component 'controlnet_1'"),
    Row("manifest", "unet.residuals the UNet graph does not take",
        lambda c: _control_manifest(c, _set(["unet", "residuals"], [[32, 1]])),
        ManifestError, "unet.residuals describes 1 residuals but the UNet graph takes"),
    Row("conversion", "empty calibration file",
        lambda c: (c.tmp / "p.txt").write_text("# nothing\n") and c.convert(
            c.ckpt, "-o", c.tmp / "out", "--precision", "int8", "--int8-method", "static",
            "--calibration", c.tmp / "p.txt"), ConversionError, "no prompts"),
]


@pytest.fixture(scope="module")
def pipe(models) -> Pipeline:
    return Pipeline.load(models.bundle("tiny-sd1"))


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.kind}: {r.what}" for r in ROWS])
def test_bad_input(row: Row, models, pipe, tmp_path):
    ctx = Ctx(models, pipe, tmp_path)
    if row.error is None:
        row.act(ctx)
        return
    with pytest.raises(row.error, match=row.match):
        row.act(ctx)


def table() -> str:
    lines = ["# Bad inputs and what they get", "",
             "Generated from `tests/test_bad_inputs.py` (`python -m tests.test_bad_inputs`); "
             "every row is a test.", "",
             "| # | kind | bad input | outcome | the message says |", "|---|---|---|---|---|"]
    for k, r in enumerate(ROWS, 1):
        outcome = f"`{r.error.__name__}`" if r.error else "handled"
        lines.append(f"| {k} | {r.kind} | {r.what} | {outcome} | "
                     f"{r.match.replace('|', ' or ')} |")
    return "\n".join(lines) + "\n"


def test_the_table_in_tests_is_current():
    assert len(ROWS) >= 30 and len({r.what for r in ROWS}) == len(ROWS)
    assert (Path(__file__).with_name("BAD_INPUTS.md")).read_text() == table()


if __name__ == "__main__":
    Path(__file__).with_name("BAD_INPUTS.md").write_text(table())
