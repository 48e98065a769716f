#include "core/allocator.h"

#include <new>
#include <string>

#include "core/error.h"

namespace am {

void* CpuAllocator::allocate(size_t bytes) {
  if (bytes == 0) bytes = 1;
  void* p = ::operator new(bytes, std::align_val_t(64), std::nothrow);
  if (!p) throw DeviceError("out of host memory allocating " + std::to_string(bytes) + " bytes");
  on_alloc(bytes);
  return p;
}

void CpuAllocator::deallocate(void* p, size_t bytes) {
  if (bytes == 0) bytes = 1;
  ::operator delete(p, std::align_val_t(64));
  on_free(bytes);
}

CpuAllocator& cpu_allocator() {
  static CpuAllocator a;
  return a;
}

}  // namespace am
