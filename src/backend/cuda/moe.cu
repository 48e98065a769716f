// MoE ops on CUDA: placeholder until the kernels land (every entry point throws DeviceError).
#include <string>

#include "backend/cuda/moe.h"
#include "core/error.h"

namespace am::cuda {
namespace {
[[noreturn]] void todo(const char* op) {
  throw DeviceError(std::string("cuda op ") + op + ": not implemented yet on CUDA (CPU reference only)");
}
}  // namespace

void moe_router_fwd(const Tensor&, int64_t, bool, Tensor&, Tensor&, Tensor&, CudaContext&) { todo("moe_router_fwd"); }
void moe_router_bwd(const Tensor&, const Tensor&, const Tensor&, bool, const Tensor&, const Tensor*, Tensor&,
                    CudaContext&) {
  todo("moe_router_bwd");
}
void moe_dispatch_plan(const Tensor&, int64_t, Tensor&, Tensor&, Tensor&, std::vector<int64_t>*, CudaContext&) {
  todo("moe_dispatch_plan");
}
void moe_gather(const Tensor&, const Tensor&, int64_t, Tensor&, CudaContext&) { todo("moe_gather"); }
void moe_gather_bwd(const Tensor&, const Tensor&, int64_t, Tensor&, CudaContext&) { todo("moe_gather_bwd"); }
void moe_combine(const Tensor&, const Tensor&, const Tensor&, Tensor&, CudaContext&) { todo("moe_combine"); }
void moe_combine_bwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, CudaContext&) {
  todo("moe_combine_bwd");
}
void grouped_linear_fwd(const Tensor&, const Tensor&, const Tensor&, Tensor&, const std::vector<int64_t>*,
                        CudaContext&) {
  todo("grouped_linear_fwd");
}
void grouped_linear_bwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor*, Tensor&,
                        const std::vector<int64_t>*, CudaContext&) {
  todo("grouped_linear_bwd");
}
void swiglu_fused_fwd(const Tensor&, Tensor&, CudaContext&) { todo("swiglu_fused_fwd"); }
void swiglu_fused_bwd(const Tensor&, const Tensor&, Tensor&, CudaContext&) { todo("swiglu_fused_bwd"); }

}  // namespace am::cuda
