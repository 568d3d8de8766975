// zstd loaded at run time with dlopen (no headers or link-time dependency): libzstd.so.1 by
// default, or any shared object exporting the ZSTD_* API (the `zstandard` package's _cffi
// module). Compression/decompression contexts are per thread and reused.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ackpt {
namespace zstd {

// Loads the library (path empty: "libzstd.so.1"). Idempotent: once a library is loaded, later
// calls return its path. CodecError when nothing can be loaded or a symbol is missing.
std::string load(const std::string& path);

// Path of the loaded library, or "" when none is loaded.
std::string backend();
bool loaded();

// Upper bound of one frame's size for len input bytes.
size_t compress_bound(size_t len);

// One standard frame with the content size recorded. Returns its size; CodecError on error
// except a too-small destination, which returns 0 (the caller then stores the chunk raw).
size_t compress(const void* src, size_t len, void* dst, size_t cap, int level);

// Checks that src[0,len) is exactly one frame whose declared content size equals
// expected; FormatError otherwise. Reads only the frame's headers; allocates nothing.
void check_frame(const void* src, size_t len, size_t expected);

// Checks that src[0,len) is exactly one frame whose declared content size equals dst_len
// (FormatError otherwise, before any decoding), then decodes it into dst (CodecError on a
// corrupt frame, FormatError when the decoded size differs).
void decompress(const void* src, size_t len, void* dst, size_t dst_len);

// The largest window a streamed frame may use (docs/FORMAT.md section 3): zstd's default
// decoder limit, and more than any level of the writer asks for (level 22: 2^27).
constexpr int kMaxWindowLog = 27;

// Receives decoded bytes in order, at most the slice size at a time.
class Sink {
 public:
  virtual ~Sink() = default;
  virtual void put(const char* p, size_t n) = 0;
};

// Like decompress, without a destination: the frame is decoded through `slice` (slice_len
// bytes, the caller's) and handed to `sink` piece by piece. Memory is the decoder's window
// (at most 2^kMaxWindowLog bytes; a frame asking for more is a FormatError) plus the slice,
// whatever the frame declares.
void decompress_stream(const void* src, size_t len, size_t expected, char* slice, size_t slice_len,
                       Sink& sink);

}  // namespace zstd
}  // namespace ackpt
