#include "stage.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "errors.h"

namespace ackpt {

void stage_regions(char* dst, uint64_t dst_len, const std::vector<Region>& regions,
                   const std::vector<uint64_t>& chunk_ends, Gate* gate, uint64_t floor) {
  uint64_t previous = 0;
  for (size_t k = 0; k < regions.size(); ++k) {
    const Region& r = regions[k];
    if (r.dst_offset < previous || r.length > dst_len || r.dst_offset > dst_len - r.length)
      throw FormatError("staging region " + std::to_string(k) + " [" + std::to_string(r.dst_offset) +
                        ", +" + std::to_string(r.length) + ") is unsorted or outside the " +
                        std::to_string(dst_len) + "-byte buffer");
    if (r.length && !r.src) throw FormatError("staging region " + std::to_string(k) + ": null source");
    previous = r.dst_offset + r.length;
  }
  size_t opened = 0;
  for (size_t k = 0; k < regions.size(); ++k) {
    const Region& r = regions[k];
    if (r.length) std::memcpy(dst + r.dst_offset, r.src, r.length);
    if (!gate) continue;
    const uint64_t front = std::min(k + 1 < regions.size() ? regions[k + 1].dst_offset : floor, floor);
    const size_t ready = static_cast<size_t>(
        std::upper_bound(chunk_ends.begin(), chunk_ends.end(), front) - chunk_ends.begin());
    if (ready > opened) {
      gate->advance(ready);
      opened = ready;
    }
  }
}

}  // namespace ackpt
