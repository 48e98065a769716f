// A POSIX file descriptor with the loops every raw file writer needs: pread/write until done (EINTR-safe,
// at most 1 GiB per call), fstat size, fsync + close with errors reported. Errors are IoError / FormatError
// naming the file. Used by the safetensors writer and the streaming LoRA merge.
#pragma once
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace am::io {

class Fd {
 public:
  // open(2) with O_CLOEXEC added; IoError "<path>: cannot open: <why>" on failure.
  Fd(const std::string& path, int flags, mode_t mode = 0644);
  ~Fd();  // closes without checking (an unfinished file is being abandoned)
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;

  int get() const { return fd_; }
  const std::string& path() const { return path_; }
  uint64_t size() const;
  // Exactly n bytes at offset off; a short file is FormatError "unexpected end of file (truncated?)".
  void pread_all(void* buf, size_t n, uint64_t off) const;
  void write_all(const void* buf, size_t n);
  // fsync then close; after it the Fd owns nothing.
  void sync_close();

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace am::io
