// The no-CUDA build of backend/cuda/device_info.h.
#ifndef AM_WITH_CUDA
#include "backend/cuda/device_info.h"

namespace am::cuda {
bool built_with_cuda() { return false; }
std::vector<DeviceInfo> list_devices(std::string* why_none) {
  if (why_none) *why_none = "built without CUDA";
  return {};
}
std::string runtime_versions() { return ""; }
}  // namespace am::cuda
#endif
