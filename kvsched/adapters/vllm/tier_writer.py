"""A background thread for the disk and shared levels' writes: the engine step hands a job over and goes on.

The queue is bounded: when the disk or the store cannot keep up, a new job is dropped and counted (that block is
recomputed later if needed) rather than the step waiting or memory growing without bound.
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


class BackgroundWriter:
    def __init__(self, name: str, max_jobs: int = 4096, keep_results: bool = True) -> None:
        self._q: queue.Queue[Callable[[], Any]] = queue.Queue(max_jobs)
        self.results: deque[Any] = deque()
        self.keep_results = keep_results  # False: nobody drains them (they would pile up)
        self.counters: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], Any]) -> bool:
        """Queue `job` (its non-None result is appended to `results`); False if the queue is full (dropped)."""
        try:
            self._q.put_nowait(job)
        except queue.Full:
            self.counters["dropped_jobs"] += 1
            return False
        return True

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
            job = self._q.get()
            try:
                result = job()
                if result is not None and self.keep_results:
                    self.results.append(result)
            except Exception:  # a failed write must not stop the next ones
                logger.exception("kvsched tier: background write failed")
                self.counters["failed_jobs"] += 1
            finally:
                self._q.task_done()
