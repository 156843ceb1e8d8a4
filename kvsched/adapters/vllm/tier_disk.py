"""The disk level's files: one file per (block, tensor-parallel rank) under `DIR/<identity>/`, written whole and
renamed into place, so a reader sees a complete file or none (a crash mid-write leaves a `.tmp` file, removed at the
next start). Each file is a framed block (tier_blob): a file of another model, a truncated or corrupted file, fails
its checks when read and is skipped, never served.

`DIR/<identity>/IDENTITY.json` says in words which model and geometry the files belong to; an engine of another
model or geometry uses another subdirectory of the same DIR.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

SUFFIX = ".kv"


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
        self.found_bytes = 0  # bytes of the files the last `scan` indexed (this identity's, every rank's)

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

    def scan(self) -> list[bytes]:
        """Keys whose files exist for every rank, oldest first (by modification time); stale temporary files are
        removed. Files are checked when read, not here: a start-up reads no block. `found_bytes` becomes the size of
        the files of those keys (the automatic budget counts them as available: tier_levels). A file or subdirectory
        that cannot be read or removed (a read-only file system, found by review) is skipped, not the scan."""
        found: dict[bytes, list[float]] = {}
        sizes: dict[bytes, int] = {}
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
                    try:
                        f.unlink(missing_ok=True)
                    except OSError:  # read-only: left for a start-up that can remove it
                        pass
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
                found.setdefault(key, []).append(st.st_mtime)
                # what it takes on disk (whole file-system blocks), as the free space counts it
                sizes[key] = sizes.get(key, 0) + max(st.st_size, getattr(st, "st_blocks", 0) * 512)
        full = [(max(t), k) for k, t in found.items() if len(t) >= self.world_size]
        self.found_bytes = sum(sizes[k] for _, k in full)
        return [k for _, k in sorted(full)]

    def free_bytes(self) -> int:
        return int(shutil.disk_usage(self.dir).free)
