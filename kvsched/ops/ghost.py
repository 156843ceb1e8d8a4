"""The pin payback tracker's ghost LRU: compiled (`kvsched._C.GhostLru`) when the extension is built, else the
reference `kvsched.core.ghost_lru.LruGhost`. Both take the same calls and make the same decisions; the compiled one
keys blocks by their Python hash: the int itself for ints in [0, 2^61 - 1), the simulator's ids; SipHash for vLLM's
bytes hashes, where a 64-bit collision would merge two blocks of the estimate, never touch the real pool. (Other keys
may share a hash, -1 and -2 do: the compiled ghost counts them as one.)

`KVSCHED_GHOST=python` keeps the reference (for comparisons; any other value but `auto` and `cxx` is an error)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from kvsched.core.ghost_lru import LruGhost
from kvsched.core.pin_payback import Ghost
from kvsched.ops import backends

GHOST_ENV = "KVSCHED_GHOST"
CHOICES = ("auto", "cxx", "python")


def ghost_choice(environ: Mapping[str, str] | None = None) -> str:
    """`KVSCHED_GHOST`, validated (a bad value raises ValueError naming the variable)."""
    raw = (os.environ if environ is None else environ).get(GHOST_ENV, "auto")
    value = raw.strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{GHOST_ENV}={raw!r}: choose one of {', '.join(CHOICES)}")
    return value


def check_ghost_setting(environ: Mapping[str, str] | None = None) -> None:
    """`KVSCHED_GHOST` is well-formed, and `cxx` only where the compiled ghost is built (ValueError naming it)."""
    if ghost_choice(environ) == "cxx" and getattr(backends.cxx(), "GhostLru", None) is None:
        raise ValueError(f"{GHOST_ENV}='cxx': kvsched._C has no GhostLru here (rebuild it: `make ext`), or use auto")


def new_ghost(rate: int, choice: str | None = None) -> Ghost:
    """A ghost sampling 1 key in `rate` (`kvsched.core.pin_payback.PinPayback.rate`). `choice`: `auto` (compiled when
    built), `cxx` (raises RuntimeError when it is not built) or `python`; None reads KVSCHED_GHOST."""
    choice = ghost_choice() if choice is None else choice
    mod = backends.cxx() if choice != "python" else None
    cls = getattr(mod, "GhostLru", None)
    if cls is None:
        if choice == "cxx":
            raise RuntimeError("KVSCHED_GHOST=cxx but kvsched._C has no GhostLru (rebuild it: `make ext`)")
        return LruGhost(rate)
    ghost: Ghost = cls(rate)
    return ghost
