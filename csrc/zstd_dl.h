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

}  // namespace zstd
}  // namespace ackpt
