"""A background thread for the disk and shared levels' writes: the engine step hands a job over and goes on.

The queue is bounded in jobs and in bytes: when the disk or the store cannot keep up, a new job is dropped and counted
(that block is recomputed later if needed) rather than the step waiting or memory growing without bound. The bytes
matter because a write job holds host copies of its blocks (found by review: bounded by jobs only, a hung disk grew
host memory by a step's snapshot per step, up to 4096 of them: ~33 MiB a step for an 8B model's 32-block turns).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("vllm.kvsched.fp8_tier")
# Host bytes the queued jobs may hold: ~250 blocks of an 8B model in FP8 (~1 MiB each), seconds of writes for a local
# disk; past it the writes are dropped, not queued. A job is refused once the queued ones hold this much, so one job
# larger than it (a long prefill's turn) still goes when the queue is empty.
DEFAULT_MAX_BYTES = 256 * 2**20


class BackgroundWriter:
    def __init__(self, name: str, max_jobs: int = 4096, keep_results: bool = True,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._q: queue.Queue[tuple[Callable[[], Any], int]] = queue.Queue(max_jobs)
        self.results: deque[Any] = deque()
        self.keep_results = keep_results  # False: nobody drains them (they would pile up)
        self.max_bytes = max_bytes
        self.queued_bytes = 0  # held by the jobs queued or running (their `nbytes`)
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], Any], nbytes: int = 0) -> bool:
        """Queue `job`, which holds `nbytes` of memory until it ran (its non-None result is appended to `results`);
        False if the queue is full, in jobs, or in bytes for a job holding some (dropped). A job holding none (a
        delete, a fetch) is bounded by the job count only."""
        with self._lock:
            if nbytes > 0 and self.queued_bytes >= self.max_bytes:
                self.counters["dropped_jobs"] += 1
                self.counters["dropped_for_bytes"] += 1
                return False
            try:
                self._q.put_nowait((job, nbytes))
            except queue.Full:
                self.counters["dropped_jobs"] += 1
                return False
            self.queued_bytes += nbytes
        return True

    def has_room(self) -> bool:
        """Whether a job holding memory would be taken now (checked before copying its blocks: else the copy is made
        only to be dropped)."""
        return self.queued_bytes < self.max_bytes and not self._q.full()

    def drain(self) -> list[Any]:
        out: list[Any] = []
        while self.results:
            out.append(self.results.popleft())
        return out

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued job ran (tests, shutdown), at most `timeout_s`; True if the queue drained."""
        if timeout_s is None:
            self._q.join()
            return True
        deadline = time.monotonic() + timeout_s
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._q.unfinished_tasks

    @property
    def backlog(self) -> int:
        return self._q.qsize()

    def _run(self) -> None:
        while True:
            job, nbytes = self._q.get()
            try:
                result = job()
                if result is not None and self.keep_results:
                    self.results.append(result)
            except Exception:  # a failed write must not stop the next ones
                logger.exception("kvsched tier: background write failed")
                self.counters["failed_jobs"] += 1
            finally:
                del job  # its memory goes before the bytes are given back
                with self._lock:
                    self.queued_bytes -= nbytes
                self._q.task_done()
