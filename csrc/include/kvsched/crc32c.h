// CRC32C (Castagnoli, reflected polynomial 0x82F63B78; iSCSI / RFC 3720) of the FP8 tier's in-memory slots. The tier
// checks a slot before every restore on the engine thread: zlib.crc32 ran at ~2 GiB/s there, slower than the PCIe copy
// it guards, so the slots use the SSE4.2 crc32 instruction instead (the disk and store blobs keep zlib.crc32).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvsched {

// crc32c(data, crc) continues `crc` (0 to start) like zlib.crc32's second argument: pre- and post-inverted.
uint32_t crc32c(const void* data, size_t n, uint32_t crc);

// The same with the table-driven path whatever the CPU has (tests compare both).
uint32_t crc32c_portable(const void* data, size_t n, uint32_t crc);

// Whether crc32c uses the crc32 instruction on this CPU (SSE4.2).
bool crc32c_hardware();

// out[i] = the CRC32C of segments i * per_item .. (i + 1) * per_item - 1 taken in order (addresses and lengths in
// bytes), starting from 0: one call checks many slots, each laid out as several runs of memory.
void crc32c_segments(const uint64_t* addrs, const int64_t* lens, int64_t items, int64_t per_item, uint32_t* out);

}  // namespace kvsched
