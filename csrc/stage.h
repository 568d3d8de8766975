// Staging copy: many (source pointer, destination offset, length) regions into one host
// buffer, in order, opening a Gate behind the copy front so the writer can start on the
// chunks already staged. Called by the snapshot on the training thread with the GIL
// released; sources are host memory the caller keeps alive. No Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "gate.h"

namespace ackpt {

struct Region {
  const void* src = nullptr;
  uint64_t dst_offset = 0;
  uint64_t length = 0;
};

// Regions must be sorted by dst_offset and lie inside [0, dst_len) (FormatError otherwise,
// checked before any byte is copied). With a gate, after each region the chunks whose end
// (chunk_ends, ascending) lies at or below min(next region's offset, floor) are opened.
// With threads > 1 (and at least 8 MiB per thread), helper threads copy the later bytes
// while the calling thread copies the front and opens the gate; the chunks past the front
// open once every copier is done.
void stage_regions(char* dst, uint64_t dst_len, const std::vector<Region>& regions,
                   const std::vector<uint64_t>& chunk_ends, Gate* gate, uint64_t floor,
                   unsigned threads = 1);

}  // namespace ackpt
