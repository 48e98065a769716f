// The CUDA device context: one device, one compute stream, the cuBLASLt handle and GEMM workspace, the
// caching allocator, and a small device-side error slot. Passed explicitly to every am::cuda op; the only
// global is default_context(), created on first use for device 0 (the CLI and tests use it).
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <memory>

#include "backend/cuda/allocator.h"

namespace am::cuda {

struct DeviceErrorSlot;
class GemmPlanCache;  // gemm.cu

class CudaContext {
 public:
  // workspace_bytes: cuBLASLt workspace (32 MiB: what cuBLAS itself uses on Hopper).
  explicit CudaContext(int device = 0, size_t workspace_bytes = size_t(32) << 20);
  ~CudaContext();
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  int device() const { return device_; }
  // A blocking stream (synchronises with the legacy default stream, so code that forgets the stream
  // is still ordered correctly, only slower).
  cudaStream_t stream() const { return stream_; }
  cublasLtHandle_t lt() const { return lt_; }
  CachingAllocator& allocator() { return *alloc_; }
  void* workspace() const { return workspace_; }
  size_t workspace_bytes() const { return workspace_bytes_; }
  int sm_count() const { return sm_count_; }
  const cudaDeviceProp& props() const { return props_; }
  GemmPlanCache& gemm_plans() { return *plans_; }

  // Makes this context's device current on the calling thread.
  void make_current() const;
  void synchronize() const;  // waits for the stream; throws DeviceError on an asynchronous fault

  // Kernels that find invalid data (token id outside the vocabulary, bad target) record the first one
  // here instead of forcing a host sync per op. check_device_errors() synchronises the stream, and
  // throws DataError naming the position and value if a kernel reported one (then clears the slot).
  DeviceErrorSlot* error_slot() const { return err_; }
  void check_device_errors();

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  std::unique_ptr<CachingAllocator> alloc_;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  DeviceErrorSlot* err_ = nullptr;  // device memory, 1 slot
  int sm_count_ = 0;
  cudaDeviceProp props_{};
  std::unique_ptr<GemmPlanCache> plans_;
};

// Context for the default device (0 unless set_default_device() chose another), created on first call
// and never destroyed (it must outlive static tensors, and tearing CUDA down during exit is unsafe).
CudaContext& default_context();

// Picks the device default_context() will be created on: a distributed worker calls it with its local
// rank's device before anything touches CUDA (the NCCL engine then uses that context's device and
// stream). Must run before the first default_context(); afterwards it is a no-op for the same device and
// throws DeviceError for another one (the context cannot move).
void set_default_device(int device);

}  // namespace am::cuda
