// CRC-32C (Castagnoli, reflected, init/xorout 0xFFFFFFFF), as in docs/FORMAT.md section 3.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ackpt {

// CRC-32C of data[0, len), continuing from crc (0 to start; a previous result to continue).
uint32_t crc32c(uint32_t crc, const void* data, size_t len);

// True when the SSE4.2 instruction path is in use (decided once, by cpuid).
bool crc32c_hardware();

// The portable table implementation (used when SSE4.2 is absent; exposed for tests).
uint32_t crc32c_portable(uint32_t crc, const void* data, size_t len);

}  // namespace ackpt
