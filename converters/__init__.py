"""edge-convert: diffusers checkpoints -> edge-sdk bundles. Needs the `[convert]` extra."""

__version__ = "0.1.0"
