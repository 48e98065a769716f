#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "backend/cuda/device_info.h"

namespace am::cuda {

bool built_with_cuda() { return true; }

std::vector<DeviceInfo> list_devices(std::string* why_none) {
  std::vector<DeviceInfo> out;
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why_none) *why_none = cudaGetErrorString(e);
    cudaGetLastError();  // clear the sticky error
    return out;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    DeviceInfo d;
    d.index = i;
    d.name = p.name;
    d.total_bytes = p.totalGlobalMem;
    d.cc_major = p.major;
    d.cc_minor = p.minor;
    d.sm_count = p.multiProcessorCount;
    size_t fr = 0, tot = 0;
    if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&fr, &tot) == cudaSuccess) d.free_bytes = fr;
    out.push_back(d);
  }
  if (out.empty() && why_none) *why_none = "no CUDA devices visible";
  return out;
}

std::string runtime_versions() {
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  size_t lt = cublasLtGetVersion();
  return "CUDA runtime " + std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10) + ", cuBLASLt " +
         std::to_string(lt / 10000) + "." + std::to_string((lt / 100) % 100) + "." + std::to_string(lt % 100);
}

}  // namespace am::cuda
