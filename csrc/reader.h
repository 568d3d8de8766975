// Parallel chunk reader: range checks against the real file size, pread, crc32c of the
// stored bytes before decoding, bounded zstd decode, unshuffle, crc32c of the decoded bytes.
// See async_ckpt/_native.pyi (Reader.read). Every record is untrusted input.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "chunk.h"
#include "thread_pool.h"

namespace ackpt {

// A piece of a chunk's decoded bytes: the next `len` bytes go to `dst`. With a backup, `dst`
// holds bytes the caller may need back (a live tensor): they are copied to `backup` first,
// and put back if the read fails.
struct ReadPiece {
  char* dst = nullptr;
  size_t len = 0;
  char* backup = nullptr;  // null, or `len` bytes that do not overlap `dst`
};

struct ReadJob {
  ChunkRecord rec;
  void* dst = nullptr;  // null: verify only (decode into scratch, then discard)
  size_t dst_len = 0;   // rec.raw_length must not exceed it; bytes past raw_length untouched
  // Instead of dst: the decoded bytes scattered in order (lengths must sum to raw_length).
  std::vector<ReadPiece> pieces;
  int64_t chunk = -1;   // echoed in messages; -1: the job index is named instead
};

class Reader {
 public:
  explicit Reader(unsigned threads) : pool_(threads) {}
  unsigned threads() const { return pool_.size(); }

  // collect_errors false: throws the first error (remaining jobs abandoned) and returns all
  // nullopt; before it throws, every piece with a backup that any job began to overwrite
  // holds its backup's bytes again, so a failed read leaves backed-up memory as it was.
  // With collect_errors, a failed job puts back its own pieces. true: never throws for a job or file; returns one message per job, "<Kind>: ..."
  // with Kind one of FormatError, ChecksumError, CodecError, StorageError, Error.
  std::vector<std::optional<std::string>> read(const std::vector<std::string>& paths,
                                               const std::vector<ReadJob>& jobs,
                                               bool collect_errors);

 private:
  ThreadPool pool_;
};

// "<Kind>: <what>" for the exception in flight (used by collect_errors).
std::string describe_current_exception();

}  // namespace ackpt
