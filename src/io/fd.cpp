// io::Fd (fd.h).
#include "io/fd.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace am::io {

Fd::Fd(const std::string& path, int flags, mode_t mode) : path_(path) {
  fd_ = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  if (fd_ < 0) throw IoError(path + ": cannot open: " + std::strerror(errno));
}

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

uint64_t Fd::size() const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) throw IoError(path_ + ": cannot stat: " + std::strerror(errno));
  return static_cast<uint64_t>(st.st_size);
}

void Fd::pread_all(void* buf, size_t n, uint64_t off) const {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = ::pread(fd_, p, std::min<size_t>(n, size_t(1) << 30), static_cast<off_t>(off));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw IoError(path_ + ": read failed: " + std::strerror(errno));
    if (r == 0) throw FormatError(path_ + ": unexpected end of file (truncated?)");
    p += r;
    off += static_cast<uint64_t>(r);
    n -= static_cast<size_t>(r);
  }
}

void Fd::write_all(const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t w = ::write(fd_, p, std::min<size_t>(n, size_t(1) << 30));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw IoError(path_ + ": write failed: " + std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void Fd::sync_close() {
  if (::fsync(fd_) != 0) throw IoError(path_ + ": fsync failed: " + std::strerror(errno));
  int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) throw IoError(path_ + ": close failed: " + std::strerror(errno));
}

}  // namespace am::io
