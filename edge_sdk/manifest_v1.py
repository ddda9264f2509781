"""Format 1 manifests, migrated to the current format when read.

Format 1 kept the decoder stages, the TFLite sizes and the size multiple in an untyped
`extra` dict, had one tokenizer with no checksum, and named components without a kind. The
migration moves each into its typed place; what format 1 never recorded (the tokenizer's
size and sha256) stays unknown, and the bundle loads with one warning saying how to get it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from . import names

log = logging.getLogger(__name__)

# format 1's `extra` keys
_STAGES, _SIZES, _MULTIPLE = "vae_decoder_stages", "tflite_sizes", "size_multiple"


def migrate(d: dict[str, Any], r: Any) -> dict[str, Any]:
    """A format-1 manifest dict as format 2 (the input is not modified)."""
    d = copy.deepcopy(d)
    extra = d.get("extra") if isinstance(d.get("extra"), dict) else {}
    stages = extra.pop(_STAGES, None)
    comps = r.get(d, "components", dict)
    stage_roles = {st.get("component") for st in (stages if isinstance(stages, list) else [])
                   if isinstance(st, dict) and isinstance(st.get("component"), str)}
    for role, c in comps.items():
        if isinstance(c, dict):
            c.setdefault("kind", names.VAE_DECODER_STAGE if role in stage_roles else role)
    vae, unet = r.get(d, "vae", dict), r.get(d, "unet", dict)
    if stages is not None:
        vae["decoder_stages"] = stages
    unet.setdefault(_MULTIPLE, extra.pop(_MULTIPLE, vae.get("scale_factor")))
    if _SIZES in extra:
        d["static_sizes"] = extra.pop(_SIZES)
    d["tokenizers"] = {names.TOKENIZER: r.get(d, "tokenizer", dict)}
    del d["tokenizer"]
    d["extra"] = extra
    log.warning("%s: a format-1 bundle, read by migration; its tokenizer has no checksum, so "
                "it is not verified at load. To upgrade, %s", r.where, names.RECONVERT_HINT)
    return d
