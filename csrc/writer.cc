#include "writer.h"

#include <fcntl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>

#include "crc32c.h"
#include "errors.h"
#include "file_io.h"
#include "shuffle.h"
#include "zstd_dl.h"

namespace ackpt {
namespace {

// O_DIRECT for raw chunks of at least kDirectMin bytes. Measured on the dev VM (ext4 on
// virtio, 1 GiB, fsync'd, dd and benchmarks/bench_native.py): buffered pwrite 0.5-1.2 GB/s,
// O_DIRECT 1.3-1.9 GB/s, because buffered writes copy into the page cache and then wait
// for writeback in fsync. Direct writes need 4096-aligned offsets, lengths and addresses:
// chunks start at aligned offsets; an aligned source is written straight from its whole
// pages and only its partial last page goes through an aligned bounce buffer (an unaligned
// source goes through it whole); the last block is zero-padded and the file is truncated
// back to the end of its last chunk. Chunks of shared slabs rarely end on a page: copying
// each whole one through the bounce buffer cost a 253 MiB transformer + AdamW save 50 ms
// of its 190 ms write on the dev VM. File systems that refuse O_DIRECT (EINVAL) get buffered writes.
constexpr size_t kAlign = 4096;
constexpr size_t kDirectMin = size_t(1) << 20;
constexpr size_t kDirectSlice = size_t(32) << 20;  // per pwrite; 8 MiB: ~0.87 of the ceiling

// CODEC_AUTO probe: kProbeParts samples of kProbePart bytes spread over the chunk.
constexpr size_t kProbePart = size_t(64) << 10;
constexpr size_t kProbeParts = 4;

struct FileState {
  Fd fd;
  Fd direct;  // invalid when O_DIRECT is unavailable
  std::atomic<bool> direct_ok{false};
  std::atomic<bool> padded{false};
  std::atomic<uint64_t> next{0};
};

struct Scratch {
  Buf shuffled, compressed, probe, probe_shuffled, probe_out, bounce;
};

inline uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint64_t reserve(FileState& f, uint64_t len, bool aligned) {
  uint64_t cur = f.next.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t start = aligned ? round_up(cur, kAlign) : cur;
    const uint64_t end = start + (aligned ? round_up(len, kAlign) : len);
    if (f.next.compare_exchange_weak(cur, end, std::memory_order_relaxed)) return start;
  }
}

// Writes [p, p+len) with its 4096-aligned, zero-padded extent at an aligned offset through
// O_DIRECT; on EINVAL (alignment the device refuses) disables O_DIRECT for the file and
// writes this slice buffered.
void direct_or_buffered(FileState& f, const char* p, size_t len, size_t padded, uint64_t off) {
  if (f.direct_ok.load(std::memory_order_relaxed)) {
    try {
      pwrite_all(f.direct, p, padded, off);
      f.padded.store(true, std::memory_order_relaxed);
      return;
    } catch (const IoError& e) {
      if (e.err() != EINVAL) throw;
      f.direct_ok.store(false, std::memory_order_relaxed);
    }
  }
  pwrite_all(f.fd, p, len, off);
}

// Stores src as is and returns the offset. Its crc is another task's (see Writer::write).
uint64_t store_raw(FileState& f, Scratch& s, const char* src, size_t len) {
  if (len < kDirectMin || !f.direct_ok.load(std::memory_order_relaxed)) {
    const uint64_t off = reserve(f, len, false);
    pwrite_all(f.fd, src, len, off);
    return off;
  }
  const uint64_t off = reserve(f, len, true);
  for (size_t pos = 0; pos < len; pos += kDirectSlice) {
    const size_t n = std::min(kDirectSlice, len - pos);
    const char* in = src + pos;
    size_t body = 0;  // written straight from the source: an aligned start, whole pages
    if (reinterpret_cast<uintptr_t>(in) % kAlign == 0) body = n - n % kAlign;
    if (body) direct_or_buffered(f, in, body, body, off + pos);
    if (body == n) continue;
    // The rest (an unaligned source, or the last partial page of a chunk) goes through
    // the bounce buffer, zero-padded to whole pages.
    const size_t left = n - body;
    char* b = s.bounce.ensure(kDirectSlice);
    std::memcpy(b, in + body, left);
    const size_t padded = round_up(left, kAlign);
    std::memset(b + left, 0, padded - left);
    direct_or_buffered(f, b, left, padded, off + pos + body);
  }
  return off;
}

// True when the probe compresses below half its size. Measured (docs/PERFORMANCE.md):
// zstd -1 runs at ~0.25 GB/s per core, far below a local NVMe/virtio disk, so shaving
// 10-30 % off float weights makes a save 3-4x slower. Below 50 % the data is highly
// redundant (zeros, masks, int ids), zstd is fast on it, and halving the bytes pays.
// CODEC_ZSTD is there for users who want the space regardless of speed.
bool probe_compresses(Scratch& s, const char* src, size_t len, int level, int shuffle) {
  const size_t part = kProbePart;
  char* probe = s.probe.ensure(part * kProbeParts);
  size_t n = 0;
  for (size_t k = 0; k < kProbeParts; ++k) {
    // Evenly spread, 8-byte aligned starts so shuffled samples keep element boundaries.
    const size_t start = ((len - part) / (kProbeParts - 1) * k) & ~size_t(7);
    std::memcpy(probe + n, src + start, part);
    n += part;
  }
  const char* in = probe;
  if (shuffle > 1) {
    char* sh = s.probe_shuffled.ensure(n);
    ackpt::shuffle(probe, sh, n, static_cast<size_t>(shuffle));
    in = sh;
  }
  const size_t cap = zstd::compress_bound(n);
  char* out = s.probe_out.ensure(cap);
  const size_t c = zstd::compress(in, n, out, cap, level);
  return c != 0 && c * 2 < n;
}

void validate(const std::vector<std::string>& paths, const std::vector<WriteJob>& jobs) {
  bool need_zstd = false;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const WriteJob& j = jobs[i];
    const std::string where = "write job " + std::to_string(i) + ": ";
    if (j.file >= paths.size())
      throw FormatError(where + "file index " + std::to_string(j.file) + " out of range (" +
                        std::to_string(paths.size()) + " paths)");
    if (j.codec != kCodecRaw && j.codec != kCodecZstd && j.codec != kCodecAuto)
      throw FormatError(where + "unknown codec " + std::to_string(j.codec));
    if (j.shuffle != 0 && j.shuffle != 1 && j.shuffle != 2 && j.shuffle != 4 && j.shuffle != 8)
      throw FormatError(where + "shuffle must be 0, 1, 2, 4 or 8, got " +
                        std::to_string(j.shuffle));
    if (j.len > kMaxRawLength)
      throw FormatError(where + "chunk of " + std::to_string(j.len) +
                        " bytes exceeds the 2 GiB limit");
    if (j.len && !j.src) throw FormatError(where + "null source");
    need_zstd |= j.codec == kCodecZstd;
  }
  if (need_zstd && !zstd::loaded())
    throw CodecError("codec zstd requested but zstd is not loaded (call zstd_load)");
}

// The raw crc of job i: the known one (checked against the host's when asked), else none.
bool known_raw_crc(const WriteJob& j, size_t i, bool check, uint32_t* out) {
  if (!j.known_crc || !j.known_flag || !*j.known_flag) return false;
  *out = *j.known_crc;
  if (check) {
    const uint32_t host = crc32c(0, j.src, j.len);
    if (host != *out)
      throw ChecksumError("write job " + std::to_string(i) + ": the known crc32c " +
                              std::to_string(*out) + " differs from the host's " + std::to_string(host),
                          "", 0, static_cast<int64_t>(i));
  }
  return true;
}

}  // namespace

std::vector<ChunkRecord> Writer::write(const std::vector<std::string>& paths,
                                       const std::vector<WriteJob>& jobs, bool fsync, Gate* gate,
                                       bool check_known) {
  validate(paths, jobs);
  const bool have_zstd = zstd::loaded();

  std::vector<std::unique_ptr<FileState>> files;
  files.reserve(paths.size());
  for (const auto& p : paths) {
    auto f = std::make_unique<FileState>();
    f->fd = open_create_excl(p);
    f->direct = open_direct_like(f->fd, true);
    f->direct_ok.store(f->direct.valid());
    files.push_back(std::move(f));
  }
  // Allocate each file in one piece before the parallel writers fill it: otherwise ext4 places
  // the blocks of concurrent direct writes as they arrive, out of file order, and the step
  // no longer reads back as one sequential stream. The bound is every chunk stored raw; the
  // file is cut back to its last chunk below. Best effort: a refusal (no fallocate on this
  // file system, no room for the bound) leaves the writes to allocate as they go.
  std::vector<uint64_t> bound(files.size(), 0);
  for (const auto& j : jobs) bound[j.file] += round_up(j.len, kAlign);
  for (size_t k = 0; k < files.size(); ++k) {
    if (!bound[k]) continue;
    (void)::fallocate(files[k]->fd.get(), 0, 0, static_cast<off_t>(bound[k]));
    files[k]->padded.store(true);  // cut back to the end of the last chunk in any case
  }

  std::vector<ChunkRecord> records(jobs.size());
  std::vector<Scratch> scratch(pool_.size());

  // Every job is two tasks, taken in this order: 2i stores it (codec, stored crc, pwrite),
  // 2i+1 computes its raw crc32c. Done in one task, the crc came before the pwrite and the
  // disk waited for it; as a task of its own it runs on another worker while a write is in
  // flight. Both read the staged bytes only, and only once the gate has released them.
  std::vector<uint32_t> raw_crcs(jobs.size());
  pool_.run(2 * jobs.size(), [&](size_t t, unsigned w) {
    const size_t i = t / 2;
    if (gate) gate->wait(i);
    const WriteJob& j = jobs[i];
    const char* src = static_cast<const char*>(j.src);
    if (t % 2) {
      if (!known_raw_crc(j, i, check_known, &raw_crcs[i])) raw_crcs[i] = crc32c(0, src, j.len);
      return;
    }
    FileState& f = *files[j.file];
    Scratch& s = scratch[w];
    ChunkRecord& r = records[i];
    r.file = j.file;
    r.raw_length = j.len;
    r.length = j.len;
    r.codec = kCodecRaw;
    r.shuffle = 0;

    int codec = j.codec;
    const int shuf = j.shuffle > 1 ? j.shuffle : 0;
    if (codec == kCodecAuto) {
      if (!have_zstd || j.len == 0)
        codec = kCodecRaw;
      else if (j.len > kProbePart * kProbeParts)
        codec = probe_compresses(s, src, j.len, j.level, shuf) ? kCodecZstd : kCodecRaw;
      else
        codec = kCodecZstd;  // small: compress it whole, keep raw if that does not help
    }
    if (codec == kCodecRaw) {
      r.offset = store_raw(f, s, src, j.len);
      return;
    }
    const char* in = src;
    if (shuf) {
      char* sh = s.shuffled.ensure(j.len);
      ackpt::shuffle(src, sh, j.len, static_cast<size_t>(shuf));
      in = sh;
    }
    const size_t cap = zstd::compress_bound(j.len);
    char* out = s.compressed.ensure(cap);
    const size_t n = zstd::compress(in, j.len, out, cap, j.level);
    if (n == 0 || n >= j.len) {  // incompressible: store raw, never shuffled
      r.offset = store_raw(f, s, src, j.len);
      return;
    }
    r.codec = kCodecZstd;
    r.shuffle = shuf;
    r.crc32c = crc32c(0, out, n);
    r.length = n;
    r.offset = reserve(f, n, false);
    pwrite_all(f.fd, out, n, r.offset);
  });
  for (size_t i = 0; i < jobs.size(); ++i) {
    records[i].raw_crc32c = raw_crcs[i];
    if (records[i].codec == kCodecRaw) records[i].crc32c = raw_crcs[i];
  }
  scratch.clear();  // release scratch memory before the fsyncs

  // Direct writes pad their last block, and files were allocated for every chunk raw: cut
  // each file back to the end of its last chunk.
  std::vector<uint64_t> ends(files.size(), 0);
  for (const auto& r : records) ends[r.file] = std::max(ends[r.file], r.offset + r.length);
  for (size_t k = 0; k < files.size(); ++k)
    if (files[k]->padded.load()) truncate_fd(files[k]->fd, ends[k]);

  if (fsync) pool_.run(files.size(), [&](size_t k, unsigned) { fsync_fd(files[k]->fd); });
  for (auto& f : files) {
    f->direct.close();
    f->fd.close();
  }
  return records;
}

}  // namespace ackpt
