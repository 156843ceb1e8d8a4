"""Type stub of kvsched._C (csrc/bindings.cpp). Arrays cross as data pointers (`tensor.data_ptr()`); kvsched.ops
validates dtypes, shapes and devices before calling in, so call these through kvsched.ops."""

def retention_values(
    tokens: int, bytes_per_token: int, idle_s: int, next_use_s: int, role_weight: int, reuse_count: int, n: int, out: int
) -> None: ...
def score_select(
    tokens: int,
    bytes_per_token: int,
    idle_s: int,
    next_use_s: int,
    role_weight: int,
    reuse_count: int,
    pinned: int,
    n: int,
    k: int,
    out: int,
) -> int: ...
def gather_quantize_fp8(
    cache: int,
    dtype: int,
    num_blocks: int,
    num_heads: int,
    rows: int,
    cols: int,
    stride_block: int,
    stride_head: int,
    stride_row: int,
    block_ids: int,
    num_ids: int,
    q: int,
    scales: int,
) -> None: ...
def scatter_dequantize_fp8(
    q: int,
    scales: int,
    cache: int,
    dtype: int,
    num_blocks: int,
    num_heads: int,
    rows: int,
    cols: int,
    stride_block: int,
    stride_head: int,
    stride_row: int,
    block_ids: int,
    num_ids: int,
) -> None: ...
def fp32_to_e4m3(src: int, dst: int, n: int) -> None: ...
def e4m3_to_fp32(src: int, dst: int, n: int) -> None: ...
def fp8_best_isa() -> str: ...
def fp8_active_isa() -> str: ...
def fp8_set_max_isa(name: str) -> None: ...

class GhostLru:
    """The pin payback tracker's ghost LRU, compiled (kvsched.core.ghost_lru.LruGhost's interface; use
    kvsched.ops.ghost.new_ghost). Keys are hashable objects tracked by their Python hash: two keys of one hash are one
    key (never two ints in [0, 2^61 - 1), the simulator's ids; for bytes digests, vLLM's, a 64-bit SipHash collision)."""

    def __init__(self, rate: int) -> None: ...
    def observe(self, keys: object, cached_blocks: int, hittable: int, cap: int) -> tuple[int, int, int, bool]: ...
    def cached(self, keys: object, cap: int) -> None: ...
    def __len__(self) -> int: ...
    def held(self) -> int: ...
    def keys(self) -> list[int]: ...
    def running(self) -> dict[int, int]: ...

def crc32c(data: int, n: int, crc: int = 0) -> int: ...
def crc32c_portable(data: int, n: int, crc: int = 0) -> int: ...
def crc32c_hardware() -> bool: ...
def crc32c_segments(addrs: int, lens: int, items: int, per_item: int, out: int) -> None: ...
