"""One generation at a time on the device, with a bounded queue in front of it.

The worker owns the loaded pipeline and runs every job (a generation, or a model switch) in
its own thread, in order. The HTTP side only submits jobs and waits for them: a full queue is
a BusyError (HTTP 429) at once, never a pile-up; a queued job whose client left is dropped; a
running one stops at its next step (its step callback answers False). Draining (SIGTERM)
refuses new jobs, drops the queued ones and lets the running one finish.
"""

from __future__ import annotations

import collections
import gc
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .. import names as N
from ..config import GenerationConfig
from ..errors import BusyError, CancelledError, EdgeSDKError, UnavailableError
from ..generation import Generation
from ..image import to_pil
from .images import encode_png
from .registry import ModelEntry

log = logging.getLogger(__name__)

Loader = Callable[[Path], Any]  # a bundle folder -> a loaded Pipeline
RECENT = 8  # generations whose durations estimate a queue's wait (Retry-After)


@dataclass(eq=False)
class Job:
    """A request for the worker: generate (prompt, config, optional source image and mask)
    or, with `prompt` None, only switch to `model` and make it the selected one (A1111's
    `sd_model_checkpoint` option). `model` None: the selected model, whatever it is when the
    job runs; a model named by one request (OpenAI's `model`, A1111's `override_settings`)
    is used for that request only."""

    model: ModelEntry | None
    prompt: str | None = None
    config: GenerationConfig | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None
    preview_every: int = 0  # steps between live previews; 0: none
    id: int = 0
    state: str = "queued"  # queued, running, done, failed, cancelled
    step: int = 0
    total: int = 0
    started: float | None = None
    preview: str | None = None  # the latest live preview, a base64 PNG (encoded once)
    cancel: str | None = None  # why it is being stopped: interrupted, disconnected, draining
    result: Generation | None = None
    partial: list[Image.Image] = field(default_factory=list)  # an interrupted job's images
    error: BaseException | None = None
    _latents: np.ndarray | None = None
    _done: threading.Event = field(default_factory=threading.Event)
    _on_done: list[Callable[[], None]] = field(default_factory=list)

    @property
    def images(self) -> list[Image.Image]:
        """What the job made: its result's images, or an interrupted job's so far."""
        return self.result.images if self.result is not None else self.partial

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


class Worker:
    """Runs jobs one at a time in a thread; every method is safe from any thread."""

    def __init__(self, load: Loader, max_queue: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._load, self.max_queue, self._clock = load, max_queue, clock
        self.pipe: Any = None
        self.model: ModelEntry | None = None  # the one loaded (None while switching)
        self.selected: ModelEntry | None = None  # what requests naming no model get
        self.draining = False
        self._stopping = False  # the thread ends once the queue is empty
        self.switching = False  # between releasing one model and loading the next
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._durations: collections.deque[float] = collections.deque(maxlen=RECENT)
        self._thread = threading.Thread(target=self._loop, name="edge-sdk-worker", daemon=True)

    # -- control ------------------------------------------------------------------------
    def start(self, model: ModelEntry) -> None:
        """Load the first model (here: a model that cannot load stops the server before it
        listens) and start the thread."""
        self._switch(model)
        self.selected = model
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job, on_done: Callable[[], None] | None = None) -> Job:
        """Queue a job; BusyError when the queue is full, UnavailableError when draining."""
        with self._cond:
            self._refuse_if_full()
            job.id = next(self._ids)
            if on_done is not None:
                job._on_done.append(on_done)
            self._queue.append(job)
            self._cond.notify()
        return job

    def check_room(self) -> None:
        """What `submit` would refuse now (BusyError, UnavailableError), before a request's
        images are decoded."""
        with self._cond:
            self._refuse_if_full()

    def _refuse_if_full(self) -> None:
        if self.draining or not self.alive:
            raise UnavailableError("the server is shutting down" if self.draining else
                                   "the server's worker has stopped; restart the server")
        if len(self._queue) >= self.max_queue:
            raise BusyError(f"the queue is full ({self.max_queue} waiting, one running); "
                            "retry later", self._retry_after())

    def cancel(self, job: Job, reason: str) -> None:
        """Stop a job: a queued one leaves the queue now, a running one at its next step."""
        with self._cond:
            if job.finished or job.cancel is not None:
                return
            job.cancel = reason
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, "cancelled")
        log.info("job %d %s (%s)", job.id, "stopping" if job.state == "running" else
                 "dropped", reason)

    def interrupt(self) -> bool:
        """A1111's interrupt: stop the running generation (its client gets what was made so
        far). False when nothing runs."""
        job = self._running
        if job is None:
            return False
        self.cancel(job, "interrupted")
        return True

    def drain(self) -> None:
        """Refuse new jobs and drop the queued ones; the running one finishes."""
        with self._cond:
            self.draining = True
            dropped = list(self._queue)
        for job in dropped:
            self.cancel(job, "draining")

    def stop(self, timeout: float | None = None) -> None:
        self.drain()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- state --------------------------------------------------------------------------
    @property
    def running(self) -> Job | None:
        return self._running

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: a place frees when the running generation
        ends, so the recent generations' mean duration (at least 1 s)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean))

    # -- the thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._running, job.state, job.started = job, "running", self._clock()
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 - reported to its client
                self._failed(job, exc)
            finally:
                with self._cond:
                    self._running = None
                    self._finish(job, job.state if job.state != "running" else "done")

    def _run(self, job: Job) -> None:
        model = job.model or self.selected
        if model != self.model:
            self._switch(model)
        job.model = model  # (the response names the model that made the image)
        if job.prompt is None:  # a model switch, chosen from now on
            self.selected = model
            return
        t0 = self._clock()
        try:
            job.result = self.pipe.generate(
                job.prompt, job.config, image=job.image, mask_image=job.mask,
                callback=lambda i, n, latents: self._step(job, i, n, latents),
                preview=(lambda i, img: setattr(job, "preview", encode_png(img)))
                if job.preview_every else None, preview_every=job.preview_every or 1)
        except CancelledError:
            if job.cancel == "interrupted" and job._latents is not None:
                # A1111 answers an interrupted generation with the image so far (not for
                # an inpainting of a cropped region: its latents are the crop's)
                if job.config is None or job.config.padding_mask_crop is None:
                    job.partial = to_pil(self.pipe.decode_latents(job._latents))
                    self.pipe.components.done_with(N.VAE_DECODER)
                job.state = "done"
            else:
                job.state = "cancelled"
            return
        finally:
            job._latents = None
        self._durations.append(self._clock() - t0)

    def _step(self, job: Job, i: int, total: int, latents: np.ndarray) -> bool:
        job.step, job.total, job._latents = i + 1, total, latents
        return job.cancel is None

    def _switch(self, entry: ModelEntry) -> None:
        """Load another model; the old one is released first (a board holds one), and loaded
        again if the new one fails."""
        old = self.model
        self.switching = True
        self.pipe = self.model = None
        gc.collect()
        try:
            self.pipe, self.model = self._load(entry.path), entry
        except BaseException:
            if old is not None:
                log.warning("model %s did not load; back to %s", entry.name, old.name)
                self.pipe, self.model = self._load(old.path), old
            raise
        finally:
            self.switching = False
        log.info("model %s loaded from %s", entry.name, entry.path)

    def _failed(self, job: Job, exc: BaseException) -> None:
        job.error, job.state = exc, "failed"
        if isinstance(exc, EdgeSDKError):  # its client gets the message (it may quote the
            log.info("job %d failed: %s", job.id, type(exc).__name__)  # prompt: not logged)
        else:
            log.error("job %d failed", job.id, exc_info=exc)

    def _finish(self, job: Job, state: str) -> None:
        """(Under the lock.) Mark a job finished and tell its waiter."""
        job.state = state
        job._done.set()
        for fn in job._on_done:
            try:
                fn()
            except RuntimeError:  # its event loop has closed: nobody waits any more
                log.debug("job %d: its waiter is gone", job.id)
