// The optional CUDA checksum module (csrc/cuda/), loaded at run time with dlopen so the core
// never links CUDA: a machine without a GPU, a driver or nvcc imports and works unchanged.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "crc32c_math.h"

namespace ackpt {
namespace cuda_crc {

// Loads the module at `path` and checks its ABI version. Idempotent for the same path.
// Error (CheckpointError in Python) when it cannot be loaded.
void load(const std::string& path);

// Path of the loaded module, or "".
std::string loaded_path();

// Number of CUDA devices the module's runtime sees; Error with the CUDA reason otherwise
// (no driver, driver older than the runtime, ...).
int device_count();

// Pinned workspace bytes `launch` needs for these counts.
size_t workspace_bytes(size_t n_pieces, size_t n_chunks);

// Queues the chunk checksums on `stream` of `device`; out_host receives n_chunks words
// (ackpt_cuda_crc32c_pieces in csrc/cuda/crc32c_device.h). `workspace` is pinned host memory
// that must stay untouched until the stream gets there. Error when the launch fails.
void launch(const std::vector<crcmath::Piece>& pieces, const std::vector<uint64_t>& chunk_lens,
            uint32_t* out_host, uint64_t segment, uintptr_t stream, int device, void* workspace,
            size_t workspace_len);

// The module's host build of the same computation (pieces hold host addresses).
std::vector<uint32_t> host_reference(const std::vector<crcmath::Piece>& pieces,
                                     const std::vector<uint64_t>& chunk_lens, uint64_t segment);

}  // namespace cuda_crc
}  // namespace ackpt
