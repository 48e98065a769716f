// Caching device allocator (the CUDA side of am::Allocator).
//
// cudaMalloc/cudaFree are slow (cudaFree synchronises the device), so freed blocks go to per-size free
// lists and are handed out again without touching the driver. Sizes are rounded to size classes:
//   <= 1 MiB : multiples of 512 B        (activations of small ops, reduction partials)
//   >  1 MiB : multiples of 2 MiB        (weights, activations, logits chunks)
// A request is served from the free list of exactly its class (no splitting: training steps repeat the
// same shapes, so exact classes hit after the first step and never fragment).
//
// Accounting: current_bytes()/peak_bytes() (base class) count the bytes handed out, i.e. the rounded
// block sizes of live allocations; reserved_bytes() counts what was taken from the driver (live + cached).
//
// Streams: a freed block may be handed out again at once. That is safe because all work of one
// CudaContext runs on its single stream (stream order serialises the old and the new user). Memory used on
// another stream must be synchronised before its tensor is released.
//
// Out of memory: the cache is emptied and cudaMalloc retried once; then DeviceError reports the request
// and the current / peak / reserved numbers.
#pragma once
#include <cstddef>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/allocator.h"

namespace am::cuda {

class CachingAllocator : public Allocator {
 public:
  explicit CachingAllocator(int device);
  ~CachingAllocator() override;  // returns every block it still holds to the driver
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  void* allocate(size_t bytes) override;  // 0 bytes -> nullptr
  void deallocate(void* p, size_t bytes) override;
  DeviceType device_type() const override { return DeviceType::CUDA; }

  // Frees every cached (unused) block back to the driver. Synchronises the device (cudaFree does).
  void empty_cache();

  int device() const { return device_; }
  size_t reserved_bytes() const;       // held from the driver: live + cached
  size_t peak_reserved_bytes() const;
  size_t cached_bytes() const;         // reserved but not handed out

  struct Stats {
    size_t allocations = 0;  // allocate() calls with bytes > 0
    size_t cache_hits = 0;   // served from a free list
    size_t cuda_mallocs = 0, cuda_frees = 0;
  };
  Stats stats() const;

  static size_t round_size(size_t bytes);  // the size class of a request
  static constexpr size_t kSmallLimit = size_t(1) << 20;
  static constexpr size_t kSmallRound = 512;
  static constexpr size_t kLargeRound = size_t(2) << 20;

 private:
  void* malloc_or_throw(size_t block, size_t requested);  // mu_ held
  void release_cached();                                   // mu_ held

  int device_;
  mutable std::mutex mu_;
  std::unordered_map<void*, size_t> live_;      // pointer -> block size
  std::map<size_t, std::vector<void*>> free_;   // block size -> cached blocks
  size_t reserved_ = 0, peak_reserved_ = 0, cached_ = 0;
  Stats stats_;
};

}  // namespace am::cuda
