"""`crc32c`: CRC32C (Castagnoli, reflected polynomial 0x82F63B78, the iSCSI / RFC 3720 checksum) of a buffer, and
`crc32c_segments`, one CRC per item over several runs of memory (the FP8 tier's slots, each a run per layer).

The table-driven Python below is the specification ("123456789" -> 0xE3069283); the C++ implementation
(csrc/crc32c.cpp) runs the SSE4.2 crc32 instruction over three interleaved streams, ~10 GiB/s on one Xeon core
against zlib.crc32's ~2 (BENCHMARKS.md), or a slicing-by-8 table on CPUs without it. Both continue a running `crc` as
zlib.crc32's second argument does. Why not zlib.crc32: the tier checks a slot on the engine thread before every restore.
CPU memory only (host slots); a tensor must be contiguous (ValueError otherwise: a strided view's bytes are not one
run).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

from kvsched.ops import backends
from kvsched.ops.registry import Impl, Op, any_device, on_devices

POLY = 0x82F63B78
Buffer = torch.Tensor | bytes | bytearray | memoryview | np.ndarray


def _table() -> list[int]:
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        out.append(c)
    return out


TABLE = _table()


def as_array(data: Buffer) -> np.ndarray:
    """The bytes of `data` as a 1-D uint8 array without a copy; ValueError for a non-contiguous or non-CPU tensor or
    buffer, TypeError for anything else."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            raise ValueError(f"crc32c reads host memory, got a {data.device.type} tensor")
        if not data.is_contiguous():
            raise ValueError("crc32c needs a contiguous tensor (a strided view's bytes are not one run)")
        data = data.detach().reshape(-1).view(torch.uint8).numpy() if data.numel() else np.empty(0, np.uint8)
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ValueError("crc32c needs a contiguous array")
        return data.reshape(-1).view(np.uint8)
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        if not view.c_contiguous:
            raise ValueError("crc32c needs a contiguous buffer")
        return np.frombuffer(view.cast("B"), dtype=np.uint8) if view.nbytes else np.empty(0, np.uint8)
    raise TypeError(f"crc32c takes a tensor, an array or a bytes-like object, not {type(data).__name__}")


def _check_crc(crc: int) -> int:
    if not 0 <= crc < 1 << 32:
        raise ValueError(f"crc must be an unsigned 32-bit value, got {crc}")
    return crc


# ------------------------------------------------------------------------------------------------ Python reference
def crc32c_python(data: Buffer, crc: int = 0) -> int:
    c = _check_crc(crc) ^ 0xFFFFFFFF
    for b in as_array(data).tobytes():
        c = (c >> 8) ^ TABLE[(c ^ b) & 0xFF]
    return c ^ 0xFFFFFFFF


def crc32c_segments_python(addrs: np.ndarray, lens: np.ndarray) -> list[int]:
    """Reads memory by address: `addrs` must point at live host memory of `lens` bytes (as the C++ path requires)."""
    out = []
    for row_a, row_l in zip(addrs.tolist(), lens.tolist(), strict=True):
        c = 0
        for a, n in zip(row_a, row_l, strict=True):
            c = crc32c_python(ctypes.string_at(a, n) if n else b"", c)
        out.append(c)
    return out


# ---------------------------------------------------------------------------------------------------- C++ kernel
def _cxx() -> Any:
    mod = backends.cxx()
    return mod if getattr(mod, "crc32c_segments", None) is not None else None


def has_cxx_crc32c() -> bool:
    """kvsched._C is built and carries crc32c (an extension built before it did not)."""
    return _cxx() is not None


def crc32c_cxx(data: Buffer, crc: int = 0) -> int:
    arr = as_array(data)
    return int(_cxx().crc32c(arr.ctypes.data, arr.nbytes, _check_crc(crc)))


def crc32c_segments_cxx(addrs: np.ndarray, lens: np.ndarray) -> list[int]:
    a = np.ascontiguousarray(addrs, dtype=np.uint64)
    n = np.ascontiguousarray(lens, dtype=np.int64)
    out = np.empty(a.shape[0], dtype=np.uint32)
    _cxx().crc32c_segments(a.ctypes.data, n.ctypes.data, a.shape[0], a.shape[1] if a.ndim == 2 else 0, out.ctypes.data)
    return [int(x) for x in out.tolist()]


_BYTES = (torch.uint8,)
CRC32C = Op("crc32c", reference=Impl("python", crc32c_python, any_device(_BYTES), priority=0),
            impls=(Impl("cxx", crc32c_cxx, on_devices(("cpu",), _BYTES, has_cxx_crc32c), 20, frozenset({"cpu"})),))
CRC32C_SEGMENTS = Op(
    "crc32c_segments", reference=Impl("python", crc32c_segments_python, any_device(_BYTES), priority=0),
    impls=(Impl("cxx", crc32c_segments_cxx, on_devices(("cpu",), _BYTES, has_cxx_crc32c), 20, frozenset({"cpu"})),))


def crc32c(data: Buffer, crc: int = 0, *, impl: str | None = None) -> int:
    """CRC32C of `data`'s bytes continuing `crc` (0 to start); `impl` picks "python" or "cxx" (default: the fastest)."""
    fn: Any = CRC32C.resolve("cpu", torch.uint8, impl).fn
    return int(fn(data, crc))


def crc32c_segments(addrs: np.ndarray, lens: np.ndarray, *, impl: str | None = None) -> list[int]:
    """One CRC32C per row of `addrs` / `lens` ([items, segments]: host addresses and byte counts), each over its
    segments in order, from 0. The caller keeps that memory alive and unchanged during the call."""
    if addrs.shape != lens.shape or addrs.ndim != 2:
        raise ValueError(f"addrs and lens must be 2-D of one shape, got {addrs.shape} and {lens.shape}")
    if lens.size and int(lens.min()) < 0:
        raise ValueError("segment lengths must be >= 0")
    fn: Any = CRC32C_SEGMENTS.resolve("cpu", torch.uint8, impl).fn
    return list(fn(addrs, lens))
