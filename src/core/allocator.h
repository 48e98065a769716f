// Allocators hand out raw device memory and track current and peak bytes, which the bench and the
// training log report as `mem_gib`. The CPU one is a thin wrapper over aligned new; the CUDA one
// (backend/cuda) is a caching allocator behind the same interface.
#pragma once
#include <atomic>
#include <cstddef>

namespace am {

enum class DeviceType : uint8_t { CPU, CUDA };

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p, size_t bytes) = 0;
  virtual DeviceType device_type() const = 0;
  size_t current_bytes() const { return current_.load(); }
  size_t peak_bytes() const { return peak_.load(); }
  void reset_peak() { peak_.store(current_.load()); }

 protected:
  void on_alloc(size_t b) {
    size_t now = current_.fetch_add(b) + b;
    size_t p = peak_.load();
    while (now > p && !peak_.compare_exchange_weak(p, now)) {
    }
  }
  void on_free(size_t b) { current_.fetch_sub(b); }

 private:
  std::atomic<size_t> current_{0};
  std::atomic<size_t> peak_{0};
};

class CpuAllocator : public Allocator {
 public:
  void* allocate(size_t bytes) override;
  void deallocate(void* p, size_t bytes) override;
  DeviceType device_type() const override { return DeviceType::CPU; }
};

// The process-wide CPU allocator (host memory is one pool; contexts share it).
CpuAllocator& cpu_allocator();

}  // namespace am
