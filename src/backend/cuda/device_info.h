// Device discovery used by `automodel info` and `device: auto`. Implemented in device_info.cu when the
// CUDA toolkit is present; device_info_none.cpp provides the no-CUDA build.
#pragma once
#include <string>
#include <vector>

namespace am::cuda {

struct DeviceInfo {
  int index = 0;
  std::string name;
  size_t total_bytes = 0, free_bytes = 0;
  int cc_major = 0, cc_minor = 0, sm_count = 0;
};

bool built_with_cuda();
// Visible devices; empty when none (or no driver). Never throws.
std::vector<DeviceInfo> list_devices(std::string* why_none = nullptr);
std::string runtime_versions();  // "CUDA runtime 13.0, cuBLASLt 13.x" or "" without CUDA

}  // namespace am::cuda
