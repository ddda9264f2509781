"""The bundles a server chooses from: the subfolders of a models folder, by name.

A request names a model by its folder name (or A1111's title, `name [hash]`); nothing a
client sends is ever joined to a path, so `../x` is simply a name that is not there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .. import names as N
from ..errors import BundleError, UnknownModelError
from ..manifest import Manifest
from ..models import DEFAULT_MODEL, SHIPPED_MODELS, shipped_bundle

HASH_CHARS = 10  # A1111's short hash: the first 10 hex digits of the sha256
SHOWN_CHARS = 200  # of an unknown name, in its error


@dataclass(frozen=True)
class ModelEntry:
    """One bundle: its name, folder, and the sha256 of its manifest (which holds every
    file's sha256, so it identifies the bundle's contents)."""

    name: str
    path: Path
    sha256: str

    @property
    def short_hash(self) -> str:
        return self.sha256[:HASH_CHARS]

    @property
    def title(self) -> str:  # A1111's `sd_model_checkpoint` spelling
        return f"{self.name} [{self.short_hash}]"


class Registry:
    """Bundles by name: `models_dir`'s subfolders holding a manifest.json, or, without a
    folder, the shipped models."""

    def __init__(self, models_dir: str | Path | None = None) -> None:
        self.models_dir = Path(models_dir) if models_dir is not None else None
        found: dict[str, Path] = {}
        if self.models_dir is None:
            found = {n: p for n in SHIPPED_MODELS if (p := shipped_bundle(n)) is not None}
        elif not self.models_dir.is_dir():
            raise BundleError(f"--models {str(self.models_dir)!r} is not a folder; give a "
                              "folder whose subfolders are bundles")
        else:
            found = {p.name: p for p in sorted(self.models_dir.iterdir())
                     if (p / N.MANIFEST_FILE).is_file()}
        if not found:
            where = str(self.models_dir) if self.models_dir else "the shipped models"
            raise BundleError(f"no bundles in {where}: each model is a subfolder holding a "
                              "manifest.json (made by edge-convert)")
        self.entries = {name: ModelEntry(name, path.resolve(), _sha256(path / N.MANIFEST_FILE))
                        for name, path in found.items()}
        self._manifests: dict[str, Manifest] = {}

    def manifest(self, entry: ModelEntry) -> Manifest:
        """An entry's manifest, read on first use, once."""
        if entry.name not in self._manifests:
            self._manifests[entry.name] = Manifest.load(entry.path)
        return self._manifests[entry.name]

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: object) -> ModelEntry:
        """The entry a client's `model` names: a folder name, or A1111's title; an
        UnknownModelError listing the names otherwise."""
        if isinstance(name, str):
            if name in self.entries:
                return self.entries[name]
            for entry in self.entries.values():
                if name in (entry.title, entry.short_hash, entry.sha256):
                    return entry
        shown = name if isinstance(name, str) and len(name) <= SHOWN_CHARS else \
            type(name).__name__
        raise UnknownModelError(f"model {shown!r} is not on this server; choose one of "
                                f"{self.names} (GET /v1/models or /sdapi/v1/sd-models)")

    def default(self, name: str | None) -> ModelEntry:
        """The model loaded at start: `name` (--model), else the shipped default when there,
        else the first by name."""
        if name is not None:
            return self.get(name)
        return self.entries.get(DEFAULT_MODEL) or next(iter(self.entries.values()))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
