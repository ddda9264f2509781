"""`edge-sdk serve`: the device as an image service speaking AUTOMATIC1111's and OpenAI's
HTTP APIs (the `[serve]` extra: Starlette on uvicorn).

    server = build_server(Registry(), lambda path: Pipeline.load(path))
    run(server, host="127.0.0.1", port=7860)          # or: create_app(server), any ASGI server

Modules: `registry` (the bundles a server chooses from), `worker` (one generation at a time,
a bounded queue), `security` (credentials, limits), `images` (base64 in and out), `fields`
(typed request fields), `app` (routes, errors, health), `a1111` and `openai_api` (the two
APIs), `runner` (uvicorn, draining on SIGTERM).
"""

from .app import Server, create_app
from .registry import Registry
from .runner import build_server, run
from .security import Credentials, Limits

__all__ = ["Server", "create_app", "Registry", "build_server", "run", "Credentials", "Limits"]
