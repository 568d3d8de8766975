#include "reader.h"

#include <fcntl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <new>

#include "crc32c.h"
#include "crc32c_math.h"
#include "crc32c_pieces.h"
#include "errors.h"
#include "file_io.h"
#include "shuffle.h"
#include "zstd_dl.h"

namespace ackpt {
namespace {

constexpr size_t kSlice = size_t(4) << 20;  // buffered raw reads: pread and crc slice by slice

// Large raw chunks at 4096-aligned offsets (the writer's O_DIRECT chunks, which are not in
// the page cache anyway) are read with O_DIRECT in kDirectSlice pieces, through an aligned
// bounce buffer unless the destination is aligned. Measured on the dev VM (ext4/virtio,
// 1 GiB cold, 4 threads, 64 MiB chunks, interleaved with a one-thread O_DIRECT sequential
// read of 64 MiB requests): buffered preads reached 0.86-0.88 of that, O_DIRECT 1.0.
constexpr size_t kAlign = 4096;
constexpr size_t kDirectMin = size_t(1) << 20;
constexpr size_t kDirectSlice = size_t(16) << 20;  // 8 MiB: 0.88-0.91 of the ceiling, 16-32: 1.0

struct OpenFile {
  Fd fd;
  Fd direct;  // O_DIRECT descriptor of the same inode; invalid when unavailable
  mutable std::atomic<bool> direct_ok{false};
  uint64_t size = 0;
  std::string error;  // collect_errors: why the open failed
};

constexpr size_t kStreamSlice = size_t(1) << 20;  // decoded bytes per piece without a destination

struct Scratch {
  Buf stored, decoded, bounce, slice;
};

// crc32c of decoded bytes that arrive in pieces (no destination: verify --deep).
class CrcSink : public zstd::Sink {
 public:
  void put(const char* p, size_t n) override { crc_ = crc32c(crc_, p, n); }
  uint32_t crc() const { return crc_; }

 private:
  uint32_t crc_ = 0;
};

// crc32c of the *unshuffled* bytes, fed the shuffled stream piece by piece (FORMAT.md
// section 3: byte 0 of every element, then byte 1 of every element, ..., then a tail of
// len % elem bytes as is). Linear algebra instead of a buffer (csrc/crc32c_math.h): plane k
// is the message whose only non-zero bytes are byte k of each element, so the chunk's raw
// state is the xor of each plane's strided raw state, shifted by what follows the plane's
// last byte, and of the tail's. Memory: a few words, whatever the chunk's size.
class UnshuffleCrcSink : public zstd::Sink {
 public:
  UnshuffleCrcSink(uint64_t len, unsigned elem) : len_(len), elem_(elem), n_(len / elem) {
    t_ = &crc_tables();
  }

  void put(const char* p, size_t n) override {
    const auto* b = reinterpret_cast<const unsigned char*>(p);
    while (n) {
      if (pos_ >= n_ * elem_) {  // the tail: plain bytes
        tail_ = crcmath::raw_update(tail_, b, n, t_->slice);
        pos_ += n;
        return;
      }
      const uint64_t plane = pos_ / n_, i = pos_ % n_;
      const size_t take = static_cast<size_t>(std::min<uint64_t>(n, n_ - i));
      feed_plane(b, take, i);
      b += take;
      n -= take;
      pos_ += take;
      if (i + take == n_) {  // plane complete: what follows its last byte is (elem-1-k) + tail
        acc_ ^= crcmath::shift(plane_, elem_ - 1 - plane + (len_ - n_ * elem_), t_->powers);
        plane_ = 0;
      }
    }
  }

  uint32_t crc() const {
    return crcmath::finalize(acc_ ^ tail_, len_, t_->powers);
  }

 private:
  static uint32_t byte(uint32_t c, unsigned char v, const uint32_t (*slice)[256]) {
    return slice[0][(c ^ v) & 0xff] ^ (c >> 8);
  }

  // Plane bytes i.. of the current plane: b_0, then (elem-1 zeros, b) for each next byte.
  void feed_plane(const unsigned char* b, size_t count, uint64_t i) {
    const uint32_t(*slice)[256] = t_->slice;
    uint32_t c = plane_;
    size_t k = 0;
    if (i == 0 && count) c = byte(c, b[k++], slice);  // the plane's first byte has no gap before it
    // 8 message bytes per step: 8/elem plane bytes, each after elem-1 zeros.
    const unsigned per = 8 / elem_;
    for (; count - k >= per; k += per) {
      uint64_t v = c;
      for (unsigned j = 0; j < per; ++j) v ^= uint64_t(b[k + j]) << (8 * ((j + 1) * elem_ - 1));
      c = slice[7][v & 0xff] ^ slice[6][(v >> 8) & 0xff] ^ slice[5][(v >> 16) & 0xff] ^
          slice[4][(v >> 24) & 0xff] ^ slice[3][(v >> 32) & 0xff] ^ slice[2][(v >> 40) & 0xff] ^
          slice[1][(v >> 48) & 0xff] ^ slice[0][v >> 56];
    }
    for (; k < count; ++k) {
      for (unsigned z = 1; z < elem_; ++z) c = byte(c, 0, slice);
      c = byte(c, b[k], slice);
    }
    plane_ = c;
  }

  const CrcTables* t_;
  uint64_t len_;
  unsigned elem_;
  uint64_t n_;          // elements (bytes per plane)
  uint64_t pos_ = 0;    // bytes of the shuffled stream seen
  uint32_t plane_ = 0;  // raw state of the current plane so far
  uint32_t acc_ = 0;    // xor of finished planes' contributions
  uint32_t tail_ = 0;   // raw state of the tail
};

std::string hex(uint32_t v) {
  char b[16];
  snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

void read_job(const std::vector<std::string>& paths, const std::vector<OpenFile>& files,
              const ReadJob& j, size_t index, Scratch& s) {
  const ChunkRecord& r = j.rec;
  const std::string name =
      j.chunk >= 0 ? "chunk " + std::to_string(j.chunk) : "read job " + std::to_string(index);
  if (r.file >= files.size())
    throw FormatError(name + ": file index " + std::to_string(r.file) + " out of range (" +
                      std::to_string(files.size()) + " paths)");
  const std::string& path = paths[r.file];
  const OpenFile& f = files[r.file];
  const std::string where = name + " ('" + path + "', offset " + std::to_string(r.offset) +
                            ", length " + std::to_string(r.length) + ")";
  if (!f.error.empty()) throw Error(f.error);  // collect_errors only; already prefixed

  if (r.codec != kCodecRaw && r.codec != kCodecZstd)
    throw FormatError(where + ": unknown codec " + std::to_string(r.codec));
  if (r.shuffle != 0 && r.shuffle != 2 && r.shuffle != 4 && r.shuffle != 8)
    throw FormatError(where + ": shuffle must be 0, 2, 4 or 8, got " + std::to_string(r.shuffle));
  if (r.raw_length > kMaxRawLength)
    throw FormatError(where + ": raw_length " + std::to_string(r.raw_length) +
                      " exceeds the 2 GiB limit");
  if (j.dst && r.raw_length > j.dst_len)
    throw FormatError(where + ": raw_length " + std::to_string(r.raw_length) +
                      " exceeds the destination's " + std::to_string(j.dst_len) + " bytes");
  if (r.offset > f.size || r.length > f.size - r.offset)
    throw FormatError(where + ": range ends past the end of the file (" + std::to_string(f.size) +
                      " bytes)");
  if (r.codec == kCodecRaw) {
    if (r.length != r.raw_length)
      throw FormatError(where + ": raw chunk with length != raw_length (" +
                        std::to_string(r.raw_length) + ")");
    if (r.shuffle != 0) throw FormatError(where + ": raw chunk with shuffle " +
                                          std::to_string(r.shuffle));
    if (r.crc32c != r.raw_crc32c)
      throw FormatError(where + ": raw chunk with crc32c != raw_crc32c");
  } else if (r.length == 0 || r.length > zstd::compress_bound(r.raw_length)) {
    throw FormatError(where + ": stored length impossible for a zstd frame of " +
                      std::to_string(r.raw_length) + " bytes");
  }

  auto truncated = [&](size_t got) {
    return FormatError(where + ": file ended after " + std::to_string(got) +
                       " bytes of the chunk (truncated while reading)");
  };
  auto mismatch = [&](const char* what, uint32_t want, uint32_t got) {
    return ChecksumError(where + ": " + what + " crc32c mismatch (record " + hex(want) +
                             ", computed " + hex(got) + ")",
                         path, r.offset, j.chunk);
  };

  if (r.codec == kCodecRaw) {
    // Straight into dst (or slice-sized scratch when verifying), crc while the slice is hot.
    uint32_t c = 0;
    size_t pos = 0;
    if (r.length >= kDirectMin && r.offset % kAlign == 0 && f.direct_ok.load()) {
      char* bounce = s.bounce.ensure(kDirectSlice);
      for (; pos < r.length; pos += kDirectSlice) {
        const size_t n = std::min<size_t>(kDirectSlice, r.length - pos);
        char* want = j.dst ? static_cast<char*>(j.dst) + pos : bounce;
        const bool in_place = reinterpret_cast<uintptr_t>(want) % kAlign == 0 && n % kAlign == 0;
        char* buf = in_place ? want : bounce;
        size_t got;
        try {
          got = pread_full(f.direct, buf, (n + kAlign - 1) / kAlign * kAlign, r.offset + pos);
        } catch (const IoError& e) {
          if (e.err() != EINVAL) throw;
          f.direct_ok.store(false);  // alignment refused: buffered from here on
          break;
        }
        if (got < n) throw truncated(pos + got);
        c = crc32c(c, buf, n);
        if (buf != want) std::memcpy(want, buf, n);
      }
    }
    char* scratch = j.dst ? nullptr : s.stored.ensure(std::min<size_t>(kSlice, r.length));
    for (; pos < r.length; pos += kSlice) {
      const size_t n = std::min<size_t>(kSlice, r.length - pos);
      char* out = j.dst ? static_cast<char*>(j.dst) + pos : scratch;
      const size_t got = pread_full(f.fd, out, n, r.offset + pos);
      if (got != n) throw truncated(pos + got);
      c = crc32c(c, out, n);
    }
    if (c != r.crc32c) throw mismatch("stored bytes", r.crc32c, c);
    return;
  }

  char* stored = s.stored.ensure(r.length);
  const size_t got = pread_full(f.fd, stored, r.length, r.offset);
  if (got != r.length) throw truncated(got);
  const uint32_t c = crc32c(0, stored, r.length);
  if (c != r.crc32c) throw mismatch("stored bytes", r.crc32c, c);

  if (!j.dst) {
    // No destination (verify --deep): stream the frame through a fixed slice and checksum
    // it on the fly, so memory never depends on what the frame declares.
    uint32_t rc;
    try {
      char* slice = s.slice.ensure(kStreamSlice);
      if (r.shuffle) {
        UnshuffleCrcSink sink(r.raw_length, static_cast<unsigned>(r.shuffle));
        zstd::decompress_stream(stored, r.length, r.raw_length, slice, kStreamSlice, sink);
        rc = sink.crc();
      } else {
        CrcSink sink;
        zstd::decompress_stream(stored, r.length, r.raw_length, slice, kStreamSlice, sink);
        rc = sink.crc();
      }
    } catch (const FormatError& e) {
      throw FormatError(where + ": " + e.what());
    } catch (const CodecError& e) {
      throw CodecError(where + ": " + e.what());
    }
    if (rc != r.raw_crc32c) throw mismatch("decoded bytes", r.raw_crc32c, rc);
    return;
  }

  // With a destination, raw_length is at most the destination's size (checked above) and the
  // frame must declare exactly raw_length before anything is allocated or decoded: decoding
  // uses the destination itself, plus one raw_length scratch when unshuffling.
  char* out = nullptr;
  char* final_out = static_cast<char*>(j.dst);
  try {
    zstd::check_frame(stored, r.length, r.raw_length);  // before allocating scratch
    char* decoded = r.shuffle ? s.decoded.ensure(r.raw_length) : final_out;
    zstd::decompress(stored, r.length, decoded, r.raw_length);
    out = decoded;
  } catch (const FormatError& e) {
    throw FormatError(where + ": " + e.what());
  } catch (const CodecError& e) {
    throw CodecError(where + ": " + e.what());
  }
  if (r.shuffle) {
    char* decoded = out;
    out = final_out;
    unshuffle(decoded, out, r.raw_length, static_cast<size_t>(r.shuffle));
  }
  const uint32_t rc = crc32c(0, out, r.raw_length);
  if (rc != r.raw_crc32c) throw mismatch("decoded bytes", r.raw_crc32c, rc);
}

}  // namespace

std::string describe_current_exception() {
  try {
    throw;
  } catch (const FormatError& e) {
    return std::string("FormatError: ") + e.what();
  } catch (const ChecksumError& e) {
    return std::string("ChecksumError: ") + e.what();
  } catch (const CodecError& e) {
    return std::string("CodecError: ") + e.what();
  } catch (const IoError& e) {
    return std::string("StorageError: ") + e.what();
  } catch (const Error& e) {
    return e.what();  // already "<Kind>: ..." (file open failures)
  } catch (const std::bad_alloc&) {
    return "MemoryError: out of memory";
  } catch (const std::exception& e) {
    return std::string("Error: ") + e.what();
  } catch (...) {
    return "Error: unknown";
  }
}

std::vector<std::optional<std::string>> Reader::read(const std::vector<std::string>& paths,
                                                     const std::vector<ReadJob>& jobs,
                                                     bool collect_errors) {
  std::vector<OpenFile> files(paths.size());
  for (size_t k = 0; k < paths.size(); ++k) {
    try {
      files[k].fd = open_read(paths[k], &files[k].size);
      files[k].direct = open_direct_like(files[k].fd, false);
      files[k].direct_ok.store(files[k].direct.valid());
    } catch (...) {
      if (!collect_errors) throw;
      files[k].error = describe_current_exception();
    }
  }
  std::vector<std::optional<std::string>> errors(jobs.size());
  std::vector<Scratch> scratch(pool_.size());
  pool_.run(jobs.size(), [&](size_t i, unsigned w) {
    if (!collect_errors) {
      read_job(paths, files, jobs[i], i, scratch[w]);
      return;
    }
    try {
      read_job(paths, files, jobs[i], i, scratch[w]);
    } catch (...) {
      errors[i] = describe_current_exception();
    }
  });
  return errors;
}

}  // namespace ackpt
