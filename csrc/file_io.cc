#include "file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include "errors.h"

namespace ackpt {

IoError::IoError(int err, std::string path, const std::string& detail)
    : Error("'" + path + "': " + detail), err_(err), path_(std::move(path)), detail_(detail) {}

void throw_errno(int err, const std::string& path, const std::string& what) {
  throw IoError(err, path, std::string(std::strerror(err)) + " (" + what + ")");
}

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    path_ = std::move(o.path_);
    o.fd_ = -1;
  }
  return *this;
}

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

void Fd::close() {
  if (fd_ < 0) return;
  const int fd = fd_;
  fd_ = -1;
  // Linux always releases the descriptor, even on EINTR: never retry close.
  if (::close(fd) != 0 && errno != EINTR) throw_errno(errno, path_, "close");
}

Fd open_create_excl(const std::string& path) {
  int fd;
  do fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) throw_errno(errno, path, "create");
  return Fd(fd, path);
}

Fd open_direct_like(const Fd& same, bool write) {
  const int access = write ? O_WRONLY : O_RDONLY;
  int fd;
  do fd = ::open(same.path().c_str(), access | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_DIRECT);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    if (errno == EINVAL) return Fd();  // the file system does not do O_DIRECT
    throw_errno(errno, same.path(), "open with O_DIRECT");
  }
  Fd f(fd, same.path());
  struct stat a, b;
  if (::fstat(same.get(), &a) != 0) throw_errno(errno, same.path(), "fstat");
  if (::fstat(fd, &b) != 0) throw_errno(errno, same.path(), "fstat");
  if (a.st_dev != b.st_dev || a.st_ino != b.st_ino)
    throw_errno(ESTALE, same.path(), "file replaced while being opened");
  return f;
}

Fd open_read(const std::string& path, uint64_t* size) {
  int fd;
  do fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    if (errno == ELOOP) throw_errno(ELOOP, path, "open: data files must not be symlinks");
    throw_errno(errno, path, "open for reading");
  }
  Fd f(fd, path);
  struct stat st;
  if (::fstat(fd, &st) != 0) throw_errno(errno, path, "fstat");
  if (!S_ISREG(st.st_mode)) throw FormatError("'" + path + "' is not a regular file");
  *size = static_cast<uint64_t>(st.st_size);
  return f;
}

void pwrite_all(const Fd& fd, const void* buf, size_t len, uint64_t offset) {
  auto* p = static_cast<const char*>(buf);
  while (len) {
    // Linux caps one write at 0x7ffff000 bytes; ask for at most 1 GiB per call.
    const size_t n = len < (size_t(1) << 30) ? len : (size_t(1) << 30);
    const ssize_t r = ::pwrite(fd.get(), p, n, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw_errno(errno, fd.path(),
                  "pwrite of " + std::to_string(len) + " bytes at offset " + std::to_string(offset));
    }
    if (r == 0)
      throw_errno(EIO, fd.path(), "pwrite wrote nothing at offset " + std::to_string(offset));
    p += r;
    len -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
}

size_t pread_full(const Fd& fd, void* buf, size_t len, uint64_t offset) {
  auto* p = static_cast<char*>(buf);
  size_t done = 0;
  while (done < len) {
    const size_t left = len - done;
    const size_t n = left < (size_t(1) << 30) ? left : (size_t(1) << 30);
    const ssize_t r = ::pread(fd.get(), p + done, n, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw_errno(errno, fd.path(),
                  "pread of " + std::to_string(left) + " bytes at offset " +
                      std::to_string(offset + done));
    }
    if (r == 0) break;  // end of file
    done += static_cast<size_t>(r);
  }
  return done;
}

size_t preadv_full(const Fd& fd, std::vector<struct iovec>& iov, uint64_t offset) {
  size_t done = 0, first = 0;
  while (first < iov.size()) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    const int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    const ssize_t r = ::preadv(fd.get(), &iov[first], count, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw_errno(errno, fd.path(), "preadv at offset " + std::to_string(offset + done));
    }
    if (r == 0) break;  // end of file
    done += static_cast<size_t>(r);
    for (size_t left = static_cast<size_t>(r); left;) {
      const size_t take = std::min(left, iov[first].iov_len);
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + take;
      iov[first].iov_len -= take;
      left -= take;
      if (iov[first].iov_len == 0) ++first;
    }
  }
  return done;
}

void fsync_fd(const Fd& fd) {
  int r;
  do r = ::fsync(fd.get());
  while (r != 0 && errno == EINTR);
  if (r != 0) throw_errno(errno, fd.path(), "fsync");
}

void truncate_fd(const Fd& fd, uint64_t size) {
  int r;
  do r = ::ftruncate(fd.get(), static_cast<off_t>(size));
  while (r != 0 && errno == EINTR);
  if (r != 0) throw_errno(errno, fd.path(), "ftruncate to " + std::to_string(size));
}

void fsync_path(const std::string& path) {
  int fd;
  do fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) throw_errno(errno, path, "open for fsync");
  Fd f(fd, path);
  fsync_fd(f);
  f.close();
}

void fsync_dir(const std::string& path) {
  int fd;
  do fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) throw_errno(errno, path, "open directory for fsync");
  Fd f(fd, path);
  fsync_fd(f);
  f.close();
}

void write_file_durable(const std::string& path, const void* data, size_t len) {
  Fd f = open_create_excl(path);
  pwrite_all(f, data, len, 0);
  fsync_fd(f);
  f.close();
}

}  // namespace ackpt
