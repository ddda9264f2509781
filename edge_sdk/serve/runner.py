"""Running the application on uvicorn: the worker started first (a model that cannot load
stops the server before it listens), SIGTERM/SIGINT drain (no new requests, the queued ones
answered 503, the running generation finished), then exit."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import uvicorn

from .app import Server, create_app
from .registry import Registry
from .security import Credentials, Limits
from .worker import Worker

log = logging.getLogger("edge_sdk.serve")
# open connections beyond max(MIN_CONNECTIONS, CONNECTIONS_PER_PLACE x places) get uvicorn's
# own 503 at once (idle keep-alive ones count): a bound on sockets, far above the queue's
CONNECTIONS_PER_PLACE, MIN_CONNECTIONS = 8, 128


def build_server(registry: Registry, load: Callable[[Any], Any], *, model: str | None = None,
                 credentials: Credentials = Credentials(), limits: Limits = Limits(),
                 max_queue: int = 8, log_prompts: bool = False,
                 loopback_only: bool = True) -> Server:
    """A Server whose worker has loaded `model` (a name in `registry`; None: its default).
    `loopback_only`: it listens on loopback, so requests must name this machine as Host."""
    worker = Worker(load, max_queue)
    worker.start(registry.default(model))
    return Server(worker, registry, credentials, limits, log_prompts, loopback_only)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT also drains the worker: uvicorn then stops
    listening and waits for the requests in flight (the running generation) to end."""

    def __init__(self, config: uvicorn.Config, server: Server) -> None:
        super().__init__(config)
        self.edge = server

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.edge.worker.draining:
            log.info("signal %d: draining (the running generation finishes, queued requests "
                     "get 503)", sig)
        # drained from another thread: this handler may have interrupted the event loop
        # inside the worker's lock, which it would then take again re-entrantly
        threading.Thread(target=self.edge.worker.drain, name="edge-sdk-drain").start()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        for s in self.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                log.info("listening on http://%s:%d (models: %s; loaded: %s)",
                         host if ":" not in host else f"[{host}]", port,
                         ", ".join(self.edge.registry.names), self.edge.worker.model.name)


def run(server: Server, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve until SIGTERM/SIGINT, then drain and stop the worker. uvicorn on h11 and
    asyncio: pure Python, nothing compiled to install on a board."""
    config = uvicorn.Config(create_app(server), host=host, port=port, http="h11",
                            loop="asyncio", lifespan="off", access_log=False,
                            log_level="warning", server_header=False,
                            timeout_graceful_shutdown=None,
                            limit_concurrency=max(MIN_CONNECTIONS, CONNECTIONS_PER_PLACE *
                                                  (server.worker.max_queue + 1)))
    try:
        _DrainingServer(config, server).run()
    finally:
        server.worker.stop(timeout=5)
