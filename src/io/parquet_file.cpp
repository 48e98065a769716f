// The mapped file shared by the Parquet and Arrow IPC readers, and small numeric helpers.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "io/parquet_internal.h"

namespace am::io::pq {

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError(path + ": not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      ::close(fd);
      throw IoError(path + ": mmap failed: " + std::strerror(e));
    }
    base_ = p;
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (base_) munmap(base_, size_);
}

// IEEE 754 binary16 -> binary32 (Parquet FLOAT16, Arrow HALF).
float half_to_float(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 10) & 0x1f;
  const int frac = h & 0x3ff;
  if (exp == 0) return sign * std::ldexp(static_cast<float>(frac), -24);  // zero and subnormals
  if (exp == 31) return frac ? NAN : sign * INFINITY;
  return sign * std::ldexp(static_cast<float>(frac + 1024), exp - 25);
}

}  // namespace am::io::pq
