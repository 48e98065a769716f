#include "backend/cuda/context.h"

#include <mutex>
#include <string>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernel_utils.cuh"
#include "core/error.h"

namespace am::cuda {

void throw_cuda_error(const std::string& what, const char* call, const char* file, int line) {
  int dev = -1;
  cudaGetDevice(&dev);
  std::string f = file;
  auto slash = f.rfind('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  throw DeviceError(what + " in " + call + " at " + f + ":" + std::to_string(line) + " on device " +
                    std::to_string(dev));
}

CudaContext::CudaContext(int device, size_t workspace_bytes) : device_(device) {
  int n = 0;
  AM_CUDA_CHECK(cudaGetDeviceCount(&n));
  if (device < 0 || device >= n)
    throw DeviceError("CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(n) +
                      " visible)");
  AM_CUDA_CHECK(cudaSetDevice(device));
  AM_CUDA_CHECK(cudaGetDeviceProperties(&props_, device));
  sm_count_ = props_.multiProcessorCount;
  AM_CUDA_CHECK(cudaStreamCreate(&stream_));
  AM_CUDA_CHECK(cublasLtCreate(&lt_));
  alloc_ = std::make_unique<CachingAllocator>(device);
  workspace_bytes_ = workspace_bytes;
  workspace_ = workspace_bytes_ ? alloc_->allocate(workspace_bytes_) : nullptr;
  AM_CUDA_CHECK(cudaMalloc(&err_, sizeof(DeviceErrorSlot)));
  AM_CUDA_CHECK(cudaMemset(err_, 0, sizeof(DeviceErrorSlot)));
  plans_ = std::make_unique<GemmPlanCache>();
}

CudaContext::~CudaContext() {
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  plans_.reset();
  if (workspace_) alloc_->deallocate(workspace_, workspace_bytes_);
  alloc_.reset();
  if (err_) cudaFree(err_);
  if (lt_) cublasLtDestroy(lt_);
  if (stream_) cudaStreamDestroy(stream_);
}

void CudaContext::make_current() const {
  int cur = -1;
  AM_CUDA_CHECK(cudaGetDevice(&cur));
  if (cur != device_) AM_CUDA_CHECK(cudaSetDevice(device_));
}

void CudaContext::synchronize() const { AM_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

void CudaContext::check_device_errors() {
  DeviceErrorSlot h{};
  AM_CUDA_CHECK(cudaMemcpyAsync(&h, err_, sizeof h, cudaMemcpyDeviceToHost, stream_));
  synchronize();
  if (h.code == kErrNone) return;
  AM_CUDA_CHECK(cudaMemsetAsync(err_, 0, sizeof(DeviceErrorSlot), stream_));
  if (h.code == kErrTokenId)
    throw DataError("cuda op embedding: token id " + std::to_string(h.value) + " at position " +
                    std::to_string(h.index) + " is outside the vocabulary");
  if (h.code == kErrTarget)
    throw DataError("cuda op cross_entropy: target " + std::to_string(h.value) + " at position " +
                    std::to_string(h.index) + " is outside the vocabulary and is not the ignore index -100");
  throw DataError("cuda: a kernel reported error code " + std::to_string(h.code));
}

namespace {
std::mutex g_default_mu;                 // guards the two below
int g_default_device = 0;
CudaContext* g_default_ctx = nullptr;    // set once, never freed
}  // namespace

CudaContext& default_context() {
  static std::once_flag once;
  std::call_once(once, [] {
    std::lock_guard<std::mutex> lk(g_default_mu);
    g_default_ctx = new CudaContext(g_default_device);
  });
  return *g_default_ctx;
}

void set_default_device(int device) {
  std::lock_guard<std::mutex> lk(g_default_mu);
  if (g_default_ctx && g_default_ctx->device() != device)
    throw DeviceError("cuda::set_default_device(" + std::to_string(device) +
                      "): the default CUDA context already exists on device " +
                      std::to_string(g_default_ctx->device()) + " (call it before any CUDA work)");
  g_default_device = device;
}

}  // namespace am::cuda
