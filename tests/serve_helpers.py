"""A live `edge-sdk serve` in a subprocess, for tests and benches: started on a free port
(`--port 0`, the port read from its log), stopped with SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

LISTENING = re.compile(r"listening on (http://[^ ]+)")


class LiveServer:
    """`edge-sdk serve ARGS` running; `url` is its base URL, `log` its log file."""

    def __init__(self, args: list[str], log: Path, timeout: float = 120) -> None:
        self.log = log
        self._out = open(log, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "serve",
                                      "--port", "0", *args], stdout=self._out,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not (m := LISTENING.search(log.read_text(errors="replace"))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.url = m.group(1)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def request(self, method: str, path: str, body: Any = None, *, key: str | None = None,
                headers: dict[str, str] | None = None, raw: bytes | None = None,
                timeout: float = 120) -> tuple[int, dict[str, str], Any]:
        """(status, headers with lower-case names, parsed JSON body) of one request."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key
                                                 else {}), **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, _lower(r.headers), json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, _lower(e.headers), json.loads(e.read() or b"null")


def png_b64(image: Image.Image | np.ndarray) -> str:
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}
