"""The disk level's files: one file per (block, tensor-parallel rank) under `DIR/<identity>/`, written whole and
renamed into place, so a reader sees a complete file or none (a crash mid-write leaves a `.tmp` file, removed at the
next start; a crash between the ranks' writes leaves a block's files of some ranks only, removed by a start once they
are PARTIAL_GRACE_S old). Each file is a framed block (tier_blob): a file of another model, a truncated or corrupted
file, fails its checks when read and is skipped, never served.

`DIR/<identity>/IDENTITY.json` says in words which model and geometry the files belong to; an engine of another
model or geometry uses another subdirectory of the same DIR.

One engine owns `DIR/<identity>/` at a time: at start its scheduler takes an exclusive, non-blocking `flock` on
`DIR/<identity>/.lock` (`claim`, held until the process exits; the file names the holder's pid). A second engine of the
same model on the same DIR runs without the disk level, saying so, and takes it once the other lets go (a rolling
update; tier_levels tries again every 30 s). Found by review: its start-up scan removed every `.tmp` file, the first
engine's writes in flight among them, so they failed; and tried once, it never had the level after a rolling update.
The scan also spares a `.tmp` file whose writer (its name carries the pid) is still alive on this host, should the
lock not hold (a file system without `flock`): only a dead writer's leftovers go.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from kvsched.adapters.vllm.tier_blob import framed_len
from kvsched.adapters.vllm.tier_levels_config import ENV_DISK_GB, LevelsConfig
from kvsched.core.disk_tier import DiskDirectory
from kvsched.core.rank_shares import RankShares

logger = logging.getLogger("vllm.kvsched.fp8_tier")
SUFFIX = ".kv"
LOCK = ".lock"
# A block's files of a dead engine's ranks land within seconds of each other (each worker writes behind, and gets 10 s
# at shutdown): a key some ranks lack that long after its newest file never gets the others.
PARTIAL_GRACE_S = 600.0
# No --kvsched-disk-tier-gb: half of what the directory's file system has free plus what this model's files found at
# start-up take (found by review: of the free space alone, each restart shrank the budget and deleted KV the previous
# run wrote, the very blocks a restart is to restore).
DISK_DEFAULT_FREE_FRACTION = 0.5


class DiskFiles:
    def __init__(self, root: Path | str, identity: str, description: dict[str, Any], rank: int = 0,
                 world_size: int = 1) -> None:
        self.dir = Path(root) / identity
        self.identity = identity
        self.rank = rank
        self.world_size = world_size
        self.description = description
        self._n = 0
        self._make_dir()
        self.unit = allocation_unit(self.dir)
        self.found_bytes = 0  # bytes of the files the last `scan` indexed (this identity's, every rank's)
        self.partial_bytes = self.partial_removed = 0  # the last scan's keys only some ranks wrote (see `scan`)

    def claim(self, quiet: bool = False) -> bool:
        """Take the directory for this engine (see the module docstring); False, with a warning naming the directory
        and the holder (none if `quiet`: a retry), if another engine holds it. A file system without locks: True,
        with a warning."""
        f = open(self.dir / LOCK, "a+b")  # noqa: SIM115 - held open while this object lives
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.seek(0)
            holder = f.read(32).decode(errors="replace").strip() or "unknown"
            f.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                logger.warning("kvsched disk tier: cannot lock %s (%s); running unlocked: give each engine its own "
                               "--kvsched-disk-tier-dir", self.dir / LOCK, exc)
                return True
            if not quiet:
                logger.warning("kvsched disk tier: %s is in use by another engine of this model (pid %s); running "
                               "without the disk level until it is free (tried again every 30 s): give each engine its "
                               "own --kvsched-disk-tier-dir", self.dir, holder)
            return False
        f.truncate(0)
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        self._lock = f  # the lock goes with the file: at exit, or once this object is dropped
        return True

    def on_disk(self, size: int) -> int:
        """The bytes a file of `size` bytes takes on this file system: whole blocks of `unit` (found by review: the
        budget counted frame bytes, so the test model's 8,280-byte frames took 48% more disk than it said)."""
        return -(-size // self.unit) * self.unit

    def path(self, key: bytes, rank: int | None = None) -> Path:
        h = key.hex()
        return self.dir / h[:2] / f"{h}.r{self.rank if rank is None else rank}{SUFFIX}"

    def _make_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        ident = self.dir / "IDENTITY.json"
        if not ident.exists():
            tmp = self.dir / f".IDENTITY.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(self.description, indent=1, default=str))
            os.replace(tmp, ident)

    def write(self, key: bytes, blob: bytes) -> None:
        """Write a framed block atomically (temporary file, then rename); OSError (a full disk) leaves nothing. A
        directory removed while the engine runs (a tmp cleaner, `rm -rf`) is made again, with its IDENTITY.json (found
        by review: only the 2-hex subdirectory was, so every later write failed)."""
        path = self.path(key)
        if not path.parent.is_dir():
            self._make_dir()
            path.parent.mkdir(exist_ok=True)
        self._n += 1
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{self._n}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def read(self, key: bytes) -> bytes | None:
        """The file's bytes; None if it cannot be read, whatever the reason (gone, permissions, an I/O error): the
        block is then recomputed, never a failed step."""
        try:
            return self.path(key).read_bytes()
        except OSError:
            return None

    def delete(self, key: bytes) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError:  # left behind: the next start-up's scan meets it under its budget
            pass

    def scan(self, now: float | None = None) -> list[bytes]:
        """Keys whose files exist for every rank, oldest first (by modification time); temporary files of writers
        no longer alive are removed. Files are checked when read, not here: a start-up reads no block. `found_bytes`
        becomes the size of the files of those keys (the automatic budget counts them as available: tier_levels). A
        file or subdirectory that cannot be read or removed (a read-only file system, found by review) is skipped,
        not the scan. Called with the directory's lock held (`claim`).

        A key only some ranks wrote (the engine died between its ranks' writes) is never indexed, so nothing else
        would ever delete it (found by review: every crash left such files, past the budget): its files go once the
        newest is PARTIAL_GRACE_S old (counted in `partial_removed`, keys), and until then count in `partial_bytes`
        (tier_levels takes them off the budget); younger, they may be a dying engine's writes still landing."""
        found: dict[bytes, list[tuple[float, int, Path]]] = {}  # key -> (mtime, bytes on disk, file) per rank
        for sub in self.dir.iterdir():
            if not sub.is_dir():
                continue
            try:
                entries = list(sub.iterdir())
            except OSError:
                continue
            for f in entries:
                name = f.name
                if name.endswith(".tmp"):
                    if not _writer_alive(name):
                        _remove([f])
                    continue
                if not name.endswith(SUFFIX):
                    continue
                stem, _, rank = name[:-len(SUFFIX)].rpartition(".r")
                try:
                    key = bytes.fromhex(stem)
                    int(rank)
                    st = f.stat()
                except (ValueError, OSError):
                    continue
                # what it takes on disk (whole file-system blocks), as the free space and the budget count it
                taken = max(self.on_disk(st.st_size), getattr(st, "st_blocks", 0) * 512)
                found.setdefault(key, []).append((st.st_mtime, taken, f))
        cutoff = (time.time() if now is None else now) - PARTIAL_GRACE_S
        full: list[tuple[float, bytes]] = []
        self.found_bytes = self.partial_bytes = self.partial_removed = 0
        for key, files in found.items():
            newest, taken = max(m for m, _, _ in files), sum(n for _, n, _ in files)
            if len(files) >= self.world_size:
                full.append((newest, key))
                self.found_bytes += taken
            elif newest < cutoff and _remove([f for _, _, f in files]):
                self.partial_removed += 1
            else:
                self.partial_bytes += taken
        return [k for _, k in sorted(full)]

    def free_bytes(self) -> int:
        return int(shutil.disk_usage(self.dir).free)


def open_level(cfg: LevelsConfig, identity: str, description: dict[str, Any], block_bytes: int, world_size: int,
               shares: RankShares, quiet: bool = False) -> tuple[DiskFiles, DiskDirectory, list[Any]] | None:
    """The disk level's files (holding the directory's lock), its books from the files found there, and the keys
    past its budget (their files to delete); None if another engine holds the directory. Every file-system call is
    in here, under the caller's OSError guard (found by review: the scan and the free-space query were outside it, so
    a read-only directory holding a stale .tmp file stopped the engine)."""
    files = DiskFiles(str(cfg.disk_dir), identity, description, 0, world_size)
    if not files.claim(quiet):  # another engine of this model runs on this directory (logged)
        return None
    found = files.scan()
    if cfg.disk_gb:
        budget, how = int(cfg.disk_gb * 2**30), f"--kvsched-disk-tier-gb / {ENV_DISK_GB}"
    else:
        budget = int((files.free_bytes() + files.found_bytes) * DISK_DEFAULT_FREE_FRACTION)
        how = "auto: half of the free space and of its own files"
    budget = max(0, budget - files.partial_bytes)  # blocks some ranks have yet to write, too young to delete
    files_bytes = sum(n * files.on_disk(framed_len(32, b)) for n, b in shares.rank_bytes(block_bytes))
    disk = DiskDirectory(budget, files_bytes)  # one file per rank, each of its stage's layers
    excess = disk.load_index(found)
    if disk.capacity == 0:  # found by review: a budget below one block's files ran the level holding nothing
        logger.warning("kvsched disk tier: %.6f GiB holds no block (%d bytes on disk for every rank's file of "
                       "one block): the level keeps nothing", budget / 2**30, disk.block_bytes)
    logger.info("kvsched disk tier: %s, %.2f GiB (%s), %d blocks found on disk (%d written by some ranks only "
                "removed)", files.dir, budget / 2**30, how, len(disk.written), files.partial_removed)
    return files, disk, excess


MAX_ALLOCATION_UNIT = 64 << 10  # network file systems report their transfer size (NFS 1 MiB, CephFS 4 MiB) here


def allocation_unit(path: Path) -> int:
    """The block a file's size is rounded up to on the file system holding `path`: its fragment size (statvfs),
    else the directory's preferred block size (stat), else 4096; at most MAX_ALLOCATION_UNIT (found by review: on
    CephFS each 8 KiB block file counted as 4 MiB, a budget 340x smaller than the files take)."""
    for size in (lambda: os.statvfs(path).f_frsize, lambda: os.stat(path).st_blksize):
        try:
            if (unit := int(size())) > 0:
                return min(unit, MAX_ALLOCATION_UNIT)
        except (OSError, AttributeError):
            continue
    return 4096


def _remove(files: list[Path]) -> bool:
    """Whether every one of `files` could be removed (one that cannot, e.g. on a read-only file system, is left for
    a start-up that can)."""
    ok = True
    for f in files:
        try:
            f.unlink(missing_ok=True)
        except OSError:
            ok = False
    return ok


def _writer_alive(name: str) -> bool:
    """Whether the process that is writing temporary file `name` (`.<file>.<pid>.<n>.tmp`) is alive on this host."""
    try:
        pid = int(name.split(".")[-3])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False  # not a name this module writes, or its writer is gone
    except OSError:  # EPERM: alive, another user's
        return True
    return True
