"""One thread owns the runner; requests wait for it in a bounded queue.

llama.cpp contexts are not thread-safe, and one ensemble runs one generation at a time,
so every job runs on the worker thread, in arrival order. A request is admitted only
while fewer than `max_waiting` jobs wait besides the running one; the next gets a 503
with Retry-After (an estimate from recent jobs), never a silent drop. A job streams its
items back to the request's event loop. Cancelling it (the client went away, the server
stops) sets the event its run checks before every piece, so it ends within one piece; a
job cancelled while it waits gives its place back at once and never runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lvr_local.errors import LvrError
from lvr_local.runner.run import Runner
from lvr_local.server.errors import ApiError, internal_error

log = logging.getLogger("lvr_local.server")

# A job: run on the worker thread with the runner and its cancel event, it yields items.
Work = Callable[[Runner, threading.Event], Iterator[Any]]
POLL_S = 0.25  # how often a request waiting without a stream checks its client is there


@dataclass(frozen=True)
class Done:
    """The job's last item when it ended normally (cancelled included)."""


@dataclass(frozen=True)
class Failed:
    """The job's last item when it did not run to its end: 400 for the engine's
    LvrError (it describes what the request asked), 503 at shutdown, 500 for a bug (the
    message names the request id that the log holds the traceback under)."""

    message: str
    status: int

    def error(self) -> ApiError:
        return ApiError(self.status, self.message)


class ClientGone(Exception):
    """The client disconnected while its request waited for items."""


@dataclass(eq=False)
class Job:
    work: Work
    loop: asyncio.AbstractEventLoop
    cancel_event: threading.Event = field(default_factory=threading.Event)
    outbox: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    state: str = "waiting"  # waiting -> running -> finished, or waiting -> abandoned
    on_abandon: Callable[[Job], None] | None = None

    def push(self, item: Any) -> None:
        """From the worker thread: hand an item to the request's event loop."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)

    async def next(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> Any:
        """The next item. With `disconnected`, poll it while waiting (ClientGone)."""
        if disconnected is None:
            return await self.outbox.get()
        while True:
            try:
                return await asyncio.wait_for(self.outbox.get(), POLL_S)
            except TimeoutError:
                if await disconnected():
                    raise ClientGone() from None

    def cancel(self) -> None:
        """Stop the run within one piece, or give the place in the queue back."""
        self.cancel_event.set()
        if self.on_abandon is not None:
            self.on_abandon(self)


class GenerationWorker:
    """The runner's thread and the queue in front of it."""

    def __init__(self, runner: Runner, max_waiting: int) -> None:
        self.runner = runner
        self.max_waiting = max_waiting
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0  # waiting or running
        self._running: Job | None = None
        self._mean_job_s = 1.0
        self._thread = threading.Thread(target=self._loop, name="lvr-generation", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._admitted - (self._running is not None)

    @property
    def busy(self) -> bool:
        return self._running is not None

    def submit(self, work: Work) -> Job:
        """Queue a job, or refuse it with a 503 when the queue is full."""
        job = Job(work, asyncio.get_running_loop(), on_abandon=self._abandon)
        with self._lock:
            if self._closed:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self._admitted > self.max_waiting:
                wait = math.ceil(self._mean_job_s * self._admitted)
                raise ApiError(
                    503,
                    f"the server is busy: one generation runs and {self.max_waiting} wait; "
                    f"retry in about {wait} s",
                    code="server_busy",
                    headers={"Retry-After": str(max(1, wait))},
                )
            self._admitted += 1
        self._queue.put(job)
        return job

    def _abandon(self, job: Job) -> None:
        with self._lock:
            if job.state == "waiting":
                job.state = "abandoned"
                self._admitted -= 1

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                if job.state == "abandoned":
                    continue
                if self._closed:
                    job.state = "abandoned"
                    self._admitted -= 1
                    job.push(Failed("the server is shutting down", 503))
                    continue
                job.state, self._running = "running", job
            started = time.perf_counter()
            try:
                self._run(job)
            finally:
                seconds = time.perf_counter() - started
                self._mean_job_s = 0.7 * self._mean_job_s + 0.3 * seconds
                with self._lock:
                    job.state, self._running = "finished", None
                    self._admitted -= 1

    def _run(self, job: Job) -> None:
        try:
            for item in job.work(self.runner, job.cancel_event):
                job.push(item)
            job.push(Done())
        except LvrError as e:
            job.push(Failed(str(e), 400))
        except Exception as e:  # a bug, InternalError among them
            job.push(Failed(internal_error(e, "in a generation").message, 500))

    def stop(self) -> None:
        """Refuse new jobs and end the others without waiting: the running one stops
        within a piece (its stream ends with a finish reason and [DONE]), the waiting
        ones are answered 503."""
        with self._lock:
            self._closed = True
            running = self._running
        if running is not None:
            running.cancel()

    def close(self) -> None:
        """Stop, and wait for the thread: after this, the runner is free to be closed."""
        running = self._running
        self.stop()
        self._queue.put(None)
        if running is not None:
            log.info("waiting for the current generation to stop")
        if self._thread.is_alive():
            self._thread.join()
