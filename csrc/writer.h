// Parallel chunk encoder + writer. Per chunk, two tasks for the pool: optional shuffle -> zstd
// -> stored crc -> offset reserved in the file -> pwrite; and the raw crc, beside it. See
// async_ckpt/_native.pyi (Writer.write).
#pragma once

#include <string>
#include <vector>

#include "chunk.h"
#include "gate.h"
#include "thread_pool.h"

namespace ackpt {

struct WriteJob {
  const void* src = nullptr;
  size_t len = 0;
  uint32_t file = 0;
  int codec = kCodecRaw;  // kCodecRaw, kCodecZstd or kCodecAuto
  int level = 1;          // zstd level
  int shuffle = 0;        // 0/1 (none), 2, 4, 8; applied only when the chunk is compressed
  // A raw crc32c computed elsewhere (the CUDA module, over device memory): used when
  // *known_flag is non-zero. Both are read only after the gate released this job (the
  // producer fills them before advancing it); the writer then skips its checksum pass.
  const uint32_t* known_crc = nullptr;
  const uint8_t* known_flag = nullptr;
};

class Writer {
 public:
  // nice: see ThreadPool (the thread calling write() is left as it is).
  explicit Writer(unsigned threads, int nice = 0) : pool_(threads, nice) {}
  unsigned threads() const { return pool_.size(); }

  // Creates every path (O_EXCL), encodes and appends the jobs, fsyncs the files when asked,
  // closes them, and returns one record per job in job order. Arguments are validated before
  // any file is created. On the first error the remaining jobs are abandoned, the files are
  // closed and the error propagates (the caller removes what was written). With a gate, job
  // i first waits until the gate says chunk i is staged (copy and write overlap). With
  // check_known, a job's known_crc is recomputed on the host and a mismatch is a
  // ChecksumError (a self-check for the device checksum path).
  std::vector<ChunkRecord> write(const std::vector<std::string>& paths,
                                 const std::vector<WriteJob>& jobs, bool fsync,
                                 Gate* gate = nullptr, bool check_known = false);

 private:
  ThreadPool pool_;
};

}  // namespace ackpt
