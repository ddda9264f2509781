"""The runtime never imports torch, diffusers, transformers or converters: a complete
generation in a subprocess where importing them fails."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import needs_convert

ROOT = Path(__file__).resolve().parents[1]

BLOCKED_RUN = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = ("torch", "diffusers", "transformers", "converters")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    from edge_sdk import Pipeline
    pipe = Pipeline.load(sys.argv[1])
    image = pipe("a blue star on a yellow background", steps=4, seed=11)
    arr = np.asarray(image)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"size": image.size, "std": float(arr.std()), "loaded": loaded}))
""")


@needs_convert
def test_generation_with_torch_blocked(models, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(BLOCKED_RUN)
    proc = subprocess.run([sys.executable, str(script), str(models.bundle("tiny-sd1"))],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["size"] == [64, 64]
    assert out["std"] > 1.0  # a real image, not a constant
    assert out["loaded"] == []


def test_import_edge_sdk_with_torch_blocked():
    """Needs no bundle: importing every runtime module must not reach for torch & co."""
    code = BLOCKED_RUN.split("import numpy as np")[0] + textwrap.dedent("""
        import pkgutil, importlib, importlib.util, edge_sdk
        serve = importlib.util.find_spec("starlette") is not None  # the [serve] extra
        for m in pkgutil.walk_packages(edge_sdk.__path__, "edge_sdk.",
                                       onerror=lambda name: None):
            if serve or not m.name.startswith("edge_sdk.serve"):
                importlib.import_module(m.name)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
