#include "shuffle.h"

#include <cstdint>
#include <cstring>

#include "errors.h"

namespace ackpt {
namespace {

// Fixed element size lets the compiler unroll the inner loop; blocking by kBlock elements
// keeps the E output streams and the input block in L1/L2.
template <size_t E>
void shuffle_t(const unsigned char* src, unsigned char* dst, size_t n) {
  constexpr size_t kBlock = 4096;
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t end = b + kBlock < n ? b + kBlock : n;
    for (size_t j = 0; j < E; ++j) {
      unsigned char* out = dst + j * n;
      const unsigned char* in = src + j;
      for (size_t i = b; i < end; ++i) out[i] = in[i * E];
    }
  }
}

template <size_t E>
void unshuffle_t(const unsigned char* src, unsigned char* dst, size_t n) {
  constexpr size_t kBlock = 4096;
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t end = b + kBlock < n ? b + kBlock : n;
    for (size_t i = b; i < end; ++i) {
      unsigned char tmp[E];
      for (size_t j = 0; j < E; ++j) tmp[j] = src[j * n + i];
      std::memcpy(dst + i * E, tmp, E);
    }
  }
}

void check(const void* src, void* dst, size_t len, size_t elem) {
  if (elem != 1 && elem != 2 && elem != 4 && elem != 8)
    throw FormatError("shuffle element size must be 1, 2, 4 or 8, got " + std::to_string(elem));
  auto s = reinterpret_cast<uintptr_t>(src), d = reinterpret_cast<uintptr_t>(dst);
  if (len && s < d + len && d < s + len)
    throw FormatError("shuffle source and destination overlap");
}

}  // namespace

void shuffle(const void* src_, void* dst_, size_t len, size_t elem) {
  check(src_, dst_, len, elem);
  auto* src = static_cast<const unsigned char*>(src_);
  auto* dst = static_cast<unsigned char*>(dst_);
  const size_t n = len / elem, body = n * elem;
  switch (elem) {
    case 2: shuffle_t<2>(src, dst, n); break;
    case 4: shuffle_t<4>(src, dst, n); break;
    case 8: shuffle_t<8>(src, dst, n); break;
    default: std::memcpy(dst, src, body); break;
  }
  if (len > body) std::memcpy(dst + body, src + body, len - body);
}

void unshuffle(const void* src_, void* dst_, size_t len, size_t elem) {
  check(src_, dst_, len, elem);
  auto* src = static_cast<const unsigned char*>(src_);
  auto* dst = static_cast<unsigned char*>(dst_);
  const size_t n = len / elem, body = n * elem;
  switch (elem) {
    case 2: unshuffle_t<2>(src, dst, n); break;
    case 4: unshuffle_t<4>(src, dst, n); break;
    case 8: unshuffle_t<8>(src, dst, n); break;
    default: std::memcpy(dst, src, body); break;
  }
  if (len > body) std::memcpy(dst + body, src + body, len - body);
}

}  // namespace ackpt
