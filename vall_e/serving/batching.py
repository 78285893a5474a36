"""The request batcher: one worker thread owns the model; requests that arrive together share one run.

The model is not thread-safe, so every call into it happens on a single worker thread. The asyncio
side submits jobs and awaits futures, so the event loop never blocks on synthesis. When the worker
picks up a job it waits up to `batch_wait_s` (counted from that job's arrival) for more jobs with the
same settings key, and runs up to `max_batch` of them as one call. Streaming jobs run alone and push
their chunks back to the loop as they are produced.

If a batch fails, each of its jobs is retried alone, so one bad request cannot fail the others.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Hashable, Iterator, Sequence

logger = logging.getLogger(__name__)

_END = object()  # marks the end of a stream


class QueueFull(Exception):
    """The queue already holds `max_queue` waiting jobs."""


class WorkerStopped(Exception):
    """The batcher was closed."""


@dataclass(eq=False)
class _Job:
    payload: Any
    key: Hashable
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None  # batch jobs
    chunks: asyncio.Queue | None = None  # stream jobs
    stream_fn: Callable[[], Iterator[Any]] | None = None
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False


class Batcher:
    """Queue + worker thread. `run_batch(payloads) -> results` (one per payload) runs on the worker."""

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch: int = 8,
                 batch_wait_s: float = 0.05, max_queue: int = 64, name: str = "tts-worker") -> None:
        if max_batch < 1 or max_queue < 1 or batch_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and batch_wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self._pending: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.running = 0  # jobs in the run now on the worker
        self.stats = {"batches": 0, "requests": 0, "streams": 0, "largest_batch": 0, "failed_batches": 0,
                      "streams_cancelled": 0}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ asyncio side
    @property
    def depth(self) -> int:
        """Jobs waiting for the worker (not counting the run in progress)."""
        return len(self._pending)

    def _enqueue(self, job: _Job) -> None:
        with self._cond:
            if self._stopped:
                raise WorkerStopped("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
            self._pending.append(job)
            self._cond.notify_all()

    def _cancel(self, job: _Job) -> None:
        with self._cond:
            job.cancelled = True
            try:
                self._pending.remove(job)
            except ValueError:
                pass  # already taken by the worker: its result is dropped

    async def submit(self, payload: Any, key: Hashable, timeout: float | None = None) -> Any:
        """Queue one job and wait for its result. Raises QueueFull at once when the queue is full,
        asyncio.TimeoutError after `timeout` seconds (the job is dropped if it has not started)."""
        loop = asyncio.get_running_loop()
        job = _Job(payload, key, loop, future=loop.create_future())
        self._enqueue(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except BaseException:
            self._cancel(job)
            raise

    async def submit_stream(self, stream_fn: Callable[[], Iterator[Any]], first_timeout: float | None = None
                            ) -> AsyncIterator[Any]:
        """Queue a streaming job and return an async iterator over its items.

        The first item is awaited here (up to `first_timeout` seconds), so an error raised before any
        audio is produced surfaces from this call, before a response has started.
        """
        loop = asyncio.get_running_loop()
        job = _Job(None, object(), loop, chunks=asyncio.Queue(), stream_fn=stream_fn)
        self._enqueue(job)
        try:
            first = await asyncio.wait_for(job.chunks.get(), first_timeout)
        except BaseException:
            self._cancel(job)
            raise
        if isinstance(first, BaseException):
            raise first
        return self._iterate(job, first)

    async def _iterate(self, job: _Job, first: Any) -> AsyncIterator[Any]:
        try:
            item = first
            while item is not _END:
                if isinstance(item, BaseException):
                    logger.error("stream stopped early: %s", item)
                    return
                yield item
                item = await job.chunks.get()
        finally:  # the client went away or the stream ended: tell the worker to stop
            job.cancelled = True

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in pending:
            self._deliver(job, WorkerStopped("the server is shutting down"))
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side
    def _deliver(self, job: _Job, value: Any) -> None:
        """Hand a result (or an exception) to the job's future or stream queue on its loop."""
        def put() -> None:
            if job.cancelled and job.future is not None:  # timed out: nobody awaits the result
                return
            if job.chunks is not None:
                job.chunks.put_nowait(value)
            elif not job.future.done():
                if isinstance(value, BaseException):
                    job.future.set_exception(value)
                else:
                    job.future.set_result(value)
        try:
            job.loop.call_soon_threadsafe(put)
        except RuntimeError:  # the loop is closed
            pass

    def _take_batch(self) -> list[_Job] | None:
        """Block until a job is waiting; return it with the compatible jobs that arrive in time."""
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            first = self._pending.popleft()
            if first.stream_fn is not None:
                self.running = 1
                return [first]
            batch = [first]
            deadline = first.arrived + self.batch_wait_s
            while len(batch) < self.max_batch:
                for job in list(self._pending):
                    if len(batch) >= self.max_batch:
                        break
                    if job.stream_fn is None and job.key == first.key:
                        self._pending.remove(job)
                        batch.append(job)
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self._stopped:
                    break
                self._cond.wait(left)
            self.running = len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                if batch[0].stream_fn is not None:
                    self._run_stream(batch[0])
                else:
                    self._run(batch)
            except BaseException as e:  # never let the worker die
                logger.exception("worker error")
                for job in batch:
                    self._deliver(job, e if isinstance(e, Exception) else RuntimeError(str(e)))
            finally:
                self.running = 0

    def _run(self, batch: list[_Job]) -> None:
        batch = [j for j in batch if not j.cancelled]
        if not batch:
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        try:
            results = list(self.run_batch([j.payload for j in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} jobs")
        except Exception as e:
            if len(batch) == 1:
                self._deliver(batch[0], e)
                return
            # One bad request must not fail the others: retry each one alone.
            self.stats["failed_batches"] += 1
            logger.info("a batch of %d failed (%s); retrying its requests one by one", len(batch), e)
            for job in batch:
                if job.cancelled:
                    continue
                try:
                    self._deliver(job, list(self.run_batch([job.payload]))[0])
                except Exception as e1:
                    self._deliver(job, e1)
            return
        for job, result in zip(batch, results):
            self._deliver(job, result)

    def _run_stream(self, job: _Job) -> None:
        if job.cancelled:
            return
        self.stats["streams"] += 1
        gen = None
        try:
            gen = job.stream_fn()
            for item in gen:
                if job.cancelled:  # the client went away: stop generating
                    self.stats["streams_cancelled"] += 1
                    break
                self._deliver(job, item)
            self._deliver(job, _END)
        except Exception as e:
            self._deliver(job, e)
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()
