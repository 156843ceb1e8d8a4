// CRC32C: the SSE4.2 crc32 instruction over three interleaved streams (its 3-cycle latency hides behind them; the
// streams are joined by multiplying by x^(8n) mod P, tables built once), a slicing-by-8 table elsewhere. After Mark
// Adler's crc32c.c (zlib licence) and zlib's crc32_combine arithmetic.
#include "kvsched/crc32c.h"

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVSCHED_CRC_X86 1
#include <nmmintrin.h>
#define KV_SSE42 __attribute__((target("sse4.2")))
#endif

namespace kvsched {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;
constexpr size_t kLong = 8192;  // bytes per stream in a long round (3 x 8 KiB)
constexpr size_t kShort = 256;  // bytes per stream in a short round
constexpr int64_t kParallelMinBytes = 4 << 20;

// a(x) * b(x) mod P, both reflected (x^0 is the top bit).
uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

// x^(8n) mod P: what n zero bytes multiply the register by.
uint32_t x8nmodp(size_t n) {
  uint32_t p = 1u << 31, x2k = 1u << 30;  // x^0; x^1
  for (int k = 0; k < 3; ++k) x2k = multmodp(x2k, x2k);  // x^8
  while (n) {
    if (n & 1) p = multmodp(x2k, p);
    n >>= 1;
    x2k = multmodp(x2k, x2k);
  }
  return p;
}

struct Tables {
  uint32_t slice[8][256];   // slicing-by-8
  uint32_t shift_long[4][256];   // register * x^(8 * kLong) mod P, a byte at a time
  uint32_t shift_short[4][256];  // register * x^(8 * kShort) mod P
  Tables() {
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      slice[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; ++n)
      for (int k = 1; k < 8; ++k) slice[k][n] = (slice[k - 1][n] >> 8) ^ slice[0][slice[k - 1][n] & 0xFF];
    const uint32_t xl = x8nmodp(kLong), xs = x8nmodp(kShort);
    for (uint32_t n = 0; n < 256; ++n)
      for (int k = 0; k < 4; ++k) {
        shift_long[k][n] = multmodp(xl, n << (8 * k));
        shift_short[k][n] = multmodp(xs, n << (8 * k));
      }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

inline uint32_t shift(const uint32_t (&t)[4][256], uint32_t c) {
  return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
}

// The register (not inverted) after `n` bytes.
uint32_t update_portable(uint32_t c, const unsigned char* p, size_t n) {
  const auto& t = tables().slice;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
    --n;
  }
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= c;  // little-endian: the register meets the first four bytes
    c = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^ t[4][(w >> 24) & 0xFF] ^
        t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^ t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
  return c;
}

#ifdef KVSCHED_CRC_X86
KV_SSE42 inline uint64_t load64(const unsigned char* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// Three streams of `len` bytes each (a multiple of 8) at once, joined: c0 over p, c1 over p + len, c2 over p + 2 len.
KV_SSE42 inline uint32_t rounds3(uint32_t c, const unsigned char* p, size_t len, const uint32_t (&t)[4][256]) {
  uint64_t c0 = c, c1 = 0, c2 = 0;
  const unsigned char* end = p + len;
  while (p < end) {
    c0 = _mm_crc32_u64(c0, load64(p));
    c1 = _mm_crc32_u64(c1, load64(p + len));
    c2 = _mm_crc32_u64(c2, load64(p + 2 * len));
    p += 8;
  }
  uint32_t r = shift(t, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
  return shift(t, r) ^ static_cast<uint32_t>(c2);
}

KV_SSE42 uint32_t update_sse42(uint32_t c, const unsigned char* p, size_t n) {
  const Tables& tb = tables();
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c = _mm_crc32_u8(c, *p++);
    --n;
  }
  while (n >= 3 * kLong) {
    c = rounds3(c, p, kLong, tb.shift_long);
    p += 3 * kLong;
    n -= 3 * kLong;
  }
  while (n >= 3 * kShort) {
    c = rounds3(c, p, kShort, tb.shift_short);
    p += 3 * kShort;
    n -= 3 * kShort;
  }
  uint64_t c64 = c;
  while (n >= 8) {
    c64 = _mm_crc32_u64(c64, load64(p));
    p += 8;
    n -= 8;
  }
  c = static_cast<uint32_t>(c64);
  while (n--) c = _mm_crc32_u8(c, *p++);
  return c;
}

bool detect_sse42() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
}
#endif

}  // namespace

bool crc32c_hardware() {
#ifdef KVSCHED_CRC_X86
  static const bool has = detect_sse42();
  return has;
#else
  return false;  // aarch64's crc32c instructions are not used: the table path
#endif
}

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
#ifdef KVSCHED_CRC_X86
  if (crc32c_hardware()) return ~update_sse42(~crc, p, n);
#endif
  return ~update_portable(~crc, p, n);
}

uint32_t crc32c_portable(const void* data, size_t n, uint32_t crc) {
  return ~update_portable(~crc, static_cast<const unsigned char*>(data), n);
}

void crc32c_segments(const uint64_t* addrs, const int64_t* lens, int64_t items, int64_t per_item, uint32_t* out) {
  int64_t total = 0;
  for (int64_t j = 0; j < items * per_item; ++j) total += lens[j];
  // one core reads ~7-20 GiB/s here, memory-bound on a large restore: the slots are spread over OpenMP's threads (as
  // the FP8 kernels are) once there is enough to share
#pragma omp parallel for schedule(static) if (items > 1 && total >= kParallelMinBytes)
  for (int64_t i = 0; i < items; ++i) {
    uint32_t c = 0;
    for (int64_t j = i * per_item; j < (i + 1) * per_item; ++j)
      c = crc32c(reinterpret_cast<const void*>(static_cast<uintptr_t>(addrs[j])), static_cast<size_t>(lens[j]), c);
    out[i] = c;
  }
}

}  // namespace kvsched
