#include "backend/cuda/allocator.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "backend/cuda/cuda_check.h"
#include "core/error.h"

namespace am::cuda {
namespace {

// Makes `device` current for the scope (allocations may come from threads that never chose a device).
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    AM_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != device) AM_CUDA_CHECK(cudaSetDevice(device));
    else prev = -1;
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

std::string gib(size_t b) {
  char s[32];
  std::snprintf(s, sizeof s, "%.3f GiB", static_cast<double>(b) / double(1ull << 30));
  return s;
}

}  // namespace

CachingAllocator::CachingAllocator(int device) : device_(device) {}

CachingAllocator::~CachingAllocator() {
  // Destructors must not throw: free quietly. Live blocks (tensors that outlive the allocator) are freed
  // too, since nobody else can return them.
  std::lock_guard<std::mutex> lk(mu_);
  int prev = -1;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  for (auto& [sz, v] : free_)
    for (void* p : v) cudaFree(p);
  for (auto& [p, sz] : live_) cudaFree(p);
  if (prev >= 0) cudaSetDevice(prev);
}

size_t CachingAllocator::round_size(size_t bytes) {
  if (bytes <= kSmallLimit) return (bytes + kSmallRound - 1) / kSmallRound * kSmallRound;
  return (bytes + kLargeRound - 1) / kLargeRound * kLargeRound;
}

void CachingAllocator::release_cached() {
  if (cached_ == 0) return;
  DeviceGuard g(device_);
  for (auto& [sz, v] : free_) {
    for (void* p : v) {
      AM_CUDA_CHECK(cudaFree(p));
      reserved_ -= sz;
      ++stats_.cuda_frees;
    }
  }
  free_.clear();
  cached_ = 0;
}

void* CachingAllocator::malloc_or_throw(size_t block, size_t requested) {
  DeviceGuard g(device_);
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, block);
  if (e == cudaErrorMemoryAllocation && cached_ > 0) {
    cudaGetLastError();
    release_cached();
    e = cudaMalloc(&p, block);
  }
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    size_t fr = 0, tot = 0;
    cudaMemGetInfo(&fr, &tot);
    throw DeviceError("CUDA out of memory on device " + std::to_string(device_) + ": requested " +
                      std::to_string(requested) + " bytes (" + gib(block) + " block); allocated " +
                      gib(current_bytes()) + ", peak " + gib(peak_bytes()) + ", reserved " + gib(reserved_) +
                      "; the device has " + gib(fr) + " free of " + gib(tot));
  }
  AM_CUDA_CHECK(e);
  reserved_ += block;
  if (reserved_ > peak_reserved_) peak_reserved_ = reserved_;
  ++stats_.cuda_mallocs;
  return p;
}

void* CachingAllocator::allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  const size_t block = round_size(bytes);
  std::lock_guard<std::mutex> lk(mu_);
  ++stats_.allocations;
  void* p = nullptr;
  auto it = free_.find(block);
  if (it != free_.end() && !it->second.empty()) {
    p = it->second.back();
    it->second.pop_back();
    cached_ -= block;
    ++stats_.cache_hits;
  } else {
    p = malloc_or_throw(block, bytes);
  }
  live_.emplace(p, block);
  on_alloc(block);
  return p;
}

void CachingAllocator::deallocate(void* p, size_t /*bytes*/) {
  if (!p) return;
  std::lock_guard<std::mutex> lk(mu_);
  auto it = live_.find(p);
  if (it == live_.end()) return;  // not ours (or freed twice): ignore rather than corrupt the lists
  const size_t block = it->second;
  live_.erase(it);
  free_[block].push_back(p);
  cached_ += block;
  on_free(block);
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lk(mu_);
  release_cached();
}

size_t CachingAllocator::reserved_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return reserved_;
}
size_t CachingAllocator::peak_reserved_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return peak_reserved_;
}
size_t CachingAllocator::cached_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return cached_;
}
CachingAllocator::Stats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

}  // namespace am::cuda
