"""KVSCHED_TRACE=FILE: one JSON line per decision kvsched applied (pins, releases, turn starts, prefetches), for
replaying what the policy did. A diagnostic: it never takes the engine down.

Found by review: a write that failed mid-run (a full disk; the file has no size limit, so left on it can fill the disk
itself) raised out of the scheduler's hooks and the engine core died. A failed write now stops the trace, logged once,
and the engine goes on, as a failed trace recording does (trace_recorder)."""

from __future__ import annotations

import json
import logging
from typing import Any, TextIO

logger = logging.getLogger("vllm.kvsched.pins")


class DecisionTrace:
    """The trace file, line-buffered (a trace read while the engine runs is whole up to its last line)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stream: TextIO | None = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the engine

    @classmethod
    def open(cls, path: str | None) -> DecisionTrace | None:
        """The trace at `path` (None: off). A file that cannot be opened is logged; the engine runs without it."""
        if not path:
            return None
        try:
            return cls(path)
        except OSError as exc:
            logger.error("kvsched: KVSCHED_TRACE=%s cannot be opened (%s): no decision trace", path, exc)
            return None

    def write(self, row: dict[str, Any]) -> bool:
        """Append one line. False, once the trace has stopped (this write failed, or an earlier one did)."""
        stream = self._stream
        if stream is None:
            return False
        try:
            stream.write(json.dumps(row) + "\n")
            return True
        except (OSError, ValueError) as exc:  # ValueError: the file was closed under it
            logger.error("kvsched: writing the decision trace %s failed (%s); the trace stops here, the engine goes "
                         "on", self.path, exc)
            self.close()
            return False

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()  # its flush can fail as the write did
            except OSError:
                pass
