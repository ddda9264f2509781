"""The ASGI application: routes, the one wrapper every endpoint goes through, and health.

Every endpoint is wrapped by `endpoint()`: credentials checked, the body read within the
limit and parsed, errors turned into JSON in the API's own shape (A1111's or OpenAI's) with
the edge_sdk.errors type and message, never a traceback, and one log line per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..config import GenerationConfig
from ..errors import (AuthenticationError, BusyError, EdgeSDKError, ForbiddenError,
                      InvalidInputError, RequestTimeoutError, RequestTooLargeError,
                      UnavailableError, UnknownModelError)
from ..estimate import check_fits
from ..memory import MODES
from .registry import Registry
from .security import Credentials, Limits, read_body
from .worker import Job, Worker

log = logging.getLogger("edge_sdk.serve")

# the HTTP status of each error type (the first that matches); other EdgeSDKErrors (a bundle
# that fails to load, an inference failure) are the server's: 500, with their type and message
STATUS: tuple[tuple[type[EdgeSDKError], int], ...] = (
    (AuthenticationError, 401), (ForbiddenError, 403), (UnknownModelError, 404),
    (RequestTimeoutError, 408), (RequestTooLargeError, 413), (BusyError, 429),
    (UnavailableError, 503), (InvalidInputError, 422))
MAX_FORM_FILES, MAX_FORM_FIELDS = 4, 64  # OpenAI's edits: an image (or a few), a mask
BODY_TIMEOUT_S = 60  # a body that has not arrived by then holds its connection no longer
DECODES_AT_ONCE = 2  # images decoded side by side (each can be 4096x4096: memory)
LOG_NOTE_CHARS, JSON_ERROR_CHARS = 300, 200
LOWEST_MODE = MODES[-1]  # the planner's mode that needs the least memory
PREVIEW_EVERY = 10  # A1111's show_progress_every_n_steps default
# Host headers a loopback-bound server answers (with any port): other names reach it only
# through a web page's DNS rebinding
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


class ClientGone(Exception):
    """The client closed the connection while its job was queued or running."""


@dataclass
class Server:
    """What the endpoints share."""

    worker: Worker
    registry: Registry
    credentials: Credentials
    limits: Limits
    log_prompts: bool = False
    loopback_only: bool = True  # listening on loopback: Host must name this machine
    # A1111's settings a client may change (POST /sdapi/v1/options)
    options: dict[str, Any] = field(default_factory=lambda: {
        "show_progress_every_n_steps": PREVIEW_EVERY, "CLIP_stop_at_last_layers": 1})
    image_work: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(
        DECODES_AT_ONCE))

    async def decode(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A request's images decoded off the event loop, a few at a time, and only while
        the queue has room (a request that would be refused is refused before)."""
        self.worker.check_room()
        return await self.encode(fn, *args)

    async def encode(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A response's images encoded off the event loop, a few at a time."""
        async with self.image_work:
            return await run_in_threadpool(fn, *args)


Handler = Callable[[Server, Request, Any], Awaitable[Any]]


def endpoint(server: Server, handler: Handler, *, style: str, body: str | None = None,
             auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint around `handler(server, request, payload)`, which returns a JSON-able
    value or a Response. `body`: "json" (an object), "form" (multipart) or None; `style`:
    "a1111" or "openai", the shape of its errors."""
    async def run(request: Request) -> Response:
        t0, note = time.perf_counter(), ""
        try:
            if server.loopback_only:
                _check_host(request.headers.get("host", ""))
            if auth:
                server.credentials.check(request.headers)
            payload = await _payload(request, body, server.limits.max_body)
            out = await handler(server, request, payload)
            response = out if isinstance(out, Response) else JSONResponse(out)
        except ClientGone:
            response, note = Response(status_code=499), " (the client left)"
        except EdgeSDKError as exc:
            # an error's message may quote the prompt: logged only with --log-prompts
            response, note = error_response(exc, style), f" {type(exc).__name__}" + (
                f": {exc}" if server.log_prompts else "")
        except Exception as exc:  # noqa: BLE001 - a bug of ours: logged whole, answered short
            log.exception("%s %s failed", request.method, request.url.path)
            response = error_response(exc, style)
        prompt = getattr(request.state, "prompt", None)
        log.info("%s %s %d %.0f ms%s%s", request.method, request.url.path,
                 response.status_code, (time.perf_counter() - t0) * 1000,
                 note[:LOG_NOTE_CHARS],
                 f" prompt={prompt!r}" if server.log_prompts and prompt is not None else "")
        return response
    return run


def error_response(exc: BaseException, style: str) -> JSONResponse:
    status = next((s for cls, s in STATUS if isinstance(exc, cls)),
                  500) if isinstance(exc, EdgeSDKError) else 500
    if style == "openai" and status == 422:
        status = 400  # OpenAI answers a bad request with 400
    name = type(exc).__name__ if isinstance(exc, EdgeSDKError) else "InternalError"
    message = str(exc) if isinstance(exc, EdgeSDKError) else \
        "the server failed on this request; its log has the details"
    headers = {}
    if isinstance(exc, BusyError):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = 'Basic realm="edge-sdk", charset="UTF-8"'
    if style == "openai":
        content: dict[str, Any] = {"error": {"message": message, "type": name,
                                             "param": None, "code": status}}
    else:  # A1111's shape: {"error": type, "detail": ..., "errors": ...}
        content = {"error": name, "detail": message, "body": "", "errors": message}
    return JSONResponse(content, status_code=status, headers=headers)


async def _payload(request: Request, kind: str | None, limit: int) -> Any:
    if kind is None:
        return None
    if kind == "json" and "json" not in request.headers.get("content-type", ""):
        # (a web page can send a text/plain POST without asking first; not JSON)
        raise InvalidInputError("send the body as JSON, with Content-Type: application/json")
    try:
        raw = await asyncio.wait_for(read_body(request.headers, request.receive, limit),
                                     BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {BODY_TIMEOUT_S} "
                                  "s") from None
    if kind == "form":
        return await _form(request, raw, limit)
    try:
        value = json.loads(raw or b"null", parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"the body is not valid JSON: {str(exc)[:JSON_ERROR_CHARS]}"
                                ) from exc
    if not isinstance(value, dict):
        raise InvalidInputError(f"the body must be a JSON object, got "
                                f"{type(value).__name__}")
    return value


def _check_host(host: str) -> None:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if host not in LOOPBACK_HOSTS and name not in LOOPBACK_HOSTS:
        raise ForbiddenError(f"Host {host[:100]!r} does not name this machine; a server on "
                             "127.0.0.1 answers 127.0.0.1 or localhost (for other names, "
                             "listen with --host and an API key)")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def _form(request: Request, raw: bytes, limit: int) -> FormData:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInputError("this endpoint takes multipart/form-data (as OpenAI's "
                                "images.edit sends it)")

    async def stream():  # the body already read, within the limit
        yield raw
        yield b""
    try:
        return await MultiPartParser(request.headers, stream(), max_files=MAX_FORM_FILES,
                                     max_fields=MAX_FORM_FIELDS, max_part_size=limit).parse()
    except Exception as exc:  # noqa: BLE001 - starlette's MultiPartException and parser errors
        raise InvalidInputError(f"the multipart body could not be read: {exc}") from exc


async def run_job(server: Server, request: Request, job: Job) -> Job:
    """Queue `job` and wait for it; if the client disconnects first, the job is dropped (or
    stopped at its next step) and ClientGone raised."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def finished() -> None:  # from the worker thread
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
    server.worker.submit(job, finished)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is going down under this request
        server.worker.cancel(job, "disconnected")
        raise
    finally:
        gone.cancel()
    if not done.done():
        server.worker.cancel(job, "disconnected")
        raise ClientGone
    if job.state == "failed" and job.error is not None:
        raise job.error
    if job.state == "cancelled":
        raise UnavailableError("the server is shutting down; this request was not run"
                               if job.cancel == "draining" else
                               f"the generation was stopped ({job.cancel})")
    return job


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def health(server: Server, request: Request, _: Any) -> Response:
    """The truth: the worker thread alive, a model loaded, not draining; the queue."""
    w = server.worker
    ok = w.alive and (w.pipe is not None or w.switching) and not w.draining
    status = "draining" if w.draining else "down" if not ok else \
        "loading" if w.switching else "ok"
    return JSONResponse({"status": status,
                         "worker_alive": w.alive, "model": w.model.name if w.model else None,
                         "model_loaded": w.pipe is not None, "running": w.running is not None,
                         "queued": w.queued, "max_queue": w.max_queue,
                         "version": __version__}, status_code=200 if ok else 503)


def create_app(server: Server) -> Starlette:
    """The application: A1111's /sdapi/v1, OpenAI's /v1 and /health."""
    from . import a1111, openai_api
    routes = [Route("/health", endpoint(server, health, style="a1111", auth=False))]
    for path, methods, handler, style, body in a1111.ROUTES + openai_api.ROUTES:
        routes.append(Route(path, endpoint(server, handler, style=style, body=body),
                            methods=methods))

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return JSONResponse({"error": "NotFound" if code == 404 else "MethodNotAllowed",
                             "detail": f"{request.method} {request.url.path} is not an "
                             "endpoint of this server", "body": "", "errors": ""},
                            status_code=code)
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


async def generate(server: Server, request: Request, job: Job) -> Job:
    """Check a generation job whole before it is queued (the server's limits, then all that
    Pipeline.check refuses: sizes, the memory it needs, the prompt, the images), run it."""
    cfg, limits = job.config, server.limits
    if cfg is not None:
        if cfg.steps is not None and cfg.steps > limits.max_steps:
            raise InvalidInputError(f"steps={cfg.steps} is over this server's limit of "
                                    f"{limits.max_steps} (edge-sdk serve --max-steps)")
        if cfg.num_images > limits.max_images:
            raise InvalidInputError(f"{cfg.num_images} images in one request is over this "
                                    f"server's limit of {limits.max_images} "
                                    "(edge-sdk serve --max-images)")
    request.state.prompt = job.prompt
    await run_in_threadpool(_check, server, job)
    return await run_job(server, request, job)


def _check(server: Server, job: Job) -> None:
    worker = server.worker
    pipe, loaded, target = worker.pipe, worker.model, job.model or worker.selected
    if pipe is not None and loaded == target:
        pipe.check(job.prompt, job.config, image=job.image, mask_image=job.mask)
    elif target is not None:  # another model: what its manifest decides, and whether it
        # could fit at all (its lowest memory mode); the rest once it is loaded
        manifest = server.registry.manifest(target)
        kind = None if job.image is None else "img2img" if job.mask is None else "inpaint"
        cfg = (job.config or GenerationConfig()).resolve(manifest, kind)
        check_fits(manifest, cfg, LOWEST_MODE)
