"""A device app that asks a board running `edge-sdk serve` for an image, with progress.

    edge-sdk serve --host 0.0.0.0 --api-key-file key.txt          # on the board
    python examples/iot_client.py --server http://board:7860 --key-file key.txt \
        "a red circle on a blue background" -o doorbell.png       # on the device

Standard library only (a sensor hub or a home-automation script has no `requests`): one
POST to AUTOMATIC1111's /sdapi/v1/txt2img, while a second thread polls /sdapi/v1/progress
and prints the step; a full server (429) is retried after the Retry-After it names; the PNG
is written atomically and carries A1111's generation parameters. Any A1111 client
(webuiapi, Open WebUI, Home Assistant's integrations) or OpenAI client works the same way.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

RETRIES = 5  # a full queue (HTTP 429) is tried again this many times


def call(server: str, path: str, key: str | None, body: dict[str, Any] | None = None,
         timeout: float = 600) -> dict[str, Any]:
    """One JSON request; a full queue is waited out (Retry-After) and tried again."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    for attempt in range(RETRIES + 1):
        req = urllib.request.Request(server + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code != 429 or attempt == RETRIES:
                detail = json.loads(e.read() or b"{}").get("detail", "")
                raise SystemExit(f"{path}: HTTP {e.code}: {detail}") from None
            time.sleep(int(e.headers.get("Retry-After", "1")))
    raise AssertionError("unreachable")


def watch(server: str, key: str | None, stop: threading.Event) -> None:
    """Print the running generation's step until `stop` is set."""
    last = None
    while not stop.wait(0.25):
        state = call(server, "/sdapi/v1/progress?skip_current_image=true", key)["state"]
        step = (state["sampling_step"], state["sampling_steps"])
        if step != last and step[1]:
            print(f"step {step[0]}/{step[1]}", file=sys.stderr)
            last = step


def generate(server: str, key: str | None, prompt: str, out: Path, **params: Any) -> dict:
    """Generate one image and write it to `out`; returns A1111's `info` for it."""
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(server, key, stop), daemon=True)
    watcher.start()
    try:
        result = call(server, "/sdapi/v1/txt2img", key, {"prompt": prompt, **params})
    finally:
        stop.set()
        watcher.join()
    png = base64.b64decode(result["images"][0])
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:  # written whole, then renamed: never a half file
        f.write(png)
    os.replace(tmp, out)
    return json.loads(result["info"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("-o", "--output", type=Path, default=Path("out.png"))
    ap.add_argument("--server", default="http://127.0.0.1:7860")
    ap.add_argument("--key-file", default=None, help="the server's API key, in a file")
    ap.add_argument("--seed", type=int, default=-1)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    key = Path(args.key_file).read_text().strip() if args.key_file else None
    params = {"seed": args.seed, **({"steps": args.steps} if args.steps else {})}
    info = generate(args.server.rstrip("/"), key, args.prompt, args.output, **params)
    print(f"{args.output}: {info['width']}x{info['height']}, seed {info['seed']}, "
          f"model {info['sd_model_name']}")


if __name__ == "__main__":
    main()
