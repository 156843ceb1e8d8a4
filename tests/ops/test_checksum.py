"""CRC32C (kvsched/ops/checksum.py): every implementation against the table-driven Python reference and the known
vectors, on the sizes and alignments the SSE4.2 path splits differently (head bytes, 3 x 256 and 3 x 8 KiB rounds,
tail), and bad input refused with a typed error."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from kvsched.ops import checksum
from kvsched.ops.checksum import CRC32C, crc32c, crc32c_segments
from tests.ops.conftest import require_cxx

SIZES = (0, 1, 7, 8, 255, 769, 4096 + 3, 3 * 8192 + 5, 1 << 20)


@pytest.fixture(params=[i.name for i in CRC32C.all()])
def crc_impl(request: pytest.FixtureRequest) -> str:
    if request.param == "cxx":
        require_cxx()
        if not checksum.has_cxx_crc32c():
            pytest.fail("kvsched._C is built without crc32c: rebuild it (make ext)")
    return str(request.param)


def test_known_vectors(crc_impl):
    """RFC 3720 B.4 and the common check value."""
    assert crc32c(b"123456789", impl=crc_impl) == 0xE3069283
    assert crc32c(b"", impl=crc_impl) == 0
    assert crc32c(bytes(32), impl=crc_impl) == 0x8A9136AA
    assert crc32c(b"\xff" * 32, impl=crc_impl) == 0x62A8AB43
    assert crc32c(bytes(range(32)), impl=crc_impl) == 0x46DD794E


@pytest.mark.parametrize("offset", [0, 3])
def test_random_buffers_match_the_reference_at_every_size_and_alignment(crc_impl, offset):
    data = np.random.default_rng(7).integers(0, 256, size=(1 << 20) + 16, dtype=np.uint8)
    for n in SIZES:
        if crc_impl == "python" and n > 4096 + 3:
            continue  # the reference is the specification, checked against the C++ at every size below
        buf = data[offset:offset + n]
        want = checksum.crc32c_python(buf) if n <= 4096 + 3 else None
        got = crc32c(buf, impl=crc_impl)
        if want is not None:
            assert got == want, n
        half = n // 2  # continuing a running crc, as zlib.crc32's second argument
        assert crc32c(buf[half:], crc32c(buf[:half], impl=crc_impl), impl=crc_impl) == got, n


def test_the_cxx_path_agrees_with_the_python_reference_on_a_mebibyte_and_with_its_table_path():
    require_cxx()
    from kvsched.ops import backends

    data = np.random.default_rng(3).integers(0, 256, size=1 << 20, dtype=np.uint8)
    got = crc32c(data, impl="cxx")
    assert got == checksum.crc32c_python(data)
    mod = backends.cxx()
    for n in (0, 1, 7, 4099, 1 << 20):
        assert mod.crc32c(data.ctypes.data + 1, n - 1 if n else 0, 5) == mod.crc32c_portable(
            data.ctypes.data + 1, n - 1 if n else 0, 5)


def test_it_is_not_zlibs_crc32():
    assert crc32c(b"123456789") != zlib.crc32(b"123456789")


def test_tensors_are_read_as_their_bytes_and_strided_views_are_refused(crc_impl):
    t = torch.arange(64, dtype=torch.float32)
    assert crc32c(t, impl=crc_impl) == checksum.crc32c_python(t.numpy().tobytes())
    with pytest.raises(ValueError, match="contiguous"):
        crc32c(t[::2], impl=crc_impl)
    with pytest.raises(ValueError, match="contiguous"):
        crc32c(memoryview(bytes(16)).cast("B", (4, 4))[::2], impl=crc_impl)
    with pytest.raises(TypeError):
        crc32c("text", impl=crc_impl)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32-bit"):
        crc32c(b"x", -1, impl=crc_impl)
    assert crc32c(torch.empty(0), impl=crc_impl) == 0


def test_segments_give_one_crc_per_item_over_its_runs_in_order(crc_impl):
    a = np.random.default_rng(1).integers(0, 256, size=5000, dtype=np.uint8)
    base = a.ctypes.data
    addrs = np.array([[base, base + 100, base + 4000], [base + 7, base + 7, base + 2000]], dtype=np.uint64)
    lens = np.array([[100, 3000, 1000], [0, 13, 999]], dtype=np.int64)
    got = crc32c_segments(addrs, lens, impl=crc_impl)
    want = [checksum.crc32c_python(np.concatenate([a[:100], a[100:3100], a[4000:5000]])),
            checksum.crc32c_python(np.concatenate([a[7:20], a[2000:2999]]))]
    assert got == want
    with pytest.raises(ValueError):
        crc32c_segments(addrs, lens[:1], impl=crc_impl)
    with pytest.raises(ValueError):
        crc32c_segments(addrs, -lens, impl=crc_impl)


def test_the_dispatcher_picks_the_cxx_path_on_the_cpu_when_built():
    want = "cxx" if checksum.has_cxx_crc32c() else "python"
    assert CRC32C.resolve("cpu", torch.uint8).name == want
