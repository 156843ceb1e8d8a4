"""How one FP8-tier block leaves the engine for the disk or shared level: a framed payload that says what it is.

    magic "KVSBLK01" | identity (16 bytes) | rank u16 | key length u16 | payload length u64 | CRC32 u32 | key | payload

`identity` is a digest of the model and the cache geometry (`identity_of`): another model, weights, on-the-fly weight
quantization, dtype, block size, tensor-parallel size, tier mode or tier format gives another identity, so its blocks
are never served here, even from a directory or store shared by mistake. Weights it cannot identify (no local file to
sample, no resolved Hub commit) give an identity of this engine's own, shared with nothing. The workers frame blocks
with it bound to their attention backend's kernel-block split, if any (`frame_identity`). `key` is vLLM's content
hash of the block (it covers every earlier token and the `cache_salt`). The CRC covers identity, rank, key and
payload: a torn or truncated file, a flipped byte, a block of another key or rank all fail `decode`, which says why;
the caller then recomputes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any

logger = logging.getLogger("vllm.kvsched.fp8_tier")
MAGIC = b"KVSBLK01"
HEAD = struct.Struct("<8s16sHHQI")
# What a block's payload means (FP8 layout, scales, tail handling): raise it whenever that changes, so blocks an
# older kvsched wrote to a disk or store are never read as this version's. 2: the identity covers weight
# quantization and dtype and samples weight contents instead of file mtimes.
TIER_FORMAT = 2
WEIGHT_HEAD_BYTES = 1 << 20  # a weight file's first MiB (a safetensors header: tensor names, dtypes, shapes, offsets)
WEIGHT_SAMPLES, WEIGHT_SAMPLE_BYTES = 256, 16 << 10  # then 256 evenly spaced 16 KiB samples: 5 MiB read a file
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
COMMIT = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # a git commit (sha1, or sha256 repositories)
# What C of a page [H, N, C] holds on CUDA: each token's K then V (FlashAttention, FlashInfer and Triton attention
# split C in two). vLLM's CPU backend reads the same bytes as the page's K rows then its V rows (`cpu_attn.py`: view
# [2 * N, head_size], chunk): the same geometry, dtype and block size, another meaning. Found by review: a CPU and a
# GPU replica sharing a store or a disk directory served each other's blocks scrambled (the CRC passes: the bytes are
# intact, read as other tokens' K and V). Other platforms are named too, so none shares blocks with another.
KV_ROWS_PER_TOKEN = "per-token K|V"
_PROCESS_TOKEN = uuid.uuid4().hex  # an identity nothing else has, when the engine config carries no instance id
_unshareable_logged = False


class BlobError(ValueError):
    """A framed block that must not be served; the message says why (counted, then recomputed)."""


def encode(identity: str, rank: int, key: bytes, payload: bytes) -> bytes:
    ident = bytes.fromhex(identity)
    crc = zlib.crc32(payload, zlib.crc32(key, zlib.crc32(struct.pack("<16sH", ident, rank))))
    return HEAD.pack(MAGIC, ident, rank, len(key), len(payload), crc) + key + payload


def decode(blob: bytes | memoryview, identity: str, rank: int, key: bytes, payload_len: int) -> bytes:
    """The payload of `blob` if it is exactly the block (`identity`, `rank`, `key`) of `payload_len` bytes, intact."""
    if len(blob) < HEAD.size:
        raise BlobError(f"truncated: {len(blob)} bytes, shorter than the header")
    magic, ident, r, key_len, plen, crc = HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise BlobError("not a kvsched block (bad magic)")
    if ident != bytes.fromhex(identity):
        raise BlobError("written for another model or cache geometry")
    if r != rank:
        raise BlobError(f"written by tensor-parallel rank {r}, not {rank}")
    if len(blob) != HEAD.size + key_len + plen:
        raise BlobError(f"torn: {len(blob)} bytes, the header says {HEAD.size + key_len + plen}")
    got_key = bytes(blob[HEAD.size:HEAD.size + key_len])
    if got_key != key:
        raise BlobError("holds another block (key mismatch)")
    if plen != payload_len:
        raise BlobError(f"payload of {plen} bytes, expected {payload_len}")
    payload = bytes(blob[HEAD.size + key_len:])
    if zlib.crc32(payload, zlib.crc32(key, zlib.crc32(struct.pack("<16sH", ident, r)))) != crc:
        raise BlobError("checksum mismatch (torn or corrupted bytes)")
    return payload


def frame_identity(identity: str, split: list[Any]) -> str:
    """The identity a worker frames its blocks with: `identity` (the scheduler's too: directory and store key names),
    bound to the kernel-block split of its views (tier_layout.kernel_split) when there is one. An attention backend
    whose kernel block is smaller than --block-size lays a slot out kernel block by kernel block: in RAW mode a payload
    of another split has the same length and was restored scrambled (found by review). The split is chosen on the
    workers, after the scheduler named its directory and keys: engines of two splits on one directory or store write
    the same names, and each fails the other's blocks (recomputed), never serves them."""
    if not split:
        return identity
    return hashlib.sha256(json.dumps([identity, split]).encode()).hexdigest()[:32]


def framed_len(key_len: int, payload_len: int) -> int:
    return HEAD.size + key_len + payload_len


def weights_digest(f: Path, size: int) -> str:
    """A digest of weight file `f`'s contents, cheap enough for every start: its first MiB and evenly spaced samples
    (not its mtime, which differs between hosts holding copies of the same weights, so they never shared a block;
    found by review). Another checkpoint of the same architecture (same names, same sizes) differs in nearly every
    sample: a full fine-tune everywhere; a LoRA merged into q/v projections changes ~10% of the bytes, which all 256
    samples miss with probability ~0.9^256 = 2e-12. Read after vLLM loaded the weights: from the page cache."""
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        h.update(fh.read(WEIGHT_HEAD_BYTES))
        rest = size - WEIGHT_HEAD_BYTES
        if rest > 0:
            for i in range(WEIGHT_SAMPLES):
                fh.seek(WEIGHT_HEAD_BYTES + rest * i // WEIGHT_SAMPLES)
                h.update(fh.read(WEIGHT_SAMPLE_BYTES))
    return h.hexdigest()[:32]


def _weights(path: Path) -> list[tuple[str, int, str]]:
    """(name, size, sampled digest) of the weight files at `path`: a directory's, or the file itself (a single-file
    checkpoint such as model.gguf: found by review, it was never hashed); none for a Hub id."""
    files = sorted(f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES) if path.is_dir() else [path]
    weights: list[tuple[str, int, str]] = []
    for f in files:
        if not f.is_file():
            continue
        size = f.stat().st_size
        try:
            content = weights_digest(f, size)
        except OSError as exc:  # unreadable here: this host's own identity (never another's blocks)
            content = f"unreadable:{exc.errno}:{f.stat().st_mtime_ns}"
        weights.append((f.name, size, content))
    return weights


def _commit(revision: Any) -> str | None:
    """The commit a revision pins: vLLM 0.32 resolves `--revision` to huggingface_hub's `ResolvedRevision`, a str
    whose text is the name asked for ("main") and whose `.resolved` is the commit (found by review: the name was
    recorded, so two engines on two commits of one repo shared an identity). A plain str is a commit only if it
    looks like one."""
    rev = getattr(revision, "resolved", revision)
    return str(rev) if rev is not None and COMMIT.fullmatch(str(rev)) else None


def identity_of(vllm_config: Any, geometry: Any, world_size: int) -> tuple[str, dict[str, Any]]:
    """(digest, description) of what a block's bytes mean: the model (name, its config, on-the-fly weight quantization
    (`--quantization fp8` changes every activation, so the KV), compute dtype, the resolved commit and the local weight
    files' names, sizes and sampled contents), the tier geometry, mode and format, the block size and the
    tensor-parallel size. The description is written next to the disk level's files for people to read.

    Weights known by neither (a Hub id whose revision could not be resolved, a directory without weight files) get
    an identity of this engine alone (`unshareable` says why; logged once): nothing shows which weights another
    engine's blocks were computed with, so none is served here and none of this engine's is served elsewhere."""
    model = vllm_config.model_config
    try:
        hf = model.hf_config.to_json_string(use_diff=False)
    except Exception:  # a config object without it: its repr still distinguishes models
        hf = repr(model.hf_config)
    path = Path(str(model.model))
    weights = _weights(path) if path.exists() else []
    revision = getattr(model, "revision", None)
    commit = _commit(revision)
    desc = {"format": MAGIC.decode(), "tier_format": TIER_FORMAT, "model": str(model.model),
            "revision": commit or (None if revision is None else str(revision)),
            "quantization": getattr(model, "quantization", None), "model_dtype": str(getattr(model, "dtype", None)),
            "hf_config_sha256": hashlib.sha256(hf.encode()).hexdigest(), "weights": weights,
            "layers": list(geometry.layers), "heads": geometry.heads, "rows": geometry.rows,
            "content": geometry.content, "dtype": str(geometry.dtype), "mode": geometry.mode,
            "block_size": int(vllm_config.cache_config.block_size), "world_size": world_size,
            # e4m3 and e5m2 caches are both uint8 to vLLM and copied byte for byte: only this tells them apart
            "cache_dtype": str(getattr(vllm_config.cache_config, "cache_dtype", None))}
    platform = platform_type()
    if platform != "cpu":  # what C means differs by backend (KV_ROWS_PER_TOKEN); CPU engines' identity is as it was
        desc["platform"], desc["kv_rows"] = platform, KV_ROWS_PER_TOKEN
    if not weights and commit is None:
        _unshareable(desc, vllm_config)
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return digest, desc


def platform_type() -> str:
    """The vLLM platform's device type ("cpu", "cuda", "rocm", ...), "cpu" when vLLM cannot say."""
    try:
        from vllm.platforms import current_platform

        return str(current_platform.device_type or "cpu")
    except Exception:  # no platform (a test's fake config without vLLM): the CPU's identity, as before
        return "cpu"


def _unshareable(desc: dict[str, Any], vllm_config: Any) -> None:
    """Make `desc` this engine's own: its host and vLLM's instance id (one per engine, the same in its scheduler and
    its workers), else a token of this process."""
    global _unshareable_logged
    desc["unshareable"] = (f"no weight file at {desc['model']!r} to sample and no resolved commit "
                           f"(revision {desc['revision']!r})")
    desc["engine"] = f"{socket.gethostname()}:{getattr(vllm_config, 'instance_id', '') or _PROCESS_TOKEN}"
    if not _unshareable_logged:
        _unshareable_logged = True
        logger.warning("kvsched FP8 tier: the model's weights cannot be identified (%s): its disk and shared blocks "
                       "are this engine's alone, never restored by a restart or another replica",
                       desc["unshareable"])
