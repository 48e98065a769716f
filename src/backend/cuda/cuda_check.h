// One checking macro for every CUDA runtime and cuBLAS/cuBLASLt call (DESIGN.md principle 6):
//
//   AM_CUDA_CHECK(cudaMemcpyAsync(...));        // cudaError_t
//   AM_CUDA_CHECK(cublasLtMatmul(...));         // cublasStatus_t
//   my_kernel<<<g, b, 0, s>>>(...); AM_CUDA_CHECK_LAUNCH();
//
// A failure throws am::DeviceError whose message carries the call text, file:line, the current device
// and the library's own error string, e.g.
//   "CUDA error 'out of memory' (cudaErrorMemoryAllocation) in cudaMalloc(&p, bytes) at allocator.cu:88 on device 0"
// Launch checks read cudaGetLastError() only (no synchronisation): asynchronous faults surface at the next
// synchronising call, whose check then names it.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "core/error.h"

namespace am::cuda {

[[noreturn]] void throw_cuda_error(const std::string& what, const char* call, const char* file, int line);

inline void check_call(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls do not report it again
    throw_cuda_error(std::string("CUDA error '") + cudaGetErrorString(e) + "' (" + cudaGetErrorName(e) + ")",
                     call, file, line);
  }
}

inline void check_call(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw_cuda_error(std::string("cuBLAS error ") + std::to_string(static_cast<int>(s)) + " (" +
                         cublasLtGetStatusName(s) + ": " + cublasLtGetStatusString(s) + ")",
                     call, file, line);
}

}  // namespace am::cuda

#define AM_CUDA_CHECK(call) ::am::cuda::check_call((call), #call, __FILE__, __LINE__)
// After every kernel launch: catches bad launch configurations (too many threads, too much shared memory).
#define AM_CUDA_CHECK_LAUNCH() ::am::cuda::check_call(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
