// Typed exceptions of the C++ core. csrc/bindings.cpp maps each one onto a class of
// async_ckpt.errors; nothing in the core prints, asserts or returns -1 for an error.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ackpt {

// Base of every deliberate core error.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad argument, length, offset or a frame whose size disagrees with its record.
class FormatError : public Error {
 public:
  using Error::Error;
};

// Stored or decoded bytes whose CRC-32C differs from the record.
class ChecksumError : public Error {
 public:
  ChecksumError(const std::string& msg, std::string path, uint64_t offset, int64_t chunk)
      : Error(msg), path_(std::move(path)), offset_(offset), chunk_(chunk) {}
  const std::string& path() const { return path_; }
  uint64_t offset() const { return offset_; }
  int64_t chunk() const { return chunk_; }

 private:
  std::string path_;
  uint64_t offset_;
  int64_t chunk_;
};

// zstd missing, or a frame that fails to (de)compress.
class CodecError : public Error {
 public:
  using Error::Error;
};

// An OS call failed. what() is "<cause> (<operation> ...)"; errno and path are kept apart
// so the bindings can build an OSError with errno/filename set.
class IoError : public Error {
 public:
  IoError(int err, std::string path, const std::string& detail);
  int err() const { return err_; }
  const std::string& path() const { return path_; }
  // The strerror text plus the operation, without the path (OSError adds it).
  const std::string& detail() const { return detail_; }

 private:
  int err_;
  std::string path_;
  std::string detail_;
};

}  // namespace ackpt
