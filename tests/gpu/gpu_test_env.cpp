// The GPU tests exist to check the CUDA kernels that have not yet run on a GPU, which the engine otherwise keeps
// off (ops/device.h unverified_cuda_allowed): turn them on before anything reads the variable. An explicit
// AM_ALLOW_UNVERIFIED_CUDA=0 in the environment still wins (the default paths are then what runs).
#include <cstdlib>

namespace {
const int kAllowUnverifiedCuda = (setenv("AM_ALLOW_UNVERIFIED_CUDA", "1", /*overwrite=*/0), 0);
}  // namespace
