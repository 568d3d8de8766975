// Chunk record and the limits of docs/FORMAT.md section 3, shared by writer and reader.
#pragma once

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
class Buf {
 public:
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept : p_(o.p_), cap_(o.cap_) { o.p_ = nullptr; o.cap_ = 0; }
  ~Buf() { std::free(p_); }
  char* ensure(size_t n) {
    if (n > cap_ || !p_) {
      std::free(p_);
      p_ = nullptr;
      cap_ = 0;
      void* q = nullptr;
      if (posix_memalign(&q, 4096, n ? n : 1) != 0) throw std::bad_alloc();
      p_ = static_cast<char*>(q);
      cap_ = n;
    }
    return p_;
  }

 private:
  char* p_ = nullptr;
  size_t cap_ = 0;
};

}  // namespace ackpt
