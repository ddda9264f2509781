"""An edge app's shape: one loaded pipeline, a job queue, a worker thread, a local HTTP API.

    python examples/iot_service.py [--model BUNDLE] [--port 8808] [--out images/]

    curl -s localhost:8808/generate -d '{"prompt": "a red circle on a blue background"}'
    curl -s localhost:8808/jobs/1          # {"state": "running", "step": 7, "steps": 20, ...}
    curl -s localhost:8808/health

Standard library only, besides edge_sdk. The model is loaded once; jobs run one at a time in
a worker thread (a small board has the memory for one generation), each PNG is written
atomically, and progress is reported per step. Bad requests get HTTP 400 with the SDK's
error message before anything is queued; a job that fails anyway (any exception) is marked
failed with its error, and the worker goes on to the next one. /health tells whether the
worker is alive.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edge_sdk import GenerationConfig, Pipeline
from edge_sdk.errors import EdgeSDKError
from edge_sdk.image import save_png

log = logging.getLogger("iot_service")
ALLOWED = {"prompt", "negative_prompt", "steps", "guidance_scale", "seed", "width", "height",
           "scheduler"}
MAX_BODY = 64 * 1024  # bytes: a request is a prompt and a few numbers


class Service:
    """Owns the pipeline, the queue and the job table; safe to call from HTTP threads."""

    def __init__(self, pipe: Pipeline, out_dir: Path) -> None:
        self.pipe, self.out_dir = pipe, out_dir
        self.jobs: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="generator", daemon=True)
        self._worker.start()

    def submit(self, request: Any) -> int:
        """Queue a request after checking it whole: ValueError / EdgeSDKError say why not."""
        if not isinstance(request, dict):
            raise ValueError("the body must be a JSON object such as {\"prompt\": \"...\"}")
        unknown = set(request) - ALLOWED
        if unknown or not isinstance(request.get("prompt"), str):
            raise ValueError(f"need a 'prompt' string; unknown fields: {sorted(unknown)}")
        params = {k: v for k, v in request.items() if k != "prompt"}
        # everything generate() would refuse, refused now (prompt lengths, parameters, and
        # whether it fits the memory available), not after the job was accepted
        self.pipe.check(request["prompt"], GenerationConfig(**params))
        with self._lock:
            job_id = next(self._ids)
            self.jobs[job_id] = {"state": "queued", "request": request, "step": 0}
        self._queue.put(job_id)
        return job_id

    def status(self, job_id: int) -> dict[str, Any] | None:
        with self._lock:
            job = self.jobs.get(job_id)
            return None if job is None else {k: v for k, v in job.items() if k != "request"}

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def stop(self) -> None:
        self._queue.put(None)
        self._worker.join()

    def _work(self) -> None:
        while (job_id := self._queue.get()) is not None:
            job = self.jobs[job_id]
            req = dict(job["request"])

            def progress(step: int, total: int, _latents: Any, job: dict = job) -> bool:
                with self._lock:
                    job.update(step=step + 1, steps=total)
                return True  # returning False would cancel the generation

            with self._lock:
                job["state"] = "running"
            try:
                prompt = req.pop("prompt")
                result = self.pipe.generate(prompt, GenerationConfig(**req), callback=progress)
                path = save_png(result.images[0], self.out_dir / f"job-{job_id}.png",
                                result.parameters)
                with self._lock:
                    job.update(state="done", path=str(path))
                log.info("job %d done: %s", job_id, path)
            except Exception as exc:  # noqa: BLE001 - whatever it was, report it, keep serving
                with self._lock:
                    job.update(state="failed", error=f"{type(exc).__name__}: {exc}")
                log.warning("job %d failed: %s", job_id, exc,
                            exc_info=not isinstance(exc, EdgeSDKError))


def make_handler(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != "/generate":
                return self._reply(404, {"error": "POST /generate"})
            try:
                size = int(self.headers.get("Content-Length", 0))
                if not 0 <= size <= MAX_BODY:
                    return self._reply(413, {"error": f"the body is limited to {MAX_BODY} bytes"})
                job_id = service.submit(json.loads(self.rfile.read(size) or b"{}"))
            except (ValueError, ArithmeticError, RecursionError, EdgeSDKError) as exc:
                # (JSONDecodeError is a ValueError; a deeply nested body a RecursionError)
                return self._reply(400, {"error": str(exc)})
            self._reply(202, {"job": job_id})

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                alive = service.alive
                return self._reply(200 if alive else 503, {
                    "ok": alive, "model": service.pipe.manifest.source.name})
            if self.path.startswith("/jobs/") and self.path[6:].isdigit():
                status = service.status(int(self.path[6:]))
                return self._reply(200 if status else 404, status or {"error": "no such job"})
            self._reply(404, {"error": "GET /health or /jobs/<id>"})

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug(fmt, *args)

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    ap.add_argument("--port", type=int, default=8808)
    ap.add_argument("--out", default="images")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    service = Service(Pipeline.load(args.model), out)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(service))
    log.info("listening on http://127.0.0.1:%d", args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.stop()


if __name__ == "__main__":
    main()
