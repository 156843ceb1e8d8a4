"""Output files written whole or not at all: through a temporary file beside the destination, renamed over it once
complete. A failed write (a full disk, a file-size limit, an error half-way) leaves the destination as it was (found
by review: `kvsched simulate --out` and `--write-trace` left truncated files behind)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


def check_out(dst: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """`dst` as written (a symlink's target), refused with a ValueError naming it when it is not a regular file or is
    one of `inputs`."""
    try:
        dst = dst.resolve() if dst.is_symlink() else dst  # written through a link: its target gets the file
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError on Python 3.11)
        raise ValueError(f"{dst}: cannot resolve the path ({exc})") from None
    for src in inputs:
        if dst.exists() and src.exists() and os.path.samefile(src, dst):
            raise ValueError(f"{dst}: the output would overwrite the input {src}; give another path")
    if dst.exists() and not dst.is_file():  # the rename would replace a device, FIFO or directory entry
        raise ValueError(f"{dst}: not a regular file; give a file path")
    return dst


@contextlib.contextmanager
def written_whole(dst: Path, inputs: tuple[Path, ...] = ()) -> Iterator[TextIO]:
    """Open a temporary text file for `dst` (checked by `check_out`); on a clean exit it replaces `dst`."""
    dst = check_out(dst, inputs)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
    try:
        try:
            f = open(tmp, "w")  # noqa: SIM115 - closed below, before the rename
        except OSError as exc:  # name the file asked for, not the temporary one
            raise ValueError(f"{dst}: cannot write ({exc.strerror or exc})") from None
        with f:
            yield f
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
