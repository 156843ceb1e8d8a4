"""KVSCHED_TRACE=FILE: one JSON line per decision kvsched applied (pins, releases, turn starts, prefetches), for
replaying what the policy did. A diagnostic: it never takes the engine down.

Found by review: a write that failed mid-run (a full disk) raised out of the scheduler's hooks and the engine core died.
A failed write now stops the trace, logged once, and the engine goes on, as a failed trace recording does
(trace_recorder). Found by review too: the file had no size limit, was created readable by all (0644), and named every
client's session ids as sent. It now stops (logged) at KVSCHED_TRACE_MAX_MB (the bytes already in it count), a file it
creates is its owner's only (0600), and a session is named by a keyed 64-bit hash of its id, under a random key made
when the engine opens the trace and never written: one session's rows share an id within an engine's run, and the id
tells nothing of what the client sent. (Nothing reads the trace back but people: the simulator replays recordings,
`KVSCHED_RECORD_TRACE`.) A row names its session's whole key (id, tenant, salt, branch), so two tenants' sessions of
one id are two names here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, TextIO

from kvsched.adapters.vllm.settings_check import ENV_TRACE_MAX_MB, trace_max_mb

logger = logging.getLogger("vllm.kvsched.pins")
SCORE_SESSION = 1  # where a row's `scores` entries (score, session, blocks, gap, idle, active) name the session


class DecisionTrace:
    """The trace file, line-buffered (a trace read while the engine runs is whole up to its last line)."""

    def __init__(self, path: str, max_bytes: int | None = None) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # an existing file keeps its mode
        try:
            size = os.fstat(fd).st_size
            self._stream: TextIO | None = os.fdopen(fd, "a", buffering=1)  # lives as long as the engine
        except OSError:
            os.close(fd)
            raise
        limit = int(trace_max_mb() * 1e6) if max_bytes is None else max_bytes
        self._room = limit - size
        self._keyed = hashlib.blake2b(key=os.urandom(16), digest_size=8)

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

    def session_id(self, session: object) -> str:
        """A session as the trace names it: the keyed hash of its id, in hex."""
        h = self._keyed.copy()
        h.update(str(session).encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def write(self, row: dict[str, Any]) -> bool:
        """Append one line. False, once the trace has stopped (this write failed or met the size limit, or an earlier
        one did)."""
        stream = self._stream
        if stream is None:
            return False
        row = self._hidden(row)
        line = json.dumps(row) + "\n"  # ASCII: its length is its bytes
        if len(line) > self._room:
            logger.warning("kvsched: the decision trace %s reached %s; it stops here, whole up to its last line",
                           self.path, ENV_TRACE_MAX_MB)
            self.close()
            return False
        try:
            stream.write(line)
        except (OSError, ValueError) as exc:  # ValueError: the file was closed under it
            logger.error("kvsched: writing the decision trace %s failed (%s); the trace stops here, the engine goes "
                         "on", self.path, exc)
            self.close()
            return False
        self._room -= len(line)
        return True

    def _hidden(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row with its sessions named by their keyed hashes."""
        out = dict(row)
        if "session" in out:
            out["session"] = self.session_id(out["session"])
        if "scores" in out:
            out["scores"] = [(*s[:SCORE_SESSION], self.session_id(s[SCORE_SESSION]), *s[SCORE_SESSION + 1:])
                             for s in out["scores"]]
        return out

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()  # its flush can fail as the write did
            except OSError:
                pass
