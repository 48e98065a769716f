// GPT-OSS expert op front-ends (contracts in gpt_oss_ops.h). Each op checks that its tensors are defined and on
// one device and the shapes the contract fixes (ShapeError / DeviceError naming the op), then routes CUDA tensors
// to src/backend/cuda/gpt_oss_moe.cu (which checks its dtypes: bf16 or fp32 activations, fp32 dbias) and runs the
// fp32 CPU reference (backend/cpu/gpt_oss_moe.cpp) otherwise. The offsets live with the data: on the host they are
// checked (0 .. rows, non-decreasing); on the device they are the dispatch plan's and are not read back.
#include "ops/gpt_oss_ops.h"

#include <string>

#include "backend/cpu/gpt_oss_moe.h"
#include "core/error.h"
#include "ops/op_checks.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/gpt_oss_moe.h"
#endif
#define AM_GPT_OSS_ROUTE_CUDA(call) AM_OP_ROUTE_CUDA(call)

namespace am::ops {
using namespace detail;

namespace {

void host_f32(const char* op, std::initializer_list<Arg> args) {
  for (const Arg& a : args)
    if (a.t && a.t->dtype() != DType::F32) shape_error(op, describe(a.name, *a.t) + ": expected float32 (CPU reference)");
}

// gu [M, 2I] and a tensor [M, I] (h or dh): returns M, I.
std::pair<int64_t, int64_t> glu_dims(const char* op, const Tensor& gu, const char* name, const Tensor& h) {
  if (gu.ndim() < 1 || gu.dim(-1) % 2 != 0) shape_error(op, describe("gu", gu) + ": last dim must be 2 * I");
  const int64_t I = gu.dim(-1) / 2, M = I ? gu.numel() / (2 * I) : 0;
  if (h.dim(-1) != I || h.numel() != M * I) shape_error(op, describe(name, h) + ": expected [M, I] for " + describe("gu", gu));
  return {M, I};
}

// Shapes of (rows [R, C], bias [E, C], offsets [E+1] int32); on the host also the offsets' values. Returns C.
int64_t bias_dims(const char* op, DeviceType dev, const Tensor& rows, const char* rname, const Tensor& bias,
                  const char* bname, const Tensor& offsets) {
  if (offsets.dtype() != DType::I32 || offsets.ndim() != 1 || offsets.dim(0) < 1)
    shape_error(op, describe("offsets", offsets) + ": expected [E+1] int32");
  const int64_t E = offsets.dim(0) - 1;
  if (bias.ndim() != 2 || bias.dim(0) != E) shape_error(op, describe(bname, bias) + ": expected [E = " + std::to_string(E) + ", C]");
  const int64_t C = bias.dim(1);
  if (rows.dim(-1) != C) shape_error(op, describe(rname, rows) + ": last dim must be C = " + std::to_string(C));
  if (dev == DeviceType::CUDA) return C;  // the device offsets are the plan's: not read back (no host sync)
  const int32_t* o = offsets.data<int32_t>();
  if (o[0] != 0 || o[E] != rows.numel() / (C ? C : 1))
    shape_error(op, "offsets must run from 0 to the " + std::to_string(rows.numel() / (C ? C : 1)) + " rows of " + rname);
  for (int64_t e = 0; e < E; ++e)
    if (o[e + 1] < o[e]) shape_error(op, "offsets must not decrease");
  return C;
}

}  // namespace

void gpt_oss_glu_fwd(const Tensor& gu, float alpha, float limit, Tensor& h) {
  const char* op = "gpt_oss_glu_fwd";
  const DeviceType dev = device_of(op, {{"gu", &gu}, {"h", &h}});
  auto [M, I] = glu_dims(op, gu, "h", h);
  AM_GPT_OSS_ROUTE_CUDA(cuda::gpt_oss_glu_fwd(gu, alpha, limit, h));
  host_f32(op, {{"gu", &gu}, {"h", &h}});
  cpu::gpt_oss_glu_fwd(gu.f32(), M, I, alpha, limit, h.f32());
}

void gpt_oss_glu_bwd(const Tensor& gu, const Tensor& dh, float alpha, float limit, Tensor& dgu) {
  const char* op = "gpt_oss_glu_bwd";
  const DeviceType dev = device_of(op, {{"gu", &gu}, {"dh", &dh}, {"dgu", &dgu}});
  auto [M, I] = glu_dims(op, gu, "dh", dh);
  if (dgu.numel() != gu.numel() || dgu.dim(-1) != gu.dim(-1))
    shape_error(op, describe("dgu", dgu) + ": expected the shape of " + describe("gu", gu));
  AM_GPT_OSS_ROUTE_CUDA(cuda::gpt_oss_glu_bwd(gu, dh, alpha, limit, dgu));
  host_f32(op, {{"gu", &gu}, {"dh", &dh}, {"dgu", &dgu}});
  cpu::gpt_oss_glu_bwd(gu.f32(), dh.f32(), M, I, alpha, limit, dgu.f32());
}

void grouped_bias_add(Tensor& y, const Tensor& bias, const Tensor& offsets) {
  const char* op = "grouped_bias_add";
  const DeviceType dev = device_of(op, {{"y", &y}, {"bias", &bias}, {"offsets", &offsets}});
  const int64_t C = bias_dims(op, dev, y, "y", bias, "bias", offsets);
  AM_GPT_OSS_ROUTE_CUDA(cuda::grouped_bias_add(y, bias, offsets));
  host_f32(op, {{"y", &y}, {"bias", &bias}});
  cpu::grouped_bias_add(y.f32(), bias.f32(), offsets.data<int32_t>(), offsets.dim(0) - 1, C);
}

void grouped_bias_bwd(const Tensor& dy, const Tensor& offsets, Tensor& dbias) {
  const char* op = "grouped_bias_bwd";
  const DeviceType dev = device_of(op, {{"dy", &dy}, {"offsets", &offsets}, {"dbias", &dbias}});
  const int64_t C = bias_dims(op, dev, dy, "dy", dbias, "dbias", offsets);
  if (dbias.dtype() != DType::F32) shape_error(op, describe("dbias", dbias) + ": expected float32 (a parameter gradient)");
  AM_GPT_OSS_ROUTE_CUDA(cuda::grouped_bias_bwd(dy, offsets, dbias));
  host_f32(op, {{"dy", &dy}});
  cpu::grouped_bias_bwd(dy.f32(), offsets.data<int32_t>(), offsets.dim(0) - 1, C, dbias.f32());
}

}  // namespace am::ops
