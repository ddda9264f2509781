"""`edge-sdk serve`: the flags, the safety checks made before anything loads, and the run."""

from __future__ import annotations

import argparse
import logging

from .cli_common import add_backend_args, add_memory_arg, backend_kwargs
from .errors import BackendUnavailableError, InvalidInputError

DEFAULT_PORT = 7860  # A1111's, which its clients assume


def serve_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=None, metavar="DIR", help="a folder whose "
                   "subfolders are bundles, chosen by name (default: the shipped models)")
    p.add_argument("--model", default=None, metavar="NAME", help="the model loaded at start "
                   "(default: shapes, else the first)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default "
                   "127.0.0.1: this machine only; any other needs an API key or --insecure)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="default 7860, as A1111; "
                   "0: any free port (logged)")
    auth = p.add_argument_group("access")
    auth.add_argument("--api-key", default=None, help="the key clients send as a bearer token "
                      "or as basic auth's password (visible in `ps`: prefer --api-key-file)")
    auth.add_argument("--api-key-file", default=None, metavar="FILE")
    auth.add_argument("--api-auth", default=None, metavar="USER:PASS",
                      help="basic auth with this user and password (A1111's flag)")
    auth.add_argument("--insecure", action="store_true", help="allow listening beyond this "
                      "machine with no credentials")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-queue", type=int, default=8, help="requests waiting behind "
                        "the running one; more get 429 with Retry-After (default 8)")
    limits.add_argument("--max-body-mb", type=float, default=16.0,
                        help="request body limit in MiB (default 16)")
    limits.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                        help="largest image a request may send, width x height")
    limits.add_argument("--max-steps", type=int, default=150)
    limits.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--log-prompts", action="store_true", help="put prompts in the request "
                   "log (default: not)")
    add_memory_arg(p)
    add_backend_args(p)
    p.add_argument("--debug", action="store_true")


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from .serve import Limits, Registry, build_server, run
        from .serve.security import MIB, credentials_from, is_loopback
    except ImportError as exc:
        raise BackendUnavailableError(f"edge-sdk serve needs the [serve] extra ({exc.name} is "
                                      "missing): pip install 'edge-sdk-diffusion[serve]'") \
            from exc
    from .pipeline import Pipeline
    credentials = credentials_from(a.api_key, a.api_key_file, a.api_auth)
    if not is_loopback(a.host) and not credentials.required and not a.insecure:
        raise InvalidInputError(f"--host {a.host} makes the server reachable from other "
                                "machines: give --api-key-file (or --api-key, --api-auth), "
                                "or --insecure to serve anyone who can reach it")
    for name in ("max_queue", "max_steps", "max_images", "max_image_pixels"):
        if getattr(a, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < a.max_body_mb <= 1024 or not 0 <= a.port < 65536:
        raise InvalidInputError("--max-body-mb must be in (0, 1024], --port in [0, 65535]")
    limits = Limits(int(a.max_body_mb * MIB), a.max_image_pixels, a.max_steps, a.max_images)
    load_args = {"memory": a.memory, **backend_kwargs(a)}
    logging.getLogger("edge_sdk").setLevel(logging.DEBUG if a.debug else logging.INFO)
    server = build_server(Registry(a.models), lambda path: Pipeline.load(path, **load_args),
                          model=a.model, credentials=credentials, limits=limits,
                          max_queue=a.max_queue, log_prompts=a.log_prompts,
                          loopback_only=is_loopback(a.host))
    run(server, a.host, a.port)
    return 0
