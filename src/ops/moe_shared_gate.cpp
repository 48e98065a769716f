// qwen2_moe's sigmoid-gated shared expert (contract in moe_ops.h):
//   y += sigmoid(g) * sy            g [N, 1], sy / y [N, H]
//   dsy = sigmoid(g) * dy,  dg = sigmoid(g) (1 - sigmoid(g)) <sy, dy>
// CPU reference here (fp32); CUDA tensors go to backend/cuda/moe_shared_gate.cu.
#include <cmath>
#include <string>

#include "core/error.h"
#include "ops/moe_ops.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/moe_shared_gate.h"
#endif

namespace am::ops {
namespace {

void check(const char* op, const Tensor& sy, const Tensor& g, std::initializer_list<const Tensor*> same_as_sy) {
  if (!sy.defined() || !g.defined()) throw ShapeError(std::string("op ") + op + ": undefined tensor");
  const int64_t H = sy.dim(-1), N = sy.numel() / (H ? H : 1);
  if (g.numel() != N)
    throw ShapeError(std::string("op ") + op + ": g " + shape_str(g.shape()) + " must have one value per row of sy " +
                     shape_str(sy.shape()));
  for (const Tensor* t : same_as_sy)
    if (!t->defined() || t->numel() != sy.numel() || t->device() != sy.device())
      throw ShapeError(std::string("op ") + op + ": expected a tensor like sy " + shape_str(sy.shape()));
  if (g.device() != sy.device()) throw DeviceError(std::string("op ") + op + ": g and sy are on different devices");
}

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

}  // namespace

void moe_shared_gate_fwd(const Tensor& sy, const Tensor& g, Tensor& y) {
  check("moe_shared_gate_fwd", sy, g, {&y});
#ifdef AM_WITH_CUDA
  if (sy.device() == DeviceType::CUDA) return cuda::moe_shared_gate_fwd(sy, g, y);
#endif
  const int64_t H = sy.dim(-1), N = sy.numel() / H;
  const float *ps = sy.f32(), *pg = g.f32();
  float* py = y.f32();
  for (int64_t n = 0; n < N; ++n) {
    const float s = sigmoid(pg[n]);
    for (int64_t h = 0; h < H; ++h) py[n * H + h] += s * ps[n * H + h];
  }
}

void moe_shared_gate_bwd(const Tensor& sy, const Tensor& g, const Tensor& dy, Tensor& dsy, Tensor& dg) {
  check("moe_shared_gate_bwd", sy, g, {&dy, &dsy});
  if (dg.numel() != g.numel()) throw ShapeError("op moe_shared_gate_bwd: dg must be shaped like g");
#ifdef AM_WITH_CUDA
  if (sy.device() == DeviceType::CUDA) return cuda::moe_shared_gate_bwd(sy, g, dy, dsy, dg);
#endif
  const int64_t H = sy.dim(-1), N = sy.numel() / H;
  const float *ps = sy.f32(), *pg = g.f32(), *pd = dy.f32();
  float *pds = dsy.f32(), *pdg = dg.f32();
  for (int64_t n = 0; n < N; ++n) {
    const float s = sigmoid(pg[n]);
    double dot = 0.0;
    for (int64_t h = 0; h < H; ++h) {
      dot += static_cast<double>(ps[n * H + h]) * pd[n * H + h];
      pds[n * H + h] = s * pd[n * H + h];
    }
    pdg[n] = static_cast<float>(s * (1.0f - s) * dot);
  }
}

}  // namespace am::ops
