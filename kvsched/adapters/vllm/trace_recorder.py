"""`KVSCHED_RECORD_TRACE=FILE`: the engine records the requests it serves in kvsched's trace schema, so that
`kvsched simulate FILE` replays this deployment's own traffic (LRU, kvsched and OPT; pools, TTLs, the tier) instead of
a public trace or a generated one. What is written, and what is not (no text, no tokens, ids under a key made per
recording): `kvsched.sim.trace_record`.

Runs in SessionPins' hooks on the engine-core thread: per finished request a keyed hash of each block the session's
previous request did not have and one line, written through at once (a write call of a few microseconds, so that a
trace read while the engine runs is whole up to its last request). An existing file is never overwritten: the recording goes to FILE.1, FILE.2, ... (an engine restarted, or data-parallel
engines given the same path), and the engine logs where. KVSCHED_RECORD_TRACE_MAX_MB bounds the recordings beside one
path together, so an engine restarted over and over cannot fill the disk one limit at a time (data-parallel engines
split what is left).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.settings_check import size_limit_mb
from kvsched.core.sessions import SessionKey, TurnHints
from kvsched.sim.trace_fields import BYTES_META, CAPACITY_META, TIER_BLOCK_META
from kvsched.sim.trace_record import Finished, TraceRecording

ENV_RECORD = "KVSCHED_RECORD_TRACE"
ENV_MAX_MB = "KVSCHED_RECORD_TRACE_MAX_MB"
DEFAULT_MAX_MB = 1024.0  # an agent turn is ~1 KB of trace: a million turns, then the recording stops (logged)
logger = logging.getLogger("vllm.kvsched.record")


def max_mb(environ: Mapping[str, str] | None = None) -> float:
    """KVSCHED_RECORD_TRACE_MAX_MB: the recording's size limit in MB (ValueError naming the variable if malformed)."""
    return size_limit_mb(ENV_MAX_MB, DEFAULT_MAX_MB, environ)


def record_path_error(environ: Mapping[str, str] | None = None) -> str | None:
    """Why KVSCHED_RECORD_TRACE cannot be recorded to (checked before the engine starts); None if it can or is unset."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_RECORD, "").strip()
    if not raw:
        return None
    try:
        max_mb(env)
    except ValueError as exc:
        return str(exc)
    path = Path(raw).expanduser()
    if path.is_dir():
        return f"{ENV_RECORD}={raw!r}: a directory; name a file to write the trace to"
    parent = path.parent
    if not parent.is_dir():
        return f"{ENV_RECORD}={raw!r}: directory {str(parent)!r} does not exist"
    if not os.access(parent, os.W_OK):
        return f"{ENV_RECORD}={raw!r}: directory {str(parent)!r} is not writable"
    return None


def open_new(path: Path) -> tuple[TextIO, Path]:
    """`path` created for writing, or the first of path.1, path.2, ... (before the suffix) that does not exist."""
    for i in range(10_000):
        candidate = path if i == 0 else path.with_name(f"{path.stem}.{i}{path.suffix}")
        try:
            return open(candidate, "x", buffering=1), candidate  # noqa: SIM115 - lives as long as the engine
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: 10,000 recordings beside it already")


def recorded_bytes(path: Path) -> int:
    """Bytes of the recordings already at `path` and its numbered siblings (path.1, path.2, ... before the suffix)."""
    numbered = re.compile(re.escape(path.stem) + r"\.[0-9]+" + re.escape(path.suffix))
    total = 0
    try:
        for entry in os.scandir(path.parent):
            if entry.name == path.name or numbered.fullmatch(entry.name):
                try:
                    total += entry.stat().st_size if entry.is_file() else 0
                except OSError:
                    continue  # gone meanwhile
    except OSError:
        return 0
    return total


class TraceRecorder:
    """The engine's side of a recording: reads each request's session, lengths and block hashes."""

    def __init__(self, scheduler: Any, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        block_size = compat.hash_block_size(scheduler)
        engine_block = int(scheduler.cache_config.block_size)
        self.stream, self.path = open_new(path)
        limit = int(max_mb() * 1e6)
        # The new (empty) file counts nothing. Data-parallel engines given one path start together, each seeing the
        # same room: each takes its share (found by review: each could write the whole limit).
        engines = compat.data_parallel_size(scheduler)
        room = (limit - recorded_bytes(path)) // engines
        self.clock = clock
        self.scheduler = scheduler  # its prefix cache: what a preempted request had computed (`finished`)
        self.block_size = block_size
        # Bytes are the engine's, every rank's share summed: the KV cache spec is one rank's (its heads of its layers),
        # and a tensor-parallel engine's `--kvsched-fp8-tier-gb G`, which `--fp8-tier-gib G` mirrors, is its ranks'
        # together (found by review: a TP=N recording replayed a tier of G with N times the engine's slots)
        shares = compat.rank_shares(scheduler.vllm_config)  # each pipeline stage with its own layers
        meta = {"source": "kvsched engine recording", "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "vllm": compat.installed_vllm_version(),
                # the engine's pool in the trace's blocks: `kvsched simulate FILE --capacity-blocks N` replays at it
                CAPACITY_META: compat.num_total_blocks(scheduler) * engine_block // block_size,
                BYTES_META: shares.engine(compat.kv_bytes_per_token(scheduler))}
        tier_block = shares.engine(tier_block_bytes(scheduler))
        if tier_block:  # what the FP8 tier would take per block: `kvsched simulate FILE --fp8-tier-gib G` sizes by it
            meta[TIER_BLOCK_META] = tier_block * block_size // engine_block
        self.recording = TraceRecording(self.stream, block_size, meta, max_chars=max(room, 0))
        self.stopped = False
        atexit.register(self.close)
        logger.info("kvsched: recording the requests this engine serves to %s (%s; %.0f of %s's %.0f MB left beside "
                    "earlier recordings%s)", self.path, ENV_RECORD, max(room, 0) / 1e6, ENV_MAX_MB, limit / 1e6,
                    f", this engine's share of {engines} data-parallel engines" if engines > 1 else "")

    @classmethod
    def from_env(cls, scheduler: Any, prefix_caching: bool) -> TraceRecorder | None:
        raw = os.environ.get(ENV_RECORD, "").strip()
        if not raw:
            return None
        if not prefix_caching:  # no block hashes: a trace without block ids replays nothing
            logger.error("kvsched: %s is set but prefix caching is off: nothing is recorded", ENV_RECORD)
            return None
        path = Path(raw).expanduser()
        spent = recorded_bytes(path)
        if spent >= max_mb() * 1e6:  # checked before a file is made: a restart loop then adds no empty files either
            logger.error("kvsched: the recordings at %s and its numbered siblings already take %.0f MB, %s's limit: "
                         "nothing is recorded (move them away, or raise the limit)", path, spent / 1e6, ENV_MAX_MB)
            return None
        try:
            return cls(scheduler, path)
        except OSError as exc:  # e.g. the directory went away since the start-up check: the engine serves on
            logger.error("kvsched: cannot record to %s (%s): nothing is recorded", path, exc)
            return None

    def arrived(self, request: Any, key: SessionKey | None, joins_pin: bool = False) -> None:
        """A request was added. Its session is recorded without the branch (the replay applies the lineage itself);
        `joins_pin`: it repeated a shared inferred session's last prompt (the replay pins its answer beside the
        other user's, as the engine does: `kvsched.core.shared_turns`)."""
        if self.stopped:
            return
        try:
            session = key._replace(branch=0) if key is not None else None
            self.recording.arrived(request.request_id, self.clock(), session, getattr(request, "cache_salt", None),
                                   joins_pin)
        except Exception:  # a recording never takes the engine down
            self._fail()

    def finished(self, request: Any, hints: TurnHints | None, applied: TurnHints | None = None) -> None:
        """The request finished with `hints` as sent; `applied`: as the engine applied them (an end it ignored, a
        shared inferred session's, is written as none: found by review, a replay ended the session there; so is a role
        it ignored, which a replay would have set; and its TTL is the one it applied, which a shared turn's hint could
        only lengthen, where a replay would have shortened the other user's pin to it)."""
        if self.stopped:
            return
        if not compat.request_ran(request):  # aborted while it waited: nothing was served (found by review: it was
            self.recording.abandoned(request.request_id)  # written as served, its prefill counted in replays)
            return
        try:
            computed = compat.preempted_prompt_tokens(self.scheduler, request, self.block_size)
            prompt, output, blocks, tokens = compat.finished_request_shape(request, self.block_size, computed)
            h = hints or TurnHints()
            rec = self.recording
            rec.finished(request.request_id, self.clock(), Finished(
                prompt, output, blocks, role=h.role if applied is None else applied.role,
                ttl_s=h.ttl_s if applied is None else applied.ttl_s,
                end=h.end and (applied is None or applied.end),
                compacted=compat.request_compacted(request), tokens=tokens))
            if rec.full:
                logger.warning("kvsched: the recording %s reached %s (%.0f MB, %d requests): it stops here, whole "
                               "up to that request", self.path, ENV_MAX_MB, rec.chars / 1e6, rec.written)
                self.stopped = True
                self.close()
        except Exception:
            self._fail()

    def _fail(self) -> None:
        self.stopped = True
        logger.exception("kvsched: recording to %s failed; the engine goes on without it", self.path)
        self.recording.stop()  # what it kept for later lines goes (a full recording let it go itself)
        self.close()

    def close(self) -> None:
        """Close the file. Its flush can fail as the write did (a full disk): found by review, that raised out of
        `_fail` into vLLM's step and stopped the engine."""
        if not self.stream.closed:
            try:
                self.stream.close()
            except OSError:
                logger.warning("kvsched: the recording %s could not be flushed; its last line may be cut short",
                               self.path)


def tier_block_bytes(scheduler: Any) -> int:
    """Bytes one engine block takes in kvsched's FP8 tier on this engine (its own KV layout and dtype), 0 when the
    tier could not hold this model's KV."""
    from kvsched.adapters.vllm.tier_layout import TierUnsupported, geometry_of

    try:
        return geometry_of(scheduler.kv_cache_config, None).block_bytes
    except (TierUnsupported, AttributeError, ImportError) as exc:
        logger.info("kvsched: the recording names no FP8-tier block size (%s)", exc)
        return 0
