#include "crc32c_pieces.h"

#include <string>

#include "errors.h"

namespace ackpt {

void check_pieces(const std::vector<crcmath::Piece>& pieces, const std::vector<uint64_t>& chunk_lens,
                  uint64_t segment) {
  if (segment == 0 || segment % 8 != 0)
    throw FormatError("segment must be a positive multiple of 8, got " + std::to_string(segment));
  for (size_t i = 0; i < pieces.size(); ++i) {
    const crcmath::Piece& p = pieces[i];
    const std::string where = "piece " + std::to_string(i) + ": ";
    if (p.chunk >= chunk_lens.size())
      throw FormatError(where + "chunk " + std::to_string(p.chunk) + " out of range");
    if (p.len == 0) throw FormatError(where + "empty");
    if (p.offset > chunk_lens[p.chunk] || p.len > chunk_lens[p.chunk] - p.offset)
      throw FormatError(where + "[" + std::to_string(p.offset) + ", +" + std::to_string(p.len) +
                        ") lies outside its chunk of " + std::to_string(chunk_lens[p.chunk]) + " bytes");
  }
}

CrcTables::CrcTables() {
  crcmath::make_slices(slice);
  crcmath::make_powers(powers);
}

const CrcTables& crc_tables() {
  static const CrcTables t;
  return t;
}

std::vector<uint32_t> crc32c_pieces(const std::vector<crcmath::Piece>& pieces,
                                    const std::vector<uint64_t>& chunk_lens, uint64_t segment) {
  check_pieces(pieces, chunk_lens, segment);
  const CrcTables& t = crc_tables();
  std::vector<uint32_t> words(chunk_lens.size(), 0);
  for (const auto& p : pieces)
    for (uint64_t begin = 0; begin < p.len; begin += segment) {
      const uint64_t end = begin + segment < p.len ? begin + segment : p.len;
      words[p.chunk] ^= crcmath::segment_term(p, begin, end, chunk_lens[p.chunk], t.slice, t.powers);
    }
  for (size_t c = 0; c < words.size(); ++c) words[c] = crcmath::finalize(words[c], chunk_lens[c], t.powers);
  return words;
}

}  // namespace ackpt
