// Staging copy: many (source pointer, destination offset, length) regions into one host
// buffer, in order, opening a Gate behind the copy front so the writer can start on the
// chunks already staged. Called by the snapshot on the training thread with the GIL
// released; sources are host memory the caller keeps alive. No Python.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
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

// One copy between two places in host memory that the caller keeps alive.
struct Copy {
  const void* src = nullptr;
  void* dst = nullptr;
  uint64_t length = 0;
};

// Many copies at once: a restore's bytes from the chunks it read into the live tensors
// they belong to. Called on the restoring thread with the GIL released. With threads > 1
// (and at least 8 MiB per thread) helper threads share the bytes, unless two copies write
// the same bytes: then they run in order on this thread, so the later one wins as it would
// in a loop. FormatError, before any byte is copied, on a null pointer with a length.
void copy_all(const std::vector<Copy>& copies, unsigned threads = 1);

// Copies made by a thread of its own while the caller goes on (the snapshot's early copy,
// queued by the training thread while it is still encoding the state). submit() checks a
// batch of regions against [0, dst_len) (FormatError, nothing queued) and queues it;
// the worker copies batches in order and opens no gate. wait() blocks until every queued
// batch is copied. Sources and dst must stay alive until then; the destructor waits too.
class StageQueue {
 public:
  StageQueue();
  ~StageQueue();
  StageQueue(const StageQueue&) = delete;
  StageQueue& operator=(const StageQueue&) = delete;

  void submit(char* dst, uint64_t dst_len, std::vector<Region> regions);
  void wait();

 private:
  struct Batch {
    char* dst;
    std::vector<Region> regions;
  };
  void run();

  std::mutex mu_;
  std::condition_variable work_;
  std::condition_variable idle_;
  std::deque<Batch> queue_;
  bool busy_ = false;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace ackpt
