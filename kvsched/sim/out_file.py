"""Output files written whole or not at all: through a temporary file beside the destination, renamed over it once
complete. A failed write (a full disk, a file-size limit, an error half-way) leaves the destination as it was (found
by review: `kvsched simulate --out` and `--write-trace` left truncated files behind). A destination that exists and is
not a regular file (/dev/stdout, /dev/null, a FIFO) is written directly: a rename would replace it, and there is no
file to protect."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


def check_out(dst: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """`dst` as written (a symlink's target, unless it is a stream such as /dev/stdout), refused with a ValueError
    naming it when it is a directory or one of `inputs`."""
    if dst.is_dir():
        raise ValueError(f"{dst} is a directory; give a file path")
    for src in inputs:
        if dst.exists() and src.exists() and os.path.samefile(src, dst):
            raise ValueError(f"{dst}: the output would overwrite the input {src}; give another path")
    if dst.exists() and not dst.is_file():  # a stream: written as it is named (found by review: /dev/stdout
        return dst  # resolved to /proc/PID/fd/pipe:[N], which cannot be opened by that name)
    try:
        return dst.resolve() if dst.is_symlink() else dst  # written through a link: its target gets the file
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError on Python 3.11)
        raise ValueError(f"{dst}: cannot resolve the path ({exc})") from None


@contextlib.contextmanager
def written_whole(dst: Path, inputs: tuple[Path, ...] = ()) -> Iterator[TextIO]:
    """Open a temporary text file for `dst` (checked by `check_out`); on a clean exit it replaces `dst`, keeping the
    old file's permission bits."""
    dst = check_out(dst, inputs)
    if dst.exists() and not dst.is_file():
        with _opened(dst, dst) as f:
            yield f
        return
    # a short name (found by review: `.{a 250-character name}.part` was past the file system's limit)
    tmp = dst.with_name(f".{hashlib.sha256(dst.name.encode()).hexdigest()[:16]}.{os.getpid()}.part")
    try:
        with _opened(tmp, dst) as f:
            yield f
        if dst.exists():
            os.chmod(tmp, stat.S_IMODE(dst.stat().st_mode))
        tmp.replace(dst)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _opened(path: Path, named: Path) -> Iterator[TextIO]:
    try:
        f = open(path, "w")  # noqa: SIM115 - closed by the with below
    except OSError as exc:  # name the file asked for, not a temporary one
        raise ValueError(f"{named}: cannot write ({exc.strerror or exc})") from None
    with f:
        yield f
