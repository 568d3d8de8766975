// CRC-32C algebra shared by the host core and the optional CUDA module (csrc/cuda/).
//
// The CRC register after a message with a zero initial value ("raw" state) is linear over
// GF(2), so a chunk's checksum can be assembled from independent segments:
//
//   raw(A || B)  = raw(A) * x^(8|B|) mod P  xor  raw(B)
//   crc32c(M)    = ~(raw(M) xor 0xFFFFFFFF * x^(8|M|) mod P)       (init and xorout ~0)
//
// and zero bytes contribute nothing to a raw state, so a chunk made of pieces separated by
// zero padding is the xor of each segment's raw state shifted by the bytes that follow it
// in the chunk. That is what lets thousands of GPU threads each checksum 16 KiB and still
// produce exactly the host's crc32c (tests: crc32c_pieces in tests/test_device_crc.py).
//
// Everything here is header-only and free of host-only calls, so nvcc compiles the same
// functions for the device (ACKPT_HD) and the host build tests them without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define ACKPT_HD __host__ __device__ __forceinline__
#else
#define ACKPT_HD inline
#endif

namespace ackpt {
namespace crcmath {

constexpr uint32_t kPoly = 0x82F63B78u;  // Castagnoli, reflected: bit 31 holds x^0
constexpr uint32_t kOne = 0x80000000u;   // the polynomial 1 in reflected order
constexpr int kPowers = 64;              // x^(2^k) mod P for k < 64: any byte count < 2^61

// a * b mod P, both reflected. Walks a from x^0 upwards while b is multiplied by x.
ACKPT_HD uint32_t mulmod(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t bit = kOne; bit != 0 && a != 0; bit >>= 1) {
    if (a & bit) {
      product ^= b;
      a ^= bit;
    }
    b = (b & 1u) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return product;
}

// powers[k] = x^(2^k) mod P for k < kPowers.
ACKPT_HD void make_powers(uint32_t* powers) {
  uint32_t p = kOne >> 1;  // x^1
  for (int k = 0; k < kPowers; ++k) {
    powers[k] = p;
    p = mulmod(p, p);
  }
}

// x^(8 * nbytes) mod P, by the binary expansion of 8 * nbytes.
ACKPT_HD uint32_t x8n(uint64_t nbytes, const uint32_t* powers) {
  uint32_t r = kOne;
  int k = 3;  // 8 * nbytes: bit j of nbytes is bit j + 3 of the exponent
  for (; nbytes != 0 && k < kPowers; nbytes >>= 1, ++k)
    if (nbytes & 1u) r = mulmod(r, powers[k]);
  return r;
}

// The raw state advanced over nbytes zero bytes.
ACKPT_HD uint32_t shift(uint32_t raw, uint64_t nbytes, const uint32_t* powers) {
  return mulmod(raw, x8n(nbytes, powers));
}

// crc32c of a message of `length` bytes whose raw state is `raw`.
ACKPT_HD uint32_t finalize(uint32_t raw, uint64_t length, const uint32_t* powers) {
  return ~(raw ^ shift(0xFFFFFFFFu, length, powers));
}

// slice[k][n]: the raw state of byte n followed by k zero bytes (slicing-by-8 tables).
ACKPT_HD void make_slices(uint32_t (*slice)[256]) {
  for (uint32_t n = 0; n < 256; ++n) {
    uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ kPoly : c >> 1;
    slice[0][n] = c;
  }
  for (uint32_t n = 0; n < 256; ++n)
    for (int k = 1; k < 8; ++k) slice[k][n] = slice[0][slice[k - 1][n] & 0xff] ^ (slice[k - 1][n] >> 8);
}

// Raw state of p[0, len), from raw state `c`. 8-byte words where p is 8-byte aligned,
// bytes elsewhere; little-endian (every GPU and the hosts we build for).
ACKPT_HD uint32_t raw_update(uint32_t c, const unsigned char* p, size_t len,
                             const uint32_t (*slice)[256]) {
  while (len && (reinterpret_cast<uintptr_t>(p) & 7u)) {
    c = slice[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    --len;
  }
  for (; len >= 8; p += 8, len -= 8) {
    const uint64_t v = *reinterpret_cast<const uint64_t*>(p) ^ c;
    c = slice[7][v & 0xff] ^ slice[6][(v >> 8) & 0xff] ^ slice[5][(v >> 16) & 0xff] ^
        slice[4][(v >> 24) & 0xff] ^ slice[3][(v >> 32) & 0xff] ^ slice[2][(v >> 40) & 0xff] ^
        slice[1][(v >> 48) & 0xff] ^ slice[0][v >> 56];
  }
  while (len--) c = slice[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return c;
}

// One piece of a chunk: `len` bytes at `src` that occupy [offset, offset + len) of chunk
// `chunk`. Bytes of a chunk not covered by a piece must be zero in the staged copy.
struct Piece {
  uint64_t src;
  uint64_t len;
  uint64_t offset;
  uint32_t chunk;
  uint32_t pad_ = 0;
};

// The contribution of bytes [begin, end) of `piece` to its chunk's raw state, for a chunk of
// chunk_len bytes: xor every segment's contribution into the chunk's state.
ACKPT_HD uint32_t segment_term(const Piece& piece, uint64_t begin, uint64_t end, uint64_t chunk_len,
                               const uint32_t (*slice)[256], const uint32_t* powers) {
  const auto* p = reinterpret_cast<const unsigned char*>(piece.src);
  const uint32_t raw = raw_update(0, p + begin, end - begin, slice);
  return shift(raw, chunk_len - (piece.offset + end), powers);
}

}  // namespace crcmath
}  // namespace ackpt
