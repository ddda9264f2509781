"""The manifest's ControlNet parts, read and checked against the graphs: the UNet's
residual inputs (`unet.residuals`) and the bundle's ControlNets (`controlnets`)."""

from __future__ import annotations

from typing import Any, Mapping

from . import names
from .contracts import UnetIO, residual_pairs
from .errors import ManifestError
from .manifest import ComponentSpec, ControlNetSpec, Manifest

MAX_DOWNSCALE = 4096


def read_residuals(r: Any, u: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """unet.residuals: [channels, downscale] pairs (empty: the UNet takes none)."""
    pairs = r.get({"residuals": [], **u}, "residuals", list, "unet.")
    if not all(isinstance(x, list) and len(x) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_DOWNSCALE * 16
            for v in x) for x in pairs):
        raise ManifestError(f"{r.where}: field 'unet.residuals' must be a list of "
                            f"[channels, downscale] pairs, got {pairs!r}; re-convert the "
                            "bundle")
    return tuple((c, d) for c, d in pairs)


def read_controlnets(r: Any, data: Any, components: Mapping[str, ComponentSpec]
                     ) -> tuple[ControlNetSpec, ...]:
    """controlnets: one entry per ControlNet, in role order (controlnet_0, controlnet_1 ...),
    each naming a component of kind controlnet."""
    if not isinstance(data, list):
        raise ManifestError(f"{r.where}: field 'controlnets' must be a list")
    out = []
    for i, c in enumerate(data):
        pre = f"controlnets[{i}]."
        c = r.obj(c, pre)
        role = r.get(c, "component", str, pre)
        if role != names.controlnet_role(i) or role not in components \
                or components[role].kind != names.CONTROLNET:
            raise ManifestError(f"{r.where}: field '{pre}component' is {role!r}; ControlNet "
                                f"{i} must be the component {names.controlnet_role(i)!r} of "
                                f"kind {names.CONTROLNET!r}; re-convert the bundle")
        out.append(ControlNetSpec(role, r.get(c, "name", str, pre),
                                  r.get(c, "fingerprint", str, pre),
                                  r.pos({"conditioning_channels": 3, **c},
                                        "conditioning_channels", pre),
                                  r.get({"global_pool": False, **c}, "global_pool", bool, pre)))
    listed = {c.component for c in out}
    stray = [n for n, s in components.items() if s.kind == names.CONTROLNET and n not in listed]
    if stray:
        raise ManifestError(f"{r.where}: components {stray} are ControlNets the 'controlnets' "
                            "field does not list; re-convert the bundle")
    return tuple(out)


def check_controlnets(m: Manifest, where: str) -> None:
    """The UNet takes exactly the residuals unet.residuals describes, and each ControlNet
    makes them, with the UNet's channels."""
    fail = f"{where}: %s; re-convert the bundle"
    pairs = residual_pairs(len(m.unet.residuals) - 1) if m.unet.residuals else []
    unet = {t.name: t for t in m.components[names.UNET].inputs}
    takes = [k for k in unet if k == UnetIO.MID_RESIDUAL or k.startswith(
        UnetIO.down_residual(0)[:-1])]
    want = [name for _, name in pairs]
    if sorted(takes) != sorted(want):
        raise ManifestError(fail % f"unet.residuals describes {len(want)} residuals but the "
                            f"UNet graph takes {len(takes)}")
    if m.controlnets and not m.unet.residuals:
        raise ManifestError(fail % "the bundle has ControlNets but its UNet takes no residuals")
    for c in m.controlnets:
        outs = {t.name: t for t in m.components[c.component].outputs}
        for (name, _), (channels, _) in zip(pairs, m.unet.residuals):
            shape = outs[name].shape if name in outs else None
            if not shape or (isinstance(shape[1], int) and shape[1] != channels):
                raise ManifestError(fail % f"ControlNet {c.component!r} has no output {name!r}"
                                    f" of {channels} channels")
