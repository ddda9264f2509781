"""Reading a manifest dict into the typed Manifest: every field checked once, here, with the
path of whatever is wrong; older format versions are migrated first (manifest_v1)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from . import names
from .contracts import CONTRACTS, TextEncoderIO, UnetIO
from .errors import ManifestError
from .manifest_control import check_controlnets, read_controlnets, read_residuals
from .manifest import (ComponentSpec, DecoderStage, Defaults, FileEntry, Manifest,
                       PreviewLayer, SourceInfo, TensorSpec, TextSpec, TokenizerSpec, UnetSpec,
                       VaeSpec,
                       check_relative_name, preview_chain_problem)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def read_manifest(data: Any, where: str) -> Manifest:
    r = _Reader(where)
    d = r.obj(data, "")
    _refuse_nan(d, "", where)
    if r.get(d, "format", str) != names.BUNDLE_FORMAT:
        raise ManifestError(f"{where}: 'format' is not {names.BUNDLE_FORMAT!r}; "
                            "this is not an edge-sdk bundle manifest")
    version = r.get(d, "format_version", int)
    migrated_from = version if version == 1 else None
    if version == 1:
        from .manifest_v1 import migrate
        d = migrate(d, r)
    elif version != names.FORMAT_VERSION:
        raise ManifestError(
            f"{where}: format_version {version} is not supported by this runtime (it reads "
            f"versions 1 and {names.FORMAT_VERSION}); upgrade edge-sdk or re-convert the "
            "bundle")
    components = {n: _component(r, n, c) for n, c in r.get(d, "components", dict).items()}
    missing = [c for c in names.REQUIRED_COMPONENTS if c not in components]
    if missing:
        raise ManifestError(f"{where}: components {missing} are missing; a bundle needs "
                            f"{list(names.REQUIRED_COMPONENTS)}")
    for role in names.COMPONENTS:  # the standard roles hold the networks of their name
        kind = names.ROLE_KINDS.get(role, role)
        if role in components and components[role].kind != kind:
            raise ManifestError(f"{where}: component {role!r} is of kind "
                                f"{components[role].kind!r}, not {kind!r}; re-convert the bundle")
    sched = _scheduler(r, r.get(d, "scheduler", dict))
    m = Manifest(
        family=r.get(d, "family", str), variant=r.get(d, "variant", str),
        source=_source(r, r.get(d, "source", dict)),
        converter=r.get(d, "converter", dict), components=components,
        tokenizers=_tokenizers(r, r.get(d, "tokenizers", dict), components,
                               migrated_from is not None),
        scheduler=sched, prediction_type=r.choice(d, "prediction_type", PREDICTION_TYPES),
        vae=_vae(r, r.get(d, "vae", dict), components), unet=_unet(r, r.get(d, "unet", dict)),
        defaults=_defaults(r, r.get(d, "defaults", dict)),
        static_sizes=_static_sizes(r, d.get("static_sizes")),
        text=_text(r, d.get("text", {}), components),
        controlnets=read_controlnets(r, d.get("controlnets", []), components),
        format_version=names.FORMAT_VERSION, migrated_from=migrated_from,
        extra=d["extra"] if isinstance(d.get("extra"), dict) else {})
    _check_optional_parts(m, where)
    return m


def _check_optional_parts(m: Manifest, where: str) -> None:
    """The fields that describe an optional component agree with the components."""
    tiny = names.VAE_DECODER_TINY in m.components
    if tiny != bool(m.vae.tiny_scaling_factor):
        raise ManifestError(f"{where}: vae.tiny_scaling_factor is {m.vae.tiny_scaling_factor} "
                            f"but the bundle {'has a' if tiny else 'has no'} "
                            f"{names.VAE_DECODER_TINY!r} component; re-convert the bundle")
    shallow = m.components.get(names.UNET_SHALLOW)
    deep = {t.name for t in m.components[names.UNET].outputs} & {UnetIO.DEEP_FEATURES}
    if shallow is not None and not (deep and UnetIO.DEEP_FEATURES in shallow.input_names()
                                    and _channels(m.components[names.UNET], True)
                                    == _channels(shallow, False)):
        raise ManifestError(f"{where}: the bundle has a {names.UNET_SHALLOW!r} component but "
                            f"the UNet graph does not output (or it does not take) "
                            f"{UnetIO.DEEP_FEATURES!r} of the same channels; re-convert the "
                            "bundle")
    _check_text(m, where)
    check_controlnets(m, where)
    takes = "timestep_cond" in m.components[names.UNET].input_names()
    if takes != bool(m.unet.time_cond_proj_dim):
        raise ManifestError(f"{where}: unet.time_cond_proj_dim is {m.unet.time_cond_proj_dim} "
                            f"but the UNet graph {'takes a' if takes else 'takes no'} "
                            "timestep_cond input; re-convert the bundle")


def _check_text(m: Manifest, where: str) -> None:
    """The text section agrees with the graphs: a tokenizer of one window length for each
    encoder, the outputs it reads, the encoders' widths making the UNet's context, the
    UNet's added-condition inputs exactly when an encoder's pooled output feeds them."""
    fail = f"{where}: %s; re-convert the bundle"
    toks = {t.text_encoder: t for t in m.tokenizers.values()}
    unfed = [e for e in m.text.encoders if e not in toks]
    if unfed:
        raise ManifestError(fail % f"text encoders {unfed} have no tokenizer")
    if len({toks[e].max_length for e in m.text.encoders}) > 1:
        raise ManifestError(fail % "the text encoders' tokenizers have different lengths")
    need = (TextEncoderIO.HIDDEN_LAYERS if m.text.penultimate else TextEncoderIO.HIDDEN_STATES,)
    widths = []
    for e in m.text.encoders:
        outs = {t.name: t for t in m.components[e].outputs}
        wanted = need + ((TextEncoderIO.TEXT_EMBEDS,) if e == m.text.pooled else ())
        if not all(n in outs for n in wanted):
            raise ManifestError(fail % f"text encoder {e!r} has no {list(wanted)} outputs")
        widths.append(outs[need[0]].shape[-1] if outs[need[0]].shape else None)
    unet = m.components[names.UNET]
    context = next((t.shape[-1] for t in unet.inputs if t.name == UnetIO.CONTEXT and t.shape),
                   None)
    if all(isinstance(w, int) for w in widths) and isinstance(context, int) \
            and sum(widths) != context:  # type: ignore[arg-type]
        raise ManifestError(fail % f"the text encoders' widths {widths} do not make the "
                            f"UNet's context width {context}")
    for tensor in (UnetIO.TEXT_EMBEDS, UnetIO.TIME_IDS):
        takes = tensor in unet.input_names()
        if takes != m.added_conditions:
            raise ManifestError(fail % f"text.pooled is {m.text.pooled!r} but the UNet graph "
                                f"{'takes' if takes else 'does not take'} {tensor!r}")


def _channels(spec: ComponentSpec, output: bool) -> object:
    """The channel dimension of a component's deep-features output (or input)."""
    tensors = spec.outputs if output else spec.inputs
    shape = next((t.shape for t in tensors if t.name == UnetIO.DEEP_FEATURES), ())
    return shape[1] if len(shape) > 1 else None


MAX_TRAIN_TIMESTEPS = 100_000  # SD uses 1,000; the tables are allocated at this length
# scheduler options any of the runtime's schedulers reads, by type: a scheduler swapped in
# at generation time reads them too, so they are checked whatever the bundle's own class
_SCHEDULER_KEYS: dict[str, Any] = {
    "steps_offset": int, "original_inference_steps": int, "solver_order": int,
    "clip_sample": bool, "set_alpha_to_one": bool, "skip_prk_steps": bool,
    "thresholding": bool, "rescale_betas_zero_snr": bool, "use_karras_sigmas": bool,
    "lower_order_final": bool, "clip_sample_range": (int, float),
    "sample_max_value": (int, float), "dynamic_thresholding_ratio": (int, float),
    "timestep_scaling": (int, float), "beta_schedule": str, "prediction_type": str,
    "timestep_spacing": str, "algorithm_type": str, "solver_type": str}


def _scheduler(r: "_Reader", s: dict[str, Any]) -> dict[str, Any]:
    """The diffusers scheduler config: the numbers the schedules are built from, in range,
    and the bundle's own scheduler constructible from it (whatever is wrong in it is a
    ManifestError here, not an IndexError or a huge allocation mid-generation)."""
    from .errors import EdgeSDKError
    from .schedulers import create_scheduler
    pre = "scheduler."
    r.get(s, "_class_name", str, pre)
    n = s.get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_TRAIN_TIMESTEPS:
        raise ManifestError(f"{r.where}: field '{pre}num_train_timesteps' must be a whole "
                            f"number in [2, {MAX_TRAIN_TIMESTEPS}], got {n!r}")
    for key, typ in _SCHEDULER_KEYS.items():
        if s.get(key) is not None:
            r.get(s, key, typ, pre)
            if typ is int and not 0 <= s[key] <= MAX_TRAIN_TIMESTEPS:
                raise ManifestError(f"{r.where}: field '{pre}{key}' is out of range: {s[key]}")
    for key in ("beta_start", "beta_end"):
        if key in s and not 0 < r.num(s, key, pre) < 1:
            raise ManifestError(f"{r.where}: field '{pre}{key}' must be in (0, 1), got {s[key]}")
    trained = s.get("trained_betas")
    if trained is not None and not (isinstance(trained, list) and len(trained) == n and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1
            for b in trained)):
        raise ManifestError(f"{r.where}: field '{pre}trained_betas' must be null or {n} "
                            "numbers in (0, 1)")
    try:
        create_scheduler(None, s, 1)
    except (EdgeSDKError, TypeError, ValueError, KeyError, IndexError, ZeroDivisionError,
            OverflowError) as exc:
        raise ManifestError(f"{r.where}: the scheduler config does not make a scheduler "
                            f"({type(exc).__name__}: {exc}); re-convert the bundle") from exc
    return s


def _source(r: "_Reader", s: dict[str, Any]) -> SourceInfo:
    return SourceInfo(r.get(s, "name", str, "source."), r.get(s, "fingerprint", str, "source."),
                      r.get(s, "pipeline_class", str, "source."),
                      r.get(s, "diffusers_version", (str, type(None)), "source."))


def _vae(r: "_Reader", v: dict[str, Any], components: Mapping[str, ComponentSpec]) -> VaeSpec:
    stages = r.get({"decoder_stages": [], **v}, "decoder_stages", list, "vae.")
    enc = r.get({"encoder_stages": [], **v}, "encoder_stages", list, "vae.")
    if r.num(v, "scaling_factor", "vae.") == 0:
        raise ManifestError(f"{r.where}: field 'vae.scaling_factor' must be > 0, got 0; "
                            "re-convert the bundle")
    return VaeSpec(r.num(v, "scaling_factor", "vae."),
                   r.get(v, "shift_factor", (int, float, type(None)), "vae."),
                   r.pos(v, "latent_channels", "vae."), r.pos(v, "scale_factor", "vae."),
                   r.pos({"attention_chunks": 1, **v}, "attention_chunks", "vae."),
                   tuple(_stage(r, k, st, components) for k, st in enumerate(stages)),
                   _count(r, v, "decoder_channels", "vae."),
                   tuple(_stage(r, k, st, components, "encoder") for k, st in enumerate(enc)),
                   _tiny_scaling(r, v), _latent_rgb(r, v),
                   _preview_decoder(r, v))


def _latent_rgb(r: "_Reader", v: dict[str, Any]) -> tuple[tuple[float, ...], ...]:
    rows = r.get({"latent_rgb": [], **v}, "latent_rgb", list, "vae.")
    if not all(_finite_list(row, 3) for row in rows) or (
            rows and len(rows) != r.pos(v, "latent_channels", "vae.") + 1):
        raise ManifestError(f"{r.where}: field 'vae.latent_rgb' must be latent_channels + 1 "
                            "rows of 3 finite numbers; re-convert the bundle")
    return tuple(tuple(float(x) for x in row) for row in rows)


def _preview_decoder(r: "_Reader", v: dict[str, Any]) -> tuple[PreviewLayer, ...]:
    layers = r.get({"preview_decoder": [], **v}, "preview_decoder", list, "vae.")
    if not layers:
        return ()
    out = []
    for layer in layers:
        sh = layer.get("shape") if isinstance(layer, dict) else None
        w, b = (layer.get(k) if isinstance(layer, dict) else None for k in ("weight", "bias"))
        ok = isinstance(sh, list) and len(sh) == 4 and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in sh) \
            and _finite_list(w, math.prod(sh)) and _finite_list(b, sh[0])
        if not ok:
            raise ManifestError(f"{r.where}: field 'vae.preview_decoder' must be layers of "
                                "{shape: [out, in, k, k], weight: out*in*k*k finite numbers, "
                                "bias: out finite numbers}; re-convert the bundle")
        out.append(PreviewLayer(tuple(sh), tuple(map(float, w)), tuple(map(float, b))))
    problem = preview_chain_problem([x.shape for x in out], r.pos(v, "latent_channels", "vae."))
    if problem:
        raise ManifestError(f"{r.where}: field 'vae.preview_decoder': {problem}; re-convert "
                            "the bundle")
    return tuple(out)


def _finite_list(xs: Any, n: int) -> bool:
    return isinstance(xs, list) and len(xs) == n and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        for x in xs)


def _tiny_scaling(r: "_Reader", v: dict[str, Any]) -> float:
    value = r.get({"tiny_scaling_factor": 0.0, **v}, "tiny_scaling_factor", (int, float),
                  "vae.")
    if isinstance(value, bool) or not math.isfinite(float(min(value, 1e300))) or value < 0:
        raise ManifestError(f"{r.where}: field 'vae.tiny_scaling_factor' must be a finite "
                            f"number >= 0, got {value!r}; re-convert the bundle")
    return float(value)


def _stage(r: "_Reader", k: int, st: Any, components: Mapping[str, ComponentSpec],
           half: str = "decoder") -> DecoderStage:
    def count(v: Any, lo: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo
    kind = names.VAE_DECODER_STAGE if half == "decoder" else names.VAE_ENCODER_STAGE
    down = st.get("down", 1) if isinstance(st, dict) else None
    ok = (isinstance(st, dict) and isinstance(st.get("component"), str)
          and st["component"] in components
          and components[st["component"]].kind == kind
          and (st.get("groups") is None or count(st.get("groups"), 1))
          and count(st.get("halo"), 0) and st.get("scale") in (1, 2)
          and down in (1, 2) and not (down == 2 and st.get("scale") == 2)
          and st["halo"] % down == 0
          and isinstance(st.get("skips"), list)
          and all(count(j, -1) and j < k for j in st["skips"])
          and isinstance(st.get("tiled"), bool)
          and isinstance(st.get("eps"), (int, float)) and not isinstance(st["eps"], bool)
          and math.isfinite(st["eps"]) and st["eps"] > 0)
    if not ok:
        raise ManifestError(f"{r.where}: vae.{half}_stages[{k}] is malformed ({st!r}); "
                            "re-convert the bundle")
    return DecoderStage(st["component"], st.get("groups"), st["halo"], st["scale"],
                        tuple(st["skips"]), st["tiled"], float(st["eps"]), int(down))


def _unet(r: "_Reader", u: dict[str, Any]) -> UnetSpec:
    u = {"attention_chunks": 1, **u}
    levels = r.get({"attention_levels": [], **u}, "attention_levels", list, "unet.")
    if not all(isinstance(x, list) and len(x) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in x)
            for x in levels):
        raise ManifestError(f"{r.where}: field 'unet.attention_levels' must be a list of "
                            f"[downscale, heads] pairs, got {levels!r}; re-convert the bundle")
    return UnetSpec(r.pos(u, "in_channels", "unet."), r.pos(u, "sample_size", "unet."),
                    r.pos(u, "cross_attention_dim", "unet."),
                    r.pos(u, "attention_chunks", "unet."), r.pos(u, "size_multiple", "unet."),
                    tuple((d, h) for d, h in levels), _count(r, u, "base_channels", "unet."),
                    _count(r, u, "time_cond_proj_dim", "unet."), read_residuals(r, u))


def _count(r: "_Reader", d: Mapping[str, Any], key: str, pre: str) -> int:
    """An optional whole number >= 0 (0: not recorded)."""
    value = r.get({key: 0, **d}, key, int, pre)
    if value < 0:
        raise ManifestError(f"{r.where}: field '{pre}{key}' must be >= 0, got {value}")
    return value


def _defaults(r: "_Reader", df: dict[str, Any]) -> Defaults:
    return Defaults(r.pos(df, "steps", "defaults."), r.num(df, "guidance_scale", "defaults."),
                    r.pos(df, "width", "defaults."), r.pos(df, "height", "defaults."))


def _static_sizes(r: "_Reader", sizes: Any) -> tuple[tuple[int, int], ...] | None:
    if sizes is None:
        return None
    if not (isinstance(sizes, list) and sizes and all(
            isinstance(hw, list) and len(hw) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw)
            for hw in sizes)):
        raise ManifestError(f"{r.where}: field 'static_sizes' must be a list of [height, width] "
                            f"pairs, got {sizes!r}; re-convert the bundle")
    return tuple((h, w) for h, w in sizes)


def _text(r: "_Reader", t: Any, components: Mapping[str, ComponentSpec]) -> TextSpec:
    """The text conditioning: its encoders are text encoders of this bundle, each once."""
    pre = "text."
    t = r.obj(t, "field 'text'")
    encoders = r.get({"encoders": [names.TEXT_ENCODER], **t}, "encoders", list, pre)
    if not encoders or not all(isinstance(e, str) for e in encoders) \
            or len(set(encoders)) != len(encoders) or any(
                e not in components or components[e].kind != names.TEXT_ENCODER
                for e in encoders):
        raise ManifestError(f"{r.where}: field '{pre}encoders' must list this bundle's text "
                            f"encoders, each once, got {encoders!r}; re-convert the bundle")
    pooled = r.get({"pooled": None, **t}, "pooled", (str, type(None)), pre)
    if pooled is not None and pooled not in encoders:
        raise ManifestError(f"{r.where}: field '{pre}pooled' {pooled!r} is not one of "
                            f"{pre}encoders {encoders}; re-convert the bundle")
    flags = {k: r.get({k: False, **t}, k, bool, pre)
             for k in ("penultimate", "force_zeros_for_empty_prompt")}
    return TextSpec(tuple(encoders), pooled=pooled, **flags)


def _tokenizers(r: "_Reader", toks: dict[str, Any], components: Mapping[str, ComponentSpec],
                migrated: bool) -> dict[str, TokenizerSpec]:
    if names.TOKENIZER not in toks:
        raise ManifestError(f"{r.where}: required field 'tokenizers.{names.TOKENIZER}' is "
                            "missing; re-convert the bundle with a matching edge-convert")
    out = {}
    for role, t in toks.items():
        pre = f"tokenizers.{role}."
        t = r.obj(t, pre)
        encoder = r.get({"text_encoder": names.TEXT_ENCODER, **t}, "text_encoder", str, pre)
        if encoder not in components or components[encoder].kind != names.TEXT_ENCODER:
            raise ManifestError(f"{r.where}: {pre}text_encoder {encoder!r} is not a text "
                                "encoder of this bundle")
        hashed = not migrated  # format 1 recorded no tokenizer checksum
        out[role] = TokenizerSpec(
            check_relative_name(r.get(t, "file", str, pre), r.where),
            r.pos(t, "max_length", pre), r.get(t, "pad_token", str, pre),
            *(r.get(t, k, int, pre) for k in ("pad_token_id", "bos_token_id", "eos_token_id")),
            size=r.get(t, "size", int, pre) if hashed else None,
            sha256=r.get(t, "sha256", str, pre) if hashed else None, text_encoder=encoder)
    return out


def _component(r: "_Reader", name: str, c: Any) -> ComponentSpec:
    pre = f"components.{name}."
    c = r.obj(c, pre)
    files = tuple(FileEntry(check_relative_name(r.get(f, "path", str, pre + "files[]."), r.where),
                            r.get(f, "size", int, pre + "files[]."),
                            r.get(f, "sha256", str, pre + "files[]."))
                  for f in (r.obj(x, pre + "files[]") for x in r.get(c, "files", list, pre)))
    listed = {f.path for f in files}
    path = check_relative_name(r.get(c, "path", str, pre), r.where)
    weight_map = r.get({"weight_map": None, **c}, "weight_map", (str, type(None)), pre)
    for key, value in (("path", path), ("weight_map", weight_map)):
        if value is not None and value not in listed:
            raise ManifestError(f"{r.where}: {pre}{key} {value!r} is not listed in {pre}files")
    return ComponentSpec(name=name, kind=r.choice(c, "kind", tuple(CONTRACTS), pre),
                         format=r.choice(c, "format", names.BACKEND_FORMATS, pre),
                         path=path, precision=r.get(c, "precision", str, pre), files=files,
                         inputs=_tensors(r, c, "inputs", pre),
                         outputs=_tensors(r, c, "outputs", pre), weight_map=weight_map)


def _tensors(r: "_Reader", c: dict[str, Any], key: str, pre: str) -> tuple[TensorSpec, ...]:
    out = []
    for s in r.get(c, key, list, pre):
        s = r.obj(s, pre + key)
        shape = r.get(s, "shape", list, pre + key + ".")
        if not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in shape):
            raise ManifestError(f"{r.where}: {pre}{key}.shape must hold ints or axis names")
        out.append(TensorSpec(r.get(s, "name", str, pre + key + "."),
                              r.get(s, "dtype", str, pre + key + "."), tuple(shape)))
    return tuple(out)


def _refuse_nan(value: Any, path: str, where: str) -> None:
    """NaN means nothing in a manifest (infinities do: diffusers writes -Infinity)."""
    if isinstance(value, float) and math.isnan(value):
        raise ManifestError(f"{where}: field '{path}' is NaN; re-convert the bundle")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_nan(v, f"{path}.{k}" if path else str(k), where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_nan(v, f"{path}[{i}]", where)


class _Reader:
    """Typed field access that reports the manifest path of whatever is wrong."""

    def __init__(self, where: str) -> None:
        self.where = where

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ManifestError(f"{self.where}: {path or 'the top level'} must be a JSON object")
        return value

    def get(self, d: Mapping[str, Any], key: str, typ: Any, prefix: str = "") -> Any:
        if key not in d:
            raise ManifestError(f"{self.where}: required field '{prefix}{key}' is missing; "
                                "re-convert the bundle with a matching edge-convert")
        value = d[key]
        bad_bool = isinstance(value, bool) and typ in (int, float, (int, float))
        if bad_bool or not isinstance(value, typ):
            raise ManifestError(f"{self.where}: field '{prefix}{key}' has the wrong type "
                                f"({type(value).__name__}: {value!r})")
        return value

    def num(self, d: Mapping[str, Any], key: str, prefix: str = "") -> float:
        try:
            value = float(self.get(d, key, (int, float), prefix))
        except OverflowError:  # an integer beyond any float
            value = math.inf
        if not math.isfinite(value) or value < 0:
            raise ManifestError(f"{self.where}: field '{prefix}{key}' must be a finite number "
                                f">= 0, got {value}")
        return value

    def pos(self, d: Mapping[str, Any], key: str, prefix: str = "") -> int:
        value = self.get(d, key, int, prefix)
        if value <= 0:
            raise ManifestError(f"{self.where}: field '{prefix}{key}' must be > 0, got {value}")
        return value

    def choice(self, d: Mapping[str, Any], key: str, allowed: tuple[str, ...],
               prefix: str = "") -> str:
        value = self.get(d, key, str, prefix)
        if value not in allowed:
            raise ManifestError(f"{self.where}: field '{prefix}{key}' is {value!r}; this runtime "
                                f"accepts {list(allowed)}")
        return value
