#include "cuda_crc_dl.h"

#include <dlfcn.h>

#include <atomic>
#include <mutex>

#include "crc32c_pieces.h"
#include "errors.h"

namespace ackpt {
namespace cuda_crc {
namespace {

constexpr int kAbiVersion = 2;  // ACKPT_CUDA_ABI_VERSION in csrc/cuda/crc32c_device.h

struct Api {
  std::string path;
  const char* (*error_string)(int);
  int (*device_count)(int*);
  size_t (*workspace_bytes)(uint32_t, uint32_t);
  int (*pieces)(const crcmath::Piece*, uint32_t, const uint64_t*, uint32_t, uint32_t*, uint64_t,
                void*, int, void*, size_t);
  int (*pieces_host)(const crcmath::Piece*, uint32_t, const uint64_t*, uint32_t, uint32_t*, uint64_t);
};

std::atomic<const Api*> g_api{nullptr};
std::mutex g_load_mu;

const Api& api() {
  const Api* a = g_api.load(std::memory_order_acquire);
  if (!a) throw Error("the CUDA checksum module is not loaded");
  return *a;
}

template <class F>
void sym(void* h, const char* name, F& out, const std::string& path) {
  void* p = dlsym(h, name);
  if (!p) throw Error("CUDA checksum module '" + path + "' lacks symbol " + name);
  out = reinterpret_cast<F>(p);
}

[[noreturn]] void fail(const Api& a, const char* what, int code) {
  throw Error(std::string(what) + ": " + a.error_string(code) + " (code " + std::to_string(code) + ")");
}

void check_sizes(const std::vector<crcmath::Piece>& pieces, const std::vector<uint64_t>& chunk_lens) {
  if (pieces.size() > UINT32_MAX || chunk_lens.size() > UINT32_MAX || chunk_lens.empty())
    throw FormatError("need 1 to 2^32-1 chunks and fewer than 2^32 pieces");
}

}  // namespace

void load(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_load_mu);
  if (const Api* a = g_api.load(std::memory_order_acquire)) {
    if (a->path == path) return;
    throw Error("a CUDA checksum module is already loaded from '" + a->path + "'");
  }
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* why = dlerror();
    throw Error("cannot load the CUDA checksum module '" + path + "': " + (why ? why : "unknown"));
  }
  auto* a = new Api{};  // lives for the process: the module is never unloaded
  a->path = path;
  int (*abi)() = nullptr;
  try {
    sym(h, "ackpt_cuda_abi_version", abi, path);
    if (abi() != kAbiVersion)
      throw Error("CUDA checksum module '" + path + "' has ABI " + std::to_string(abi()) +
                  ", the core expects " + std::to_string(kAbiVersion) + " (rebuild the package)");
    sym(h, "ackpt_cuda_error_string", a->error_string, path);
    sym(h, "ackpt_cuda_device_count", a->device_count, path);
    sym(h, "ackpt_cuda_workspace_bytes", a->workspace_bytes, path);
    sym(h, "ackpt_cuda_crc32c_pieces", a->pieces, path);
    sym(h, "ackpt_cuda_crc32c_pieces_host", a->pieces_host, path);
  } catch (...) {
    delete a;
    dlclose(h);
    throw;
  }
  g_api.store(a, std::memory_order_release);
}

std::string loaded_path() {
  const Api* a = g_api.load(std::memory_order_acquire);
  return a ? a->path : std::string();
}

int device_count() {
  const Api& a = api();
  int n = 0;
  if (const int rc = a.device_count(&n)) fail(a, "no usable CUDA device", rc);
  return n;
}

size_t workspace_bytes(size_t n_pieces, size_t n_chunks) {
  if (n_pieces > UINT32_MAX || n_chunks > UINT32_MAX) throw FormatError("too many pieces or chunks");
  return api().workspace_bytes(static_cast<uint32_t>(n_pieces), static_cast<uint32_t>(n_chunks));
}

void launch(const std::vector<crcmath::Piece>& pieces, const std::vector<uint64_t>& chunk_lens,
            uint32_t* out_host, uint64_t segment, uintptr_t stream, int device, void* workspace,
            size_t workspace_len) {
  check_pieces(pieces, chunk_lens, segment);
  check_sizes(pieces, chunk_lens);
  const Api& a = api();
  if (workspace_len < a.workspace_bytes(static_cast<uint32_t>(pieces.size()),
                                        static_cast<uint32_t>(chunk_lens.size())))
    throw FormatError("workspace is smaller than cuda_crc_workspace_bytes()");
  if (const int rc = a.pieces(pieces.data(), static_cast<uint32_t>(pieces.size()), chunk_lens.data(),
                              static_cast<uint32_t>(chunk_lens.size()), out_host, segment,
                              reinterpret_cast<void*>(stream), device, workspace, workspace_len))
    fail(a, "CUDA checksum launch failed", rc);
}

std::vector<uint32_t> host_reference(const std::vector<crcmath::Piece>& pieces,
                                     const std::vector<uint64_t>& chunk_lens, uint64_t segment) {
  check_pieces(pieces, chunk_lens, segment);
  check_sizes(pieces, chunk_lens);
  const Api& a = api();
  std::vector<uint32_t> out(chunk_lens.size());
  if (const int rc = a.pieces_host(pieces.data(), static_cast<uint32_t>(pieces.size()), chunk_lens.data(),
                                   static_cast<uint32_t>(chunk_lens.size()), out.data(), segment))
    fail(a, "CUDA checksum module (host reference)", rc);
  return out;
}

}  // namespace cuda_crc
}  // namespace ackpt
