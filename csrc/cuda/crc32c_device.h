// C ABI of the optional CUDA module (csrc/cuda/crc32c_device.cu), loaded with dlopen by
// csrc/cuda_crc_dl.cc. Return values: 0 on success, ACKPT_CUDA_EINVAL for bad arguments,
// otherwise a cudaError_t; ackpt_cuda_error_string names any of them.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "../crc32c_math.h"

#define ACKPT_CUDA_ABI_VERSION 2
#define ACKPT_CUDA_EINVAL 100000

extern "C" {

int ackpt_cuda_abi_version(void);
const char* ackpt_cuda_error_string(int code);
int ackpt_cuda_device_count(int* count);

// Bytes of pinned host workspace ackpt_cuda_crc32c_pieces needs for these counts.
size_t ackpt_cuda_workspace_bytes(uint32_t n_pieces, uint32_t n_chunks);

// Queues on `stream` (a cudaStream_t of `device`) the crc32c of n_chunks chunks assembled from
// n_pieces device-memory pieces; out_host (pinned, n_chunks words) holds them once the stream
// passes this point. Chunk bytes that no piece covers count as zeros. Pieces must stay
// allocated and unchanged until then, and so must `workspace` (pinned host memory of at least
// ackpt_cuda_workspace_bytes, into which the arguments are packed for an asynchronous copy).
// Never waits for the stream.
int ackpt_cuda_crc32c_pieces(const ackpt::crcmath::Piece* pieces, uint32_t n_pieces,
                             const uint64_t* chunk_lens, uint32_t n_chunks, uint32_t* out_host,
                             uint64_t segment, void* stream, int device, void* workspace,
                             size_t workspace_bytes);

// The same decomposition on the host, compiled by nvcc's host compiler: lets a machine
// without a GPU check the module's arithmetic (pieces are host addresses here).
int ackpt_cuda_crc32c_pieces_host(const ackpt::crcmath::Piece* pieces, uint32_t n_pieces,
                                  const uint64_t* chunk_lens, uint32_t n_chunks, uint32_t* out,
                                  uint64_t segment);
}
