"""The server's worker with a fake pipeline: the queue bound, cancelling queued and running
jobs, A1111's interrupt, draining, a failing job, a model that does not load."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from edge_sdk.errors import BusyError, CancelledError, InferenceError, UnavailableError
from tests.conftest import needs_serve

pytestmark = needs_serve


class FakePipe:
    """Steps until released (or cancelled by its callback); `fail` raises instead."""

    def __init__(self, path, fail: bool = False) -> None:
        self.path, self.fail = path, fail
        self.release, self.started = threading.Event(), threading.Event()
        self.prompts: list[str] = []
        self.released: list[str] = []  # components done with
        self.components = SimpleNamespace(done_with=self.released.append)

    def generate(self, prompt, config, *, image, mask_image, callback, preview, preview_every):
        self.prompts.append(prompt)
        if prompt == "boom":
            raise InferenceError("the fake failed")
        for step in range(1000):
            self.started.set()
            if callback(step, 1000, np.full((1, 4, 2, 2), step, np.float32)) is False:
                raise CancelledError("cancelled")
            if self.release.wait(0.001):
                return f"image of {prompt}"
        raise AssertionError("never released")

    def decode_latents(self, latents):
        return np.zeros((1, 16, 16, 3), np.float32)


@pytest.fixture()
def worker():
    from edge_sdk.serve import Registry
    from edge_sdk.serve.worker import Worker
    pipes: list[FakePipe] = []

    def load(path):
        if "broken" in str(path):
            raise InferenceError("cannot load")
        pipes.append(FakePipe(path))
        return pipes[-1]
    registry = Registry()
    w = Worker(load, max_queue=1)
    w.start(registry.default(None))
    w.fakes = pipes
    yield w
    w.fakes[-1].release.set()
    w.stop(timeout=10)


def _job(worker, prompt="a", model=None):
    from edge_sdk.serve.worker import Job
    return Job(model or worker.model, prompt, None)


def test_a_full_queue_is_busy_and_a_queued_job_can_leave(worker):
    running = worker.submit(_job(worker, "first"))
    worker.fakes[-1].started.wait(10)
    queued = worker.submit(_job(worker, "second"))
    with pytest.raises(BusyError) as busy:
        worker.submit(_job(worker, "third"))
    assert busy.value.retry_after >= 1 and worker.queued == 1
    worker.cancel(queued, "disconnected")
    assert queued.finished and queued.state == "cancelled" and worker.queued == 0
    worker.submit(_job(worker, "fourth"))  # its place is free again
    worker.fakes[-1].release.set()
    assert running.wait(10) and running.state == "done" and running.result == "image of first"
    assert "second" not in worker.fakes[-1].prompts


def test_a_running_job_stops_at_its_next_step(worker):
    left = worker.submit(_job(worker))
    worker.fakes[-1].started.wait(10)
    worker.cancel(left, "disconnected")
    assert left.wait(10) and left.state == "cancelled" and not left.partial
    fake = worker.fakes[-1]
    fake.started.clear()
    interrupted = worker.submit(_job(worker))
    fake.started.wait(10)
    assert worker.interrupt()
    assert interrupted.wait(10) and interrupted.state == "done"
    assert len(interrupted.partial) == 1 and interrupted.partial[0].size == (16, 16)
    assert fake.released == ["vae_decoder"]  # the decoder of the partial image let go
    assert not worker.interrupt()  # nothing running


def test_draining_finishes_the_running_job_and_drops_the_queued(worker):
    running = worker.submit(_job(worker, "first"))
    worker.fakes[-1].started.wait(10)
    queued = worker.submit(_job(worker, "second"))
    worker.drain()
    assert queued.finished and queued.cancel == "draining"
    with pytest.raises(UnavailableError, match="shutting down"):
        worker.submit(_job(worker))
    worker.fakes[-1].release.set()
    assert running.wait(10) and running.state == "done"


def test_a_failing_job_or_model_leaves_the_worker_serving(worker):
    from edge_sdk.serve.registry import ModelEntry
    failed = worker.submit(_job(worker, "boom"))
    assert failed.wait(10) and failed.state == "failed"
    assert isinstance(failed.error, InferenceError) and worker.alive
    before = worker.model
    broken = ModelEntry("broken", before.path.parent / "broken", "0" * 64)
    switch = worker.submit(_job(worker, "x", model=broken))
    assert switch.wait(10) and switch.state == "failed" and "cannot load" in str(switch.error)
    assert worker.model == before and worker.pipe is worker.fakes[-1]  # reloaded
    worker.fakes[-1].release.set()
    ok = worker.submit(_job(worker, "after"))
    assert ok.wait(10) and ok.result == "image of after"
