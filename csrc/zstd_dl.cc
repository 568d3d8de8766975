#include "zstd_dl.h"

#include <dlfcn.h>

#include <atomic>
#include <mutex>

#include "errors.h"

namespace ackpt {
namespace zstd {
namespace {

// The few declarations of zstd's stable public API (zstd.h, v1.4+) this file needs.
struct ZCCtx;
struct ZDCtx;
constexpr int kCLevel = 100;              // ZSTD_c_compressionLevel
constexpr int kCContentSizeFlag = 200;    // ZSTD_c_contentSizeFlag
constexpr int kCChecksumFlag = 201;       // ZSTD_c_checksumFlag
constexpr int kDWindowLogMax = 100;       // ZSTD_d_windowLogMax
constexpr unsigned long long kContentSizeUnknown = ~0ULL;       // ZSTD_CONTENTSIZE_UNKNOWN
constexpr unsigned long long kContentSizeError = ~0ULL - 1;     // ZSTD_CONTENTSIZE_ERROR
constexpr int kErrorDstSizeTooSmall = 70;                        // ZSTD_error_dstSize_tooSmall
constexpr int kErrorWindowTooLarge = 16;      // ZSTD_error_frameParameter_windowTooLarge
constexpr int kResetSessionOnly = 1;          // ZSTD_reset_session_only

struct InBuffer {   // ZSTD_inBuffer
  const void* src;
  size_t size;
  size_t pos;
};
struct OutBuffer {  // ZSTD_outBuffer
  void* dst;
  size_t size;
  size_t pos;
};

struct Api {
  std::string path;
  unsigned (*versionNumber)();
  unsigned (*isError)(size_t);
  const char* (*getErrorName)(size_t);
  int (*getErrorCode)(size_t);
  size_t (*compressBound)(size_t);
  ZCCtx* (*createCCtx)();
  size_t (*freeCCtx)(ZCCtx*);
  size_t (*CCtx_setParameter)(ZCCtx*, int, int);
  size_t (*compress2)(ZCCtx*, void*, size_t, const void*, size_t);
  ZDCtx* (*createDCtx)();
  size_t (*freeDCtx)(ZDCtx*);
  size_t (*DCtx_setParameter)(ZDCtx*, int, int);
  size_t (*decompressDCtx)(ZDCtx*, void*, size_t, const void*, size_t);
  unsigned long long (*getFrameContentSize)(const void*, size_t);
  size_t (*findFrameCompressedSize)(const void*, size_t);
  size_t (*DCtx_reset)(ZDCtx*, int);
  size_t (*decompressStream)(ZDCtx*, OutBuffer*, InBuffer*);
};

std::atomic<const Api*> g_api{nullptr};
std::mutex g_load_mu;

const Api& api() {
  const Api* a = g_api.load(std::memory_order_acquire);
  if (!a)
    throw CodecError(
        "zstd is not loaded: libzstd.so.1 was not found and no fallback was given "
        "(install the `zstandard` package)");
  return *a;
}

template <class F>
void sym(void* h, const char* name, F& out, const std::string& path) {
  void* p = dlsym(h, name);
  if (!p) throw CodecError("zstd library '" + path + "' lacks symbol " + name);
  out = reinterpret_cast<F>(p);
}

// Per-thread contexts, freed at thread exit (the library is never unloaded).
struct Contexts {
  ZCCtx* c = nullptr;
  ZDCtx* d = nullptr;
  ZDCtx* s = nullptr;  // streaming, window capped at 2^kMaxWindowLog
  ~Contexts() {
    const Api* a = g_api.load(std::memory_order_acquire);
    if (a && c) a->freeCCtx(c);
    if (a && d) a->freeDCtx(d);
    if (a && s) a->freeDCtx(s);
  }
};
thread_local Contexts t_ctx;

std::string err_name(const Api& a, size_t code) { return a.getErrorName(code); }

}  // namespace

std::string load(const std::string& path_in) {
  std::lock_guard<std::mutex> lock(g_load_mu);
  if (const Api* a = g_api.load(std::memory_order_acquire)) return a->path;
  const std::string path = path_in.empty() ? "libzstd.so.1" : path_in;
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = dlerror();
    throw CodecError("cannot load zstd from '" + path + "': " + (e ? e : "unknown error"));
  }
  auto* a = new Api();  // lives for the process, like the dlopen handle
  a->path = path;
  try {
    sym(h, "ZSTD_versionNumber", a->versionNumber, path);
    sym(h, "ZSTD_isError", a->isError, path);
    sym(h, "ZSTD_getErrorName", a->getErrorName, path);
    sym(h, "ZSTD_getErrorCode", a->getErrorCode, path);
    sym(h, "ZSTD_compressBound", a->compressBound, path);
    sym(h, "ZSTD_createCCtx", a->createCCtx, path);
    sym(h, "ZSTD_freeCCtx", a->freeCCtx, path);
    sym(h, "ZSTD_CCtx_setParameter", a->CCtx_setParameter, path);
    sym(h, "ZSTD_compress2", a->compress2, path);
    sym(h, "ZSTD_createDCtx", a->createDCtx, path);
    sym(h, "ZSTD_freeDCtx", a->freeDCtx, path);
    sym(h, "ZSTD_DCtx_setParameter", a->DCtx_setParameter, path);
    sym(h, "ZSTD_decompressDCtx", a->decompressDCtx, path);
    sym(h, "ZSTD_getFrameContentSize", a->getFrameContentSize, path);
    sym(h, "ZSTD_findFrameCompressedSize", a->findFrameCompressedSize, path);
    sym(h, "ZSTD_DCtx_reset", a->DCtx_reset, path);
    sym(h, "ZSTD_decompressStream", a->decompressStream, path);
    if (a->versionNumber() < 10400)
      throw CodecError("zstd library '" + path + "' is older than 1.4.0");
  } catch (...) {
    delete a;
    dlclose(h);
    throw;
  }
  if (path_in.empty()) {
    // Report the file actually loaded, for zstd_backend().
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(a->compress2), &info) && info.dli_fname)
      a->path = info.dli_fname;
  }
  g_api.store(a, std::memory_order_release);
  return a->path;
}

std::string backend() {
  const Api* a = g_api.load(std::memory_order_acquire);
  return a ? a->path : std::string();
}

bool loaded() { return g_api.load(std::memory_order_acquire) != nullptr; }

size_t compress_bound(size_t len) { return api().compressBound(len); }

size_t compress(const void* src, size_t len, void* dst, size_t cap, int level) {
  const Api& a = api();
  if (!t_ctx.c) {
    t_ctx.c = a.createCCtx();
    if (!t_ctx.c) throw CodecError("ZSTD_createCCtx failed (out of memory)");
  }
  ZCCtx* c = t_ctx.c;
  size_t r = a.CCtx_setParameter(c, kCLevel, level);
  if (!a.isError(r)) r = a.CCtx_setParameter(c, kCContentSizeFlag, 1);
  if (!a.isError(r)) r = a.CCtx_setParameter(c, kCChecksumFlag, 0);  // crc32c covers it
  if (a.isError(r)) throw CodecError("zstd parameter rejected: " + err_name(a, r));
  r = a.compress2(c, dst, cap, src, len);
  if (a.isError(r)) {
    if (a.getErrorCode(r) == kErrorDstSizeTooSmall) return 0;
    throw CodecError("zstd compression failed: " + err_name(a, r));
  }
  return r;
}

void check_frame(const void* src, size_t len, size_t expected) {
  const Api& a = api();
  const unsigned long long declared = a.getFrameContentSize(src, len);
  if (declared == kContentSizeError)
    throw FormatError("not a zstd frame (bad magic or truncated header)");
  if (declared == kContentSizeUnknown)
    throw FormatError("zstd frame does not declare its content size");
  if (declared != expected)
    throw FormatError("zstd frame declares " + std::to_string(declared) +
                      " content bytes, expected " + std::to_string(expected));
  const size_t frame = a.findFrameCompressedSize(src, len);
  if (a.isError(frame)) throw FormatError("corrupt zstd frame: " + err_name(a, frame));
  if (frame != len)
    throw FormatError("stored bytes hold " + std::to_string(len) + " bytes but the zstd frame is " +
                      std::to_string(frame) + " (exactly one frame required)");
}

void decompress(const void* src, size_t len, void* dst, size_t dst_len) {
  const Api& a = api();
  check_frame(src, len, dst_len);
  if (!t_ctx.d) {
    t_ctx.d = a.createDCtx();
    if (!t_ctx.d) throw CodecError("ZSTD_createDCtx failed (out of memory)");
    a.DCtx_setParameter(t_ctx.d, kDWindowLogMax, 31);  // frames of up to 2 GiB windows
  }
  const size_t r = a.decompressDCtx(t_ctx.d, dst, dst_len, src, len);
  if (a.isError(r)) throw CodecError("zstd decompression failed: " + err_name(a, r));
  if (r != dst_len)
    throw FormatError("zstd frame decoded to " + std::to_string(r) + " bytes, expected " +
                      std::to_string(dst_len));
}

void decompress_stream(const void* src, size_t len, size_t expected, char* slice, size_t slice_len,
                       Sink& sink) {
  const Api& a = api();
  check_frame(src, len, expected);
  if (!t_ctx.s) {
    t_ctx.s = a.createDCtx();
    if (!t_ctx.s) throw CodecError("ZSTD_createDCtx failed (out of memory)");
    const size_t r = a.DCtx_setParameter(t_ctx.s, kDWindowLogMax, kMaxWindowLog);
    if (a.isError(r)) throw CodecError("zstd parameter rejected: " + err_name(a, r));
  }
  ZDCtx* d = t_ctx.s;
  a.DCtx_reset(d, kResetSessionOnly);  // a previous frame may have failed half-way
  InBuffer in{src, len, 0};
  size_t total = 0;
  for (;;) {
    OutBuffer out{slice, slice_len, 0};
    const size_t r = a.decompressStream(d, &out, &in);
    if (a.isError(r)) {
      if (a.getErrorCode(r) == kErrorWindowTooLarge)
        throw FormatError("zstd frame needs a window over " + std::to_string(size_t(1) << kMaxWindowLog) +
                          " bytes (more than any writer of the format uses)");
      throw CodecError("zstd decompression failed: " + err_name(a, r));
    }
    if (out.pos) {
      if (out.pos > expected - total)
        throw FormatError("zstd frame decodes to more than " + std::to_string(expected) + " bytes");
      total += out.pos;
      sink.put(slice, out.pos);
    }
    if (r == 0) break;  // the frame is complete and flushed
    if (in.pos == in.size && out.pos < out.size)
      throw FormatError("zstd frame ends early (truncated)");
  }
  if (total != expected)
    throw FormatError("zstd frame decoded to " + std::to_string(total) + " bytes, expected " +
                      std::to_string(expected));
}

}  // namespace zstd
}  // namespace ackpt
