// Host reference of the chunk-from-pieces crc32c that the CUDA module computes on the device
// (csrc/crc32c_math.h has the algebra). Tests compare it with crc32c() and with the module.
#pragma once

#include <cstdint>
#include <vector>

#include "crc32c_math.h"

namespace ackpt {

// crc32c of each chunk; bytes of a chunk that no piece covers count as zeros. FormatError
// when a piece lies outside its chunk or segment is not a positive multiple of 8.
std::vector<uint32_t> crc32c_pieces(const std::vector<crcmath::Piece>& pieces,
                                    const std::vector<uint64_t>& chunk_lens, uint64_t segment);

// The slicing-by-8 and x^(2^k) tables of csrc/crc32c_math.h, built once per process on
// first use (thread-safe); the host users of the algebra share them.
struct CrcTables {
  uint32_t slice[8][256];
  uint32_t powers[crcmath::kPowers];
  CrcTables();
};
const CrcTables& crc_tables();

// Throws FormatError unless every piece is non-empty and lies inside its chunk.
void check_pieces(const std::vector<crcmath::Piece>& pieces, const std::vector<uint64_t>& chunk_lens,
                  uint64_t segment);

}  // namespace ackpt
