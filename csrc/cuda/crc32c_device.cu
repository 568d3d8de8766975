// Optional CUDA module: crc32c of staged chunks computed over device memory, bit-identical
// to the host crc32c (csrc/crc32c.cc), so the host writer can skip its checksum pass.
//
// Built by setup.py only where nvcc is found, as a plain shared library with a C ABI
// (csrc/cuda/crc32c_device.h); the core loads it with dlopen (csrc/cuda_crc_dl.cc). It links
// the CUDA runtime statically, so it needs nothing at import but the driver at first use.
// Caller: async_ckpt/device_crc.py, on the training thread, right after it queued the
// snapshot's device-to-host copies on the side stream; the kernels run on that stream.
//
// Algorithm (csrc/crc32c_math.h): every thread takes one segment (16 KiB by default) of one
// piece, computes its raw CRC state with slicing-by-8 tables held in shared memory, shifts
// it by the bytes that follow it in its chunk and xors it into the chunk's word; a second
// kernel turns each word into the standard crc32c; the words are copied to pinned host
// memory in stream order.
#include "crc32c_device.h"

#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "../crc32c_math.h"

namespace {

using ackpt::crcmath::Piece;
namespace cm = ackpt::crcmath;

constexpr int kThreads = 256;
constexpr int kMaxDevices = 64;

__device__ uint32_t g_slice[8][256];
__device__ uint32_t g_powers[cm::kPowers];

// The work of global thread g: find its piece (the last whose first segment is <= g in
// seg_prefix, where seg_prefix[i] is piece i's first global segment and seg_prefix[n] the
// total), checksum its segment and return the term for *chunk. The kernel and the host
// reference (ackpt_cuda_crc32c_pieces_host) both run exactly this.
ACKPT_HD uint32_t thread_term(const Piece* pieces, const uint64_t* seg_prefix, uint32_t n_pieces,
                              const uint64_t* chunk_lens, uint64_t segment, uint64_t g,
                              const uint32_t (*slice)[256], const uint32_t* powers, uint32_t* chunk) {
  uint32_t lo = 0, hi = n_pieces;
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (seg_prefix[mid] <= g) lo = mid; else hi = mid;
  }
  const Piece& piece = pieces[lo];
  const uint64_t begin = (g - seg_prefix[lo]) * segment;
  const uint64_t end = begin + segment < piece.len ? begin + segment : piece.len;
  *chunk = piece.chunk;
  return cm::segment_term(piece, begin, end, chunk_lens[piece.chunk], slice, powers);
}

// Fills seg_prefix[0..n_pieces] (see thread_term); returns the total number of segments.
uint64_t fill_prefix(const Piece* pieces, uint32_t n_pieces, uint64_t segment, uint64_t* prefix) {
  prefix[0] = 0;
  for (uint32_t i = 0; i < n_pieces; ++i) prefix[i + 1] = prefix[i] + (pieces[i].len + segment - 1) / segment;
  return prefix[n_pieces];
}

__global__ void piece_terms(const Piece* pieces, const uint64_t* seg_prefix, uint32_t n_pieces,
                            const uint64_t* chunk_lens, uint64_t segment, uint32_t* words) {
  __shared__ uint32_t slice[8][256];
  __shared__ uint32_t powers[cm::kPowers];
  for (int i = threadIdx.x; i < 8 * 256; i += blockDim.x) slice[i / 256][i % 256] = g_slice[i / 256][i % 256];
  for (int i = threadIdx.x; i < cm::kPowers; i += blockDim.x) powers[i] = g_powers[i];
  __syncthreads();

  const uint64_t total = seg_prefix[n_pieces];
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
  for (uint64_t g = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += stride) {
    uint32_t chunk = 0;
    const uint32_t term = thread_term(pieces, seg_prefix, n_pieces, chunk_lens, segment, g, slice, powers, &chunk);
    if (term) atomicXor(&words[chunk], term);
  }
}

__global__ void finalize_words(uint32_t* words, const uint64_t* chunk_lens, uint32_t n_chunks) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n_chunks) words[i] = cm::finalize(words[i], chunk_lens[i], g_powers);
}

std::mutex g_init_mutex;
bool g_initialised[kMaxDevices] = {};

// Uploads the tables once per device on a private non-blocking stream, so the first save
// does not wait for the training work queued on the legacy default stream.
cudaError_t ensure_tables(int device) {
  std::lock_guard<std::mutex> lock(g_init_mutex);
  if (g_initialised[device]) return cudaSuccess;
  static uint32_t slice[8][256];
  static uint32_t powers[cm::kPowers];
  cm::make_slices(slice);
  cm::make_powers(powers);
  cudaStream_t init = nullptr;
  cudaError_t e = cudaStreamCreateWithFlags(&init, cudaStreamNonBlocking);
  if (e != cudaSuccess) return e;
  e = cudaMemcpyToSymbolAsync(g_slice, slice, sizeof slice, 0, cudaMemcpyHostToDevice, init);
  if (e == cudaSuccess)
    e = cudaMemcpyToSymbolAsync(g_powers, powers, sizeof powers, 0, cudaMemcpyHostToDevice, init);
  if (e == cudaSuccess) e = cudaStreamSynchronize(init);
  cudaStreamDestroy(init);
  if (e == cudaSuccess) g_initialised[device] = true;
  return e;
}

// Restores the caller's current device on every return path (torch keeps its own).
struct DeviceGuard {
  int previous = -1;
  cudaError_t set(int device) {
    cudaError_t e = cudaGetDevice(&previous);
    if (e != cudaSuccess) return e;
    return previous == device ? cudaSuccess : cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = -1;
    if (previous >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
  }
};

int check_args(const Piece* pieces, uint32_t n_pieces, const uint64_t* chunk_lens, uint32_t n_chunks,
               uint64_t segment) {
  if (segment == 0 || segment % 8 != 0) return ACKPT_CUDA_EINVAL;
  if (n_chunks == 0) return ACKPT_CUDA_EINVAL;
  for (uint32_t i = 0; i < n_pieces; ++i) {
    const Piece& p = pieces[i];
    if (p.chunk >= n_chunks || p.len == 0 || p.offset > chunk_lens[p.chunk] ||
        p.len > chunk_lens[p.chunk] - p.offset)
      return ACKPT_CUDA_EINVAL;
  }
  return 0;
}

// Workspace layout (caller-provided pinned host memory, then one device allocation):
// pieces | segment prefix (n_pieces + 1) | chunk lengths. The device copy adds the words.
size_t args_bytes(uint32_t n_pieces, uint32_t n_chunks) {
  return sizeof(Piece) * n_pieces + sizeof(uint64_t) * (n_pieces + 1) + sizeof(uint64_t) * n_chunks;
}

}  // namespace

extern "C" {

int ackpt_cuda_abi_version(void) { return ACKPT_CUDA_ABI_VERSION; }

const char* ackpt_cuda_error_string(int code) {
  if (code == ACKPT_CUDA_EINVAL) return "invalid arguments (piece outside its chunk, bad segment size)";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int ackpt_cuda_device_count(int* count) {
  *count = 0;
  return static_cast<int>(cudaGetDeviceCount(count));
}

size_t ackpt_cuda_workspace_bytes(uint32_t n_pieces, uint32_t n_chunks) {
  return args_bytes(n_pieces, n_chunks);
}

int ackpt_cuda_crc32c_pieces(const Piece* pieces, uint32_t n_pieces, const uint64_t* chunk_lens,
                             uint32_t n_chunks, uint32_t* out_host, uint64_t segment, void* stream,
                             int device, void* workspace, size_t workspace_bytes) {
  if (const int bad = check_args(pieces, n_pieces, chunk_lens, n_chunks, segment)) return bad;
  if (device < 0 || device >= kMaxDevices) return ACKPT_CUDA_EINVAL;
  const size_t arg_bytes = args_bytes(n_pieces, n_chunks);
  if (!workspace || workspace_bytes < arg_bytes) return ACKPT_CUDA_EINVAL;
  DeviceGuard guard;
  cudaError_t e = guard.set(device);
  if (e == cudaSuccess) e = ensure_tables(device);
  if (e != cudaSuccess) return static_cast<int>(e);

  // Arguments are packed into the caller's pinned workspace: a copy from pageable memory
  // may synchronise with the stream, which would make the caller wait for the very
  // device-to-host copies queued before this call.
  const auto s = static_cast<cudaStream_t>(stream);
  char* ws = static_cast<char*>(workspace);
  const size_t pieces_bytes = sizeof(Piece) * n_pieces;
  const size_t prefix_bytes = sizeof(uint64_t) * (n_pieces + 1);
  const size_t words_bytes = sizeof(uint32_t) * n_chunks;
  if (pieces_bytes) memcpy(ws, pieces, pieces_bytes);
  const uint64_t total_segments = fill_prefix(pieces, n_pieces, segment, reinterpret_cast<uint64_t*>(ws + pieces_bytes));
  memcpy(ws + pieces_bytes + prefix_bytes, chunk_lens, sizeof(uint64_t) * n_chunks);

  char* dev = nullptr;  // stream-ordered: arguments | words
  e = cudaMallocAsync(reinterpret_cast<void**>(&dev), arg_bytes + words_bytes, s);
  if (e != cudaSuccess) return static_cast<int>(e);
  const auto* d_pieces = reinterpret_cast<const Piece*>(dev);
  const auto* d_prefix = reinterpret_cast<const uint64_t*>(dev + pieces_bytes);
  const auto* d_lens = reinterpret_cast<const uint64_t*>(dev + pieces_bytes + prefix_bytes);
  auto* d_words = reinterpret_cast<uint32_t*>(dev + arg_bytes);

  e = cudaMemcpyAsync(dev, ws, arg_bytes, cudaMemcpyHostToDevice, s);
  if (e == cudaSuccess) e = cudaMemsetAsync(d_words, 0, words_bytes, s);
  if (e == cudaSuccess && total_segments > 0) {
    int sms = 1;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    const uint64_t wanted = (total_segments + kThreads - 1) / kThreads;
    const unsigned blocks = static_cast<unsigned>(wanted < uint64_t(sms) * 32 ? wanted : uint64_t(sms) * 32);
    piece_terms<<<blocks, kThreads, 0, s>>>(d_pieces, d_prefix, n_pieces, d_lens, segment, d_words);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess) {
    finalize_words<<<(n_chunks + kThreads - 1) / kThreads, kThreads, 0, s>>>(d_words, d_lens, n_chunks);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess) e = cudaMemcpyAsync(out_host, d_words, words_bytes, cudaMemcpyDeviceToHost, s);
  const cudaError_t freed = cudaFreeAsync(dev, s);
  return static_cast<int>(e != cudaSuccess ? e : freed);
}

int ackpt_cuda_crc32c_pieces_host(const Piece* pieces, uint32_t n_pieces, const uint64_t* chunk_lens,
                                  uint32_t n_chunks, uint32_t* out, uint64_t segment) {
  if (const int bad = check_args(pieces, n_pieces, chunk_lens, n_chunks, segment)) return bad;
  static uint32_t slice[8][256];
  static uint32_t powers[cm::kPowers];
  static std::once_flag once;
  std::call_once(once, [] {
    cm::make_slices(slice);
    cm::make_powers(powers);
  });
  // The kernel's decomposition, one "thread" after another (threads' xors commute).
  std::vector<uint64_t> prefix(size_t(n_pieces) + 1);
  const uint64_t total = fill_prefix(pieces, n_pieces, segment, prefix.data());
  std::vector<uint32_t> words(n_chunks, 0);
  for (uint64_t g = 0; g < total; ++g) {
    uint32_t chunk = 0;
    const uint32_t term = thread_term(pieces, prefix.data(), n_pieces, chunk_lens, segment, g, slice, powers, &chunk);
    words[chunk] ^= term;
  }
  for (uint32_t c = 0; c < n_chunks; ++c) out[c] = cm::finalize(words[c], chunk_lens[c], powers);
  return 0;
}

}  // extern "C"
