// POSIX file IO with every failure turned into IoError (errno, path, operation, offset).
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ackpt {

// Owns one file descriptor; closes it on destruction (errors ignored there: call close()
// explicitly where the result matters).
class Fd {
 public:
  Fd() = default;
  Fd(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  Fd(Fd&& o) noexcept : fd_(o.fd_), path_(std::move(o.path_)) { o.fd_ = -1; }
  Fd& operator=(Fd&& o) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd();

  int get() const { return fd_; }
  const std::string& path() const { return path_; }
  bool valid() const { return fd_ >= 0; }
  void close();  // IoError when close(2) reports an error (e.g. EIO, ENOSPC on NFS)

 private:
  int fd_ = -1;
  std::string path_;
};

// O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, mode 0644.
Fd open_create_excl(const std::string& path);
// Opens same.path() again with O_DIRECT (write: O_WRONLY, else O_RDONLY) and checks it is the
// same inode as `same`. Returns an invalid Fd when the file system refuses O_DIRECT (EINVAL),
// so callers fall back to buffered IO.
Fd open_direct_like(const Fd& same, bool write);
// O_RDONLY|O_NOFOLLOW|O_CLOEXEC|O_NONBLOCK (a FIFO never blocks the open); rejects anything
// that is not a regular file. Returns the size through *size.
Fd open_read(const std::string& path, uint64_t* size);

// Loops over short writes/reads and EINTR.
void pwrite_all(const Fd& fd, const void* buf, size_t len, uint64_t offset);
// Returns the number of bytes read; less than len only at end of file.
size_t pread_full(const Fd& fd, void* buf, size_t len, uint64_t offset);
// One range into several buffers in order (preadv, IOV_MAX at a time). The iovecs are
// consumed (advanced past what was read). Returns the bytes read; fewer only at end of file.
size_t preadv_full(const Fd& fd, std::vector<struct iovec>& iov, uint64_t offset);

void fsync_fd(const Fd& fd);
void truncate_fd(const Fd& fd, uint64_t size);
void fsync_path(const std::string& path);  // open read-only, fsync, close
void fsync_dir(const std::string& path);
void write_file_durable(const std::string& path, const void* data, size_t len);

[[noreturn]] void throw_errno(int err, const std::string& path, const std::string& what);

}  // namespace ackpt
