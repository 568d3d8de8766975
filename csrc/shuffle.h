// Byte-shuffle (docs/FORMAT.md section 3): byte 0 of every element, then byte 1 of every
// element, ...; the tail of len % elem bytes is copied unshuffled at the end.
#pragma once

#include <cstddef>

namespace ackpt {

// elem must be 1, 2, 4 or 8 (FormatError otherwise). src and dst must not overlap.
void shuffle(const void* src, void* dst, size_t len, size_t elem);
void unshuffle(const void* src, void* dst, size_t len, size_t elem);

}  // namespace ackpt
