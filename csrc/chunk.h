// Chunk record and the limits of docs/FORMAT.md section 3, shared by writer and reader.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace ackpt {

enum Codec : int { kCodecRaw = 0, kCodecZstd = 1, kCodecAuto = 2 };

constexpr uint64_t kMaxRawLength = uint64_t(1) << 31;  // 2 GiB per chunk, FORMAT.md section 3

struct ChunkRecord {
  uint32_t file = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t raw_length = 0;
  int codec = kCodecRaw;  // never kCodecAuto
  int shuffle = 0;        // 0 when not applied
  uint32_t crc32c = 0;
  uint32_t raw_crc32c = 0;
};

// Uninitialised, 4096-aligned, growable scratch memory (no zero-fill, no copy on growth).
// Large buffers are mapped and unmapped directly: through malloc, chunk-sized scratch
// freed on a worker thread stays in that thread's arena (glibc raises its mmap threshold
// to 32 MiB after the first free), and a process saving every few steps grew by the
// writer threads' scratch on top of the state.
class Buf {
 public:
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept : p_(o.p_), cap_(o.cap_), mapped_(o.mapped_) { o.p_ = nullptr; o.cap_ = 0; }
  ~Buf() { release(); }
  char* ensure(size_t n) {
    if (n > cap_ || !p_) {
      release();
      const size_t want = n ? n : 1;
      if (want >= kMapMin) {
        void* q = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (q == MAP_FAILED) throw std::bad_alloc();
        p_ = static_cast<char*>(q);
        mapped_ = true;
      } else {
        void* q = nullptr;
        if (posix_memalign(&q, 4096, want) != 0) throw std::bad_alloc();
        p_ = static_cast<char*>(q);
        mapped_ = false;
      }
      cap_ = want;
    }
    return p_;
  }

 private:
  static constexpr size_t kMapMin = size_t(1) << 20;
  void release() {
    if (p_ && mapped_) munmap(p_, cap_);
    else std::free(p_);
    p_ = nullptr;
    cap_ = 0;
  }
  char* p_ = nullptr;
  size_t cap_ = 0;
  bool mapped_ = false;
};

}  // namespace ackpt
